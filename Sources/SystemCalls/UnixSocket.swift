import CVFIOLive
import Glibc

/// Received bytes with the descriptors that came with them.
public struct ReceivedFDs {
    public var fds: [FileDescriptor]
    /// The peer sent more fds than allowed (the surplus were closed already).
    public var truncated: Bool
}

/// A connected stream socket (UNIX or TCP): sends whole buffer lists with one sendmsg where
/// it can, receives exactly, and (UNIX only) carries fds with SCM_RIGHTS.
public protocol StreamSocket: AnyObject {
    var fd: FileDescriptor { get }
}

extension StreamSocket {
    /// One sendmsg with all `buffers` and `fds` (fds are duplicated by the kernel; we keep ours).
    /// Loops over a short write, sending the fds only with the first part.
    public func send(_ buffers: [UnsafeRawBufferPointer], fds: [Int32] = []) throws {
        var iovs = buffers.filter { $0.count > 0 }.map {
            iovec(iov_base: UnsafeMutableRawPointer(mutating: $0.baseAddress), iov_len: $0.count)
        }
        var total = iovs.reduce(0) { $0 + $1.iov_len }
        var pendingFDs = fds
        if total == 0 && fds.isEmpty { return }
        while total > 0 || !pendingFDs.isEmpty {
            let sent: Int = try iovs.withUnsafeBufferPointer { iovp in
                try pendingFDs.withUnsafeBufferPointer { fdp in
                    try syscallRetryingEINTR {
                        vl_sendmsg_fds(fd.rawValue, iovp.baseAddress, Int32(iovp.count), fdp.baseAddress, Int32(fdp.count))
                    }
                }
            }
            pendingFDs = []
            total -= sent
            // Drop what was sent from the front of the iovec list.
            var skip = sent
            while skip > 0, !iovs.isEmpty {
                if skip >= iovs[0].iov_len { skip -= iovs[0].iov_len; iovs.removeFirst() }
                else {
                    iovs[0].iov_base = iovs[0].iov_base.advanced(by: skip)
                    iovs[0].iov_len -= skip
                    skip = 0
                }
            }
        }
    }

    public func send(_ bytes: [UInt8], fds: [Int32] = []) throws {
        try bytes.withUnsafeBytes { try send([$0], fds: fds) }
    }

    /// Read exactly `buffer.count` bytes, collecting fds from the first recvmsg (at most `maxFDs`).
    /// Throws ECONNRESET on EOF before the first byte, EPROTO on EOF part-way. Each recvmsg is
    /// bounded by the socket's SO_RCVTIMEO (EAGAIN); past `deadline` no further one starts
    /// (EAGAIN too), so that a peer trickling a byte per timeout cannot stretch one message.
    public func receiveExactly(into buffer: UnsafeMutableRawBufferPointer, maxFDs: Int, deadline: UInt64 = .max) throws -> ReceivedFDs {
        var fds: [FileDescriptor] = []
        var truncated = false
        var got = 0
        var rawFDs = [Int32](repeating: -1, count: max(maxFDs, 1))
        while got < buffer.count {
            if got > 0 && deadline != .max && monotonicNanoseconds() >= deadline { throw Errno.EAGAIN }
            var nfds: Int32 = 0
            var trunc: Int32 = 0
            let allowed = got == 0 ? Int32(maxFDs) : 0
            let n = try rawFDs.withUnsafeMutableBufferPointer { fp in
                try syscallRetryingEINTR {
                    vl_recvmsg_fds(fd.rawValue, buffer.baseAddress! + got, buffer.count - got,
                                   fp.baseAddress, allowed, &nfds, &trunc, 0)
                }
            }
            for i in 0..<Int(nfds) { fds.append(FileDescriptor(adopting: rawFDs[i])) }
            if trunc != 0 { truncated = true }
            if n == 0 {
                throw got == 0 ? Errno.ECONNRESET : Errno.EPROTO
            }
            got += n
        }
        return ReceivedFDs(fds: fds, truncated: truncated)
    }

}

/// A connected AF_UNIX SOCK_STREAM socket that can carry fds (SCM_RIGHTS).
public final class UnixSocket: StreamSocket, @unchecked Sendable {
    public let fd: FileDescriptor

