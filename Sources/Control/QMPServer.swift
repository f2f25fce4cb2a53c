import Glibc
import SystemCalls
import VFIOUser

/// A QMP error: the class and description QEMU would give.
public struct QMPError: Error {
    public var errorClass: String
    public var desc: String
    public init(_ desc: String, class c: String = "GenericError") { errorClass = c; self.desc = desc }
}

public protocol QMPHandler: AnyObject {
    func execute(_ command: String, arguments: JSONValue?) throws -> JSONValue
}

/// The QMP protocol on a UNIX socket (0600): greeting, capabilities negotiation, commands
/// with ids, errors, asynchronous events. Several clients may connect at once.
public final class QMPServer: @unchecked Sendable {
    private let listener: UnixListener
    private weak var handler: QMPHandler?
    private let stopEvent: EventFD
    private var acceptThread: OSThread?
    private final class Client { let socket: UnixSocket; var negotiated = false; init(_ s: UnixSocket) { socket = s } }
    private var clients: [Client] = []
    private let lock = Mutex()

    public init(path: String, handler: QMPHandler) throws {
        listener = try UnixListener(path: path, backlog: 8)
        self.handler = handler
        stopEvent = try EventFD()
    }

    /// Serve on a listening socket a predecessor VMM handed over (live update): clients that
    /// connected meanwhile wait in its backlog, and none sees "connection refused".
    public init(adopting fd: FileDescriptor, path: String, handler: QMPHandler) throws {
        listener = UnixListener(adopting: fd, path: path)
        self.handler = handler
        stopEvent = try EventFD()
    }

    public var path: String { listener.path }
    public var listenerFD: FileDescriptor { listener.fd }

    /// Stop accepting because a successor now owns the listening socket: the path stays, and
    /// clients already connected are served until this process exits.
    public func relinquishListener() {
        try? stopEvent.signal()
        acceptThread?.join()
        acceptThread = nil
        listener.relinquish()
    }

    public func start() {
        acceptThread = OSThread(name: "qmp-accept") { [self] in
            while true {
                guard let s = try? listener.accept(cancel: stopEvent.fd) else { return }
                let c = Client(s)
                lock.withLock { clients.append(c) }
                _ = OSThread(name: "qmp-client") { [self] in serve(c) }
            }
        }
    }

    public func stop() {
        try? stopEvent.signal()
        acceptThread?.join()
        lock.withLock { for c in clients { c.socket.shutdown() } }
        listener.close()
    }

    private func write(_ c: Client, _ v: JSONValue) {
        let bytes = Array((v.description + "\n").utf8)
        lock.withLock { _ = try? c.socket.send(bytes) }
    }

    /// Send an event to every negotiated client.
    public func emit(_ event: String, data: JSONValue? = nil) {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        var o: [(String, JSONValue)] = [("event", .string(event))]
        if let d = data { o.append(("data", d)) }
        o.append(("timestamp", .object([("seconds", .number(Double(ts.tv_sec))), ("microseconds", .number(Double(ts.tv_nsec / 1000)))])))
        let targets = lock.withLock { clients.filter(\.negotiated) }
        for c in targets { write(c, .object(o)) }
    }

    private func serve(_ c: Client) {
        write(c, .object([("QMP", .object([
            ("version", .object([("qemu", .object([("micro", .number(0)), ("minor", .number(2)), ("major", .number(9))])),
                                 ("package", .string("vfio-live"))])),
            ("capabilities", .array([])),
        ]))]))
        var pending: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 4096)
        defer {
            lock.withLock { clients.removeAll { $0 === c } }
            c.socket.close()
        }
        while true {
            let n = (try? chunk.withUnsafeMutableBytes { try c.socket.fd.read(into: $0) }) ?? 0
            if n <= 0 { return }
            pending += chunk[0..<n]
            guard pending.count <= 1 << 20 else { return }  // a client that never closes an object
            while let (object, rest) = Self.splitObject(pending) {
                pending = rest
                respond(c, object)
            }
        }
    }

    /// The first complete top-level JSON object in `buf`, and what follows it.
    static func splitObject(_ buf: [UInt8]) -> ([UInt8], [UInt8])? {
        var depth = 0, inString = false, escaped = false, start = -1
        for (i, b) in buf.enumerated() {
            if inString {
                if escaped { escaped = false } else if b == UInt8(ascii: "\\") { escaped = true } else if b == UInt8(ascii: "\"") { inString = false }
                continue
            }
            switch b {
            case UInt8(ascii: "\""): inString = true
            case UInt8(ascii: "{"), UInt8(ascii: "["):
                if depth == 0 { start = i }
                depth += 1
            case UInt8(ascii: "}"), UInt8(ascii: "]"):
                depth -= 1
                if depth == 0 && start >= 0 { return (Array(buf[start...i]), Array(buf[(i + 1)...])) }
                if depth < 0 { return (Array(buf[...i]), Array(buf[(i + 1)...])) }
            default: break
            }
        }
        return nil
    }

    private func respond(_ c: Client, _ bytes: [UInt8]) {
        func reply(_ e: QMPError, id: JSONValue?) {
            var o: [(String, JSONValue)] = [("error", .object([("class", .string(e.errorClass)), ("desc", .string(e.desc))]))]
            if let id { o.append(("id", id)) }
            write(c, .object(o))
        }
        guard let msg = try? JSONValue.parse(bytes[...]), case .object = msg else {
            return reply(QMPError("JSON parse error"), id: nil)
        }
        let id = msg["id"]
        guard case let .string(cmd)? = msg["execute"] ?? msg["exec-oob"] else {
            return reply(QMPError("QMP input lacks member 'execute'"), id: id)
        }
        if !c.negotiated {
            guard cmd == "qmp_capabilities" else {
                return reply(QMPError("Expecting capabilities negotiation with 'qmp_capabilities'", class: "CommandNotFound"), id: id)
            }
            c.negotiated = true
            var o: [(String, JSONValue)] = [("return", .object([]))]
            if let id { o.append(("id", id)) }
            return write(c, .object(o))
        }
        if cmd == "qmp_capabilities" {
            return reply(QMPError("Capabilities negotiation is already complete, command ignored", class: "CommandNotFound"), id: id)
        }
        guard let h = handler else { return reply(QMPError("the VM is shutting down"), id: id) }
        do {
            let r = try h.execute(cmd, arguments: msg["arguments"])
            var o: [(String, JSONValue)] = [("return", r)]
            if let id { o.append(("id", id)) }
            write(c, .object(o))
        } catch let e as QMPError {
            reply(e, id: id)
        } catch {
            reply(QMPError("\(error)"), id: id)
        }
    }
}
