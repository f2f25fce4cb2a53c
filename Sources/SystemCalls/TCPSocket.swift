import CVFIOLive
import Glibc

/// `tcp:HOST:PORT` or `unix:PATH`, as QEMU's migration URIs.
public enum SocketAddress: CustomStringConvertible, Equatable, Sendable {
    case tcp(host: String, port: UInt16)
    case unix(path: String)

    public init(uri: String) throws {
        if uri.hasPrefix("unix:") {
            let p = String(uri.dropFirst(5))
            guard !p.isEmpty else { throw SocketAddressError("unix: needs a path") }
            self = .unix(path: p)
        } else if uri.hasPrefix("tcp:") {
            let rest = uri.dropFirst(4)
            guard let colon = rest.lastIndex(of: ":"), let port = UInt16(rest[rest.index(after: colon)...]) else {
                throw SocketAddressError("'\(uri)' is not tcp:HOST:PORT")
            }
            var host = String(rest[..<colon])
            if host.hasPrefix("[") && host.hasSuffix("]") { host = String(host.dropFirst().dropLast()) }
            self = .tcp(host: host.isEmpty ? "0.0.0.0" : host, port: port)
        } else {
            throw SocketAddressError("'\(uri)' is neither tcp:HOST:PORT nor unix:PATH")
        }
    }

    public var description: String {
        switch self {
        case let .tcp(h, p): return "tcp:\(h.contains(":") ? "[\(h)]" : h):\(p)"
        case let .unix(p): return "unix:\(p)"
        }
    }
}

public struct SocketAddressError: Error, CustomStringConvertible {
    public let description: String
    init(_ d: String) { description = d }
}

/// A connected TCP stream socket (migration channels). TCP_NODELAY, large buffers.
public final class TCPSocket: StreamSocket, @unchecked Sendable {
    public let fd: FileDescriptor
    public init(adopting fd: FileDescriptor) {
        self.fd = fd
        var one: Int32 = 1
        _ = setsockopt(fd.rawValue, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
    }

    static func resolve(_ host: String, _ port: UInt16, passive: Bool) throws -> (Int32, [UInt8]) {
        var hints = addrinfo()
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        hints.ai_family = AF_UNSPEC
        if passive { hints.ai_flags = AI_PASSIVE }
        var res: UnsafeMutablePointer<addrinfo>?
        let rc = getaddrinfo(host, String(port), &hints, &res)
        guard rc == 0, let ai = res else { throw SocketAddressError("cannot resolve \(host): \(String(cString: gai_strerror(rc)))") }
        defer { freeaddrinfo(res) }
        let bytes = Array(UnsafeRawBufferPointer(start: ai.pointee.ai_addr, count: Int(ai.pointee.ai_addrlen)))
        return (ai.pointee.ai_family, bytes)
    }

    public static func connect(host: String, port: UInt16) throws -> TCPSocket {
        let (family, addr) = try resolve(host, port, passive: false)
        let raw = try syscallRetryingEINTR { socket(family, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0) }
        let fd = FileDescriptor(adopting: raw)
        _ = try addr.withUnsafeBytes { a in
            try syscallRetryingEINTR { Glibc.connect(raw, a.baseAddress!.assumingMemoryBound(to: sockaddr.self), socklen_t(a.count)) }
        }
        return TCPSocket(adopting: fd)
    }
}

/// A listening TCP socket (SO_REUSEADDR). Port 0 picks a free port (see `port`).
public final class TCPListener: @unchecked Sendable {
    public let fd: FileDescriptor
    public let port: UInt16

    public init(host: String, port: UInt16, backlog: Int32 = 1) throws {
        let (family, addr) = try TCPSocket.resolve(host, port, passive: true)
        let raw = try syscallRetryingEINTR { socket(family, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0) }
        fd = FileDescriptor(adopting: raw)
        var one: Int32 = 1
        _ = setsockopt(raw, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        _ = try addr.withUnsafeBytes { a in
            try syscallRetryingEINTR { bind(raw, a.baseAddress!.assumingMemoryBound(to: sockaddr.self), socklen_t(a.count)) }
        }
        _ = try syscallRetryingEINTR { listen(raw, backlog) }
        var ss = sockaddr_storage()
        var len = socklen_t(MemoryLayout<sockaddr_storage>.size)
        _ = withUnsafeMutablePointer(to: &ss) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(raw, $0, &len) } }
        let p: UInt16 = withUnsafeBytes(of: &ss) { b in UInt16(b[2]) << 8 | UInt16(b[3]) }  // sin(6)_port, network order
        self.port = p
    }

    public func accept(timeoutMilliseconds: Int32 = -1, cancel: FileDescriptor? = nil) throws -> TCPSocket? {
        var watch = [fd.rawValue]
        if let c = cancel { watch.append(c.rawValue) }
        guard let which = try Poll.waitAnyReadable(watch, timeoutMilliseconds: timeoutMilliseconds), which == 0 else { return nil }
        let raw = try syscallRetryingEINTR { vl_accept(fd.rawValue) }
        return TCPSocket(adopting: FileDescriptor(adopting: raw))
    }

    public func close() { fd.close() }
}

/// Connect to a migration URI.
public func connectStream(_ a: SocketAddress) throws -> StreamSocket {
    switch a {
    case let .tcp(h, p): return try TCPSocket.connect(host: h, port: p)
    case let .unix(path): return try UnixSocket.connect(path: path)
    }
}