    public init(adopting fd: FileDescriptor) { self.fd = fd }

    /// Connect to a listening socket at `path`.
    public static func connect(path: String) throws -> UnixSocket {
        let raw = try syscallRetryingEINTR { socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0) }
        let fd = FileDescriptor(adopting: raw)
        _ = try path.withCString { p in try syscallRetryingEINTR { vl_unix_connect(raw, p) } }
        return UnixSocket(adopting: fd)
    }

    /// A connected pair (used for vfio-user's twin socket and in tests).
    public static func pair() throws -> (UnixSocket, UnixSocket) {
        var sv: [Int32] = [-1, -1]
        _ = try syscallRetryingEINTR { socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &sv) }
        return (UnixSocket(adopting: FileDescriptor(adopting: sv[0])),
                UnixSocket(adopting: FileDescriptor(adopting: sv[1])))
    }

    public func shutdown(write: Bool = true, read: Bool = true) {
        let how: Int32 = write && read ? Int32(SHUT_RDWR) : (write ? Int32(SHUT_WR) : Int32(SHUT_RD))
        _ = Glibc.shutdown(fd.rawValue, how)
    }

    public func close() { fd.close() }
}

/// A listening AF_UNIX socket created 0600; the path is removed on `close()`.
public final class UnixListener: @unchecked Sendable {
    public let fd: FileDescriptor
    public let path: String
    private var removed = false

    /// Bind and listen at `path`. An existing socket file is replaced only if nothing is
    /// listening on it (a stale socket from a crashed server); a live one gives EADDRINUSE.
    public init(path: String, backlog: Int32 = 1) throws {
        self.path = path
        var st = stat()
        if lstat(path, &st) == 0 {
            guard (st.st_mode & S_IFMT) == S_IFSOCK else { throw Errno(EEXIST) }
            if (try? UnixSocket.connect(path: path)) != nil { throw Errno(EADDRINUSE) }
            unlink(path)
        }
        let raw = try syscallRetryingEINTR { socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0) }
        fd = FileDescriptor(adopting: raw)
        // The socket file takes its mode from the umask at bind time: make it 0600 from birth,
        // so there is no window in which another user could connect.
        // It is bound under a temporary name and renamed into place once listening: a client
        // that waits for the path to appear must never find it before connect() can succeed
        // (between bind and listen, connect answers ECONNREFUSED).
        let dir = path.lastIndex(of: "/").map { String(path[..<$0]) } ?? "."
        let temporary = "\(dir)/.vl-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        let bindAt = temporary.utf8.count < 108 ? temporary : path
        let oldMask = umask(0o177)
        let rc = bindAt.withCString { vl_unix_bind(raw, $0) }
        let bindErr = Errno.current
        umask(oldMask)
        if rc != 0 { throw bindErr }
        do {
            _ = try syscallRetryingEINTR { chmod(bindAt, 0o600) }
            _ = try syscallRetryingEINTR { listen(raw, backlog) }
            if bindAt != path { _ = try syscallRetryingEINTR { rename(bindAt, path) } }
        } catch {
            unlink(bindAt)
            throw error
        }
    }

    /// A listening socket received from another process (live update); `close()` removes
    /// `path` as usual, `relinquish()` does not.
    public init(adopting fd: FileDescriptor, path: String) {
        self.fd = fd
        self.path = path
    }

    /// Close this process's descriptor but leave the socket file: another process listens on it.
    public func relinquish() {
        removed = true
        fd.close()
    }

    /// Accept one connection, or nil if `timeoutMilliseconds` passes (or `cancel` becomes readable).
    public func accept(timeoutMilliseconds: Int32 = -1, cancel: FileDescriptor? = nil) throws -> UnixSocket? {
        var watch = [fd.rawValue]
        if let c = cancel { watch.append(c.rawValue) }
        guard let which = try Poll.waitAnyReadable(watch, timeoutMilliseconds: timeoutMilliseconds), which == 0 else {
            return nil
        }
        let raw = try syscallRetryingEINTR { vl_accept(fd.rawValue) }
        return UnixSocket(adopting: FileDescriptor(adopting: raw))
    }

    public func close() {
        fd.close()
        if !removed { removed = true; unlink(path) }
    }

    deinit { close() }
}
