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
    /// The arguments as parsed, integers exact (JSONValue's doubles cannot hold QEMU's
    /// "unlimited" 2^64-1, nor any integer above 2^53), and an answer likewise. The default
    /// goes through `execute(_:arguments:)`.
    func execute(_ command: String, exactArguments: QMPValue?) throws -> QMPValue
}

extension QMPHandler {
    public func execute(_ command: String, exactArguments a: QMPValue?) throws -> QMPValue {
        QMPValue(try execute(command, arguments: a?.json))
    }
}

/// The QMP protocol on a UNIX socket (0600): greeting, capabilities negotiation, commands
/// with ids, errors, asynchronous events. Several clients may connect at once.
///
/// Input is read as QEMU 11.1 reads it (QMPStreamer), commands are checked as QEMU's dispatcher
/// and QAPI marshallers check them (QMPSchema), then run in order on the client's own thread.
/// Output goes to the client's own bounded queue, drained by its own writer thread: no lock is
/// held across a write, and a client whose queue overflows (it does not read) is disconnected,
/// never waited on. Events go into every negotiated client's queue.
public final class QMPServer: @unchecked Sendable {
    /// Bytes of replies and events a client may leave unread (beyond the kernel's socket buffer).
    public static let defaultOutputLimit = 1 << 20

    private let listener: UnixListener
    private weak var handler: QMPHandler?
    private let stopEvent: EventFD
    private var acceptThread: OSThread?
    public let schema: QMPSchema
    public let outputLimit: Int

    final class Client: @unchecked Sendable {
        let socket: UnixSocket
        let cond = Condition()
        // Guarded by cond.mutex.
        var negotiated = false
        var queue: [[UInt8]] = []
        var head = 0
        var queuedBytes = 0
        var closing = false, dead = false, writerDone = false
        /// Commands whose handler runs now: their replies are not queued yet.
        var executing = 0
        var listed = false  // in `clients`, with its thread: serving may begin
        var thread: OSThread?  // guarded by the server's lock
        init(_ s: UnixSocket) { socket = s }
    }
    private var clients: [Client] = []
    /// Client threads that have returned, to be joined.
    private var ended: [OSThread] = []
    private let lock = Mutex()
    /// Clients disconnected because they left too much output unread (tests, diagnostics).
    public private(set) var slowClientsDisconnected = 0

    public init(path: String, handler: QMPHandler, schema: QMPSchema = .vfioLive, outputLimit: Int = QMPServer.defaultOutputLimit) throws {
        listener = try UnixListener(path: path, backlog: 8)
        self.handler = handler
        self.schema = schema
        self.outputLimit = outputLimit
        stopEvent = try EventFD()
    }

    /// Serve on a listening socket a predecessor VMM handed over (live update): clients that
    /// connected meanwhile wait in its backlog, and none sees "connection refused".
    public init(adopting fd: FileDescriptor, path: String, handler: QMPHandler, schema: QMPSchema = .vfioLive,
                outputLimit: Int = QMPServer.defaultOutputLimit) throws {
        listener = UnixListener(adopting: fd, path: path)
        self.handler = handler
        self.schema = schema
        self.outputLimit = outputLimit
        stopEvent = try EventFD()
    }

    public var path: String { listener.path }
    public var listenerFD: FileDescriptor { listener.fd }

    /// Stop accepting because a successor now owns the listening socket: the path stays, and
    /// clients already connected are served until this process exits.
    public func relinquishListener() {
        acceptControl.withLock {
            stopAcceptingLocked()
            acceptEnded = true
            listener.relinquish()
        }
    }

    /// Stop accepting for a moment: a live update is about to commit, after which its successor
    /// accepts on the same listening socket. Were both accepting, a client connecting then could
    /// land in this VMM as it leaves (postmigrate) right after another found the successor.
    /// Clients that connect meanwhile wait in the backlog; none is refused.
    public func pauseAccepting() { acceptControl.withLock { stopAcceptingLocked() } }

    /// Accept again after `pauseAccepting` (the live update failed: the VM stays here).
    public func resumeAccepting() {
        acceptControl.withLock {
            guard !acceptEnded else { return }
            do { try startAcceptingLocked() } catch { Log.warning("qmp", "cannot accept QMP clients again: \(error)") }
        }
    }

    /// Guards the accept thread's start and stop (never held by it).
    private let acceptControl = Mutex()
    /// Relinquished or stopped: accepting never resumes.
    private var acceptEnded = false

    private func stopAcceptingLocked() {
        guard let t = acceptThread else { return }
        try? stopEvent.signal()
        t.join()
        acceptThread = nil
        _ = try? stopEvent.consume()
    }

    public func start() throws { try acceptControl.withLock { try startAcceptingLocked() } }

    private func startAcceptingLocked() throws {
        guard acceptThread == nil else { return }
        acceptThread = try OSThread(name: "qmp-accept") { [self] in
            while true {
                guard let s = try? listener.accept(cancel: stopEvent.fd) else { return }
                let c = Client(s)
                // Threads of clients that have gone are joined here, so that a VMM polled by
                // short connections for weeks does not keep one dead thread's stack per poll.
                // The thread is made outside the lock (a shortage can take OSThread 2 s, and
                // events wait on the lock); it serves once the client is listed, so that its
                // end always finds its own thread to hand over for joining.
                let t: OSThread
                do {
                    t = try OSThread(name: "qmp-client") { [self] in
                        c.cond.mutex.withLock { while !c.listed { c.cond.wait() } }
                        serve(c)
                    }
                } catch {
                    // This client is turned away; the VMM and its other clients go on.
                    Log.warning("qmp", "a client is turned away: \(error)")
                    c.socket.close()
                    continue
                }
                let finished: [OSThread] = lock.withLock {
                    clients.append(c)
                    c.thread = t
                    defer { ended.removeAll() }
                    return ended
                }
                c.cond.mutex.withLock { c.listed = true; c.cond.broadcast() }
                for t in finished { t.join() }
            }
        }
    }

    public func stop() {
        acceptControl.withLock { stopAcceptingLocked(); acceptEnded = true }
        lock.withLock { for c in clients { c.socket.shutdown() } }
        listener.close()
    }

    /// Queue one message for `c`; never blocks. Over the limit, the client is cut off.
    private func enqueue(_ c: Client, _ text: String) {
        let bytes = Array((text + "\r\n").utf8)  // QEMU ends each message with CRLF
        let overflow: Bool = c.cond.mutex.withLock {
            if c.dead || c.closing { return false }
            if c.queuedBytes + bytes.count > outputLimit {
                c.dead = true
                c.queue.removeAll(); c.head = 0; c.queuedBytes = 0
                c.cond.broadcast()
                return true
            }
            c.queue.append(bytes)
            c.queuedBytes += bytes.count
            c.cond.broadcast()  // the writer, and any flushOutput waiting on the same condition
            return false
        }
        if overflow {
            // Wakes its writer (EPIPE) and its reader (EOF); neither waits on the peer again.
            c.socket.shutdown()
            lock.withLock { slowClientsDisconnected += 1 }
            Log.info("qmp", "a QMP client left more than \(outputLimit) bytes unread: disconnected")
        }
    }

    /// Wait, at most `timeoutSeconds`, until every client's queued output has been written. A
    /// cpr-exec replaces this process: a reply still queued (to the command that started it)
    /// would be lost, and its client would take the update for refused. That reply may not even
    /// be queued yet (the command's handler starts the update's thread, then returns): a command
    /// still executing counts as output to come.
    public func flushOutput(timeoutSeconds: Double) {
        let deadline = monotonicNanoseconds() + UInt64(max(timeoutSeconds, 0) * 1e9)
        for c in lock.withLock({ clients }) {
            c.cond.mutex.withLock {
                while (c.queuedBytes > 0 || c.executing > 0) && !c.dead && !c.writerDone {
                    let now = monotonicNanoseconds()
                    guard now < deadline else { return }
                    _ = c.cond.wait(timeoutSeconds: Double(deadline - now) / 1e9)
                }
            }
        }
    }

    private func writer(_ c: Client) {
        while true {
            var batch: [UInt8] = []
            let stop: Bool = c.cond.mutex.withLock {
                while c.head == c.queue.count && !c.closing && !c.dead { c.cond.wait() }
                if c.dead || c.head == c.queue.count { return true }
                while c.head < c.queue.count && batch.count < 65536 { batch += c.queue[c.head]; c.head += 1 }
                if c.head > 1024 { c.queue.removeFirst(c.head); c.head = 0 }
                return false
            }
            if stop { break }
            do { try c.socket.send(batch) } catch {
                c.cond.mutex.withLock { c.dead = true }
                c.socket.shutdown()
                break
            }
            c.cond.mutex.withLock { c.queuedBytes -= batch.count; c.cond.broadcast() }
        }
        c.cond.mutex.withLock { c.writerDone = true; c.cond.broadcast() }
    }

    /// Send an event to every negotiated client.
    public func emit(_ event: String, data: JSONValue? = nil) {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        var o: [(String, JSONValue)] = [("event", .string(event))]
        if let d = data { o.append(("data", d)) }
        o.append(("timestamp", .object([("seconds", .number(Double(ts.tv_sec))), ("microseconds", .number(Double(ts.tv_nsec / 1000)))])))
        let text = JSONValue.object(o).description
        let targets = lock.withLock { clients }
        for c in targets where c.cond.mutex.withLock({ c.negotiated }) { enqueue(c, text) }
    }

    private func serve(_ c: Client) {
        let writerThread: OSThread
        do { writerThread = try OSThread(name: "qmp-writer") { [self] in writer(c) } } catch {
            Log.warning("qmp", "a client is turned away: \(error)")
            c.socket.close()
            forget(c)
            return
        }
        enqueue(c, JSONValue.object([("QMP", .object([
            ("version", .object([("qemu", .object([("micro", .number(0)), ("minor", .number(2)), ("major", .number(9))])),
                                 ("package", .string("vfio-live"))])),
            ("capabilities", .array([])),
        ]))]).description)
        var streamer = QMPStreamer()
        var chunk = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = (try? chunk.withUnsafeMutableBytes { try c.socket.fd.read(into: $0) }) ?? 0
            if n <= 0 { break }
            if c.cond.mutex.withLock({ c.dead }) { break }
            chunk.withUnsafeBytes { buf in
                streamer.feed(UnsafeRawBufferPointer(rebasing: buf[0..<n])) { out in
                    // A client cut off mid-chunk gets none of its remaining commands run.
                    if c.cond.mutex.withLock({ c.dead }) { return }
                    switch out {
                    case let .value(v): respond(c, v)
                    case let .error(desc): reply(c, QMPError(desc), id: nil)
                    }
                }
            }
        }
        // The peer closed (or was cut off): what is queued for it gets up to a second to go out.
        // The writer broadcasts after every batch, so this waits in a loop for its end, not for
        // the first wake-up (that cut off answers still queued behind the first batch).
        c.cond.mutex.withLock {
            c.closing = true
            c.cond.broadcast()
            let deadline = monotonicNanoseconds() + 1_000_000_000
            while !c.writerDone {
                let now = monotonicNanoseconds()
                guard now < deadline else { break }
                _ = c.cond.wait(timeoutSeconds: Double(deadline - now) / 1e9)
            }
        }
        c.socket.shutdown()
        writerThread.join()
        c.socket.close()
        forget(c)
    }

    /// A client that has gone: off the list, its thread handed over for joining.
    private func forget(_ c: Client) {
        lock.withLock {
            clients.removeAll { $0 === c }
            if let t = c.thread { ended.append(t) }
            c.thread = nil
        }
    }

    private func reply(_ c: Client, _ e: QMPError, id: QMPValue?) {
        var text = "{\"error\": " + JSONValue.object([("class", .string(e.errorClass)), ("desc", .string(e.desc))]).description
        if let id { text += ", \"id\": " + id.text }
        enqueue(c, text + "}")
    }

    /// QEMU's qmp_dispatch: the envelope's members (in QDict order), then the command, then its
    /// arguments (QAPI), then the handler.
    private func respond(_ c: Client, _ msg: QMPValue) {
        guard case let .object(members) = msg else { return reply(c, QMPError("QMP input must be a JSON object"), id: nil) }
        let id = msg["id"]
        for key in QEMUHashOrder.qdict(members.map(\.0)) {
            switch (key, msg[key]!) {
            case ("execute", .string), ("arguments", .object), ("id", _): continue
            case ("execute", _): return reply(c, QMPError("QMP input member 'execute' must be a string"), id: id)
            case ("arguments", _): return reply(c, QMPError("QMP input member 'arguments' must be an object"), id: id)
            default: return reply(c, QMPError("QMP input member '\(key)' is unexpected"), id: id)  // exec-oob too: no OOB offered
            }
        }
        guard case let .string(cmd)? = msg["execute"] else { return reply(c, QMPError("QMP input lacks member 'execute'"), id: id) }
        let arguments = msg["arguments"]
        let negotiated = c.cond.mutex.withLock { c.negotiated }
        if !negotiated && cmd != "qmp_capabilities" {
            return reply(c, QMPError("Expecting capabilities negotiation with 'qmp_capabilities'", class: "CommandNotFound"), id: id)
        }
        do {
            try schema.validate(cmd, arguments ?? .object([]))
        } catch let e as QMPError {
            return reply(c, e, id: id)
        } catch {
            return reply(c, QMPError("\(error)"), id: id)
        }
        func ok(_ r: QMPValue) {
            var text = "{\"return\": " + r.compactText
            if let id { text += ", \"id\": " + id.text }
            enqueue(c, text + "}")
        }
        if cmd == "qmp_capabilities" {
            if negotiated {
                return reply(c, QMPError("Capabilities negotiation is already complete, command ignored", class: "CommandNotFound"), id: id)
            }
            // The greeting offers no capability (no out-of-band execution): enabling one fails,
            // in the words of QEMU's qmp_caps_accept.
            if case let .array(list)? = arguments?["enable"], !list.isEmpty {
                let names = list.map { v -> String in if case let .string(s) = v { return s }; return "" }
                return reply(c, QMPError("Capability \(names.joined(separator: ", ")) not available"), id: id)
            }
            c.cond.mutex.withLock { c.negotiated = true }
            return ok(.object([]))
        }
        guard let h = handler else { return reply(c, QMPError("the VM is shutting down"), id: id) }
        c.cond.mutex.withLock { c.executing += 1 }
        // After the reply is queued, so that flushOutput sees one or the other.
        defer { c.cond.mutex.withLock { c.executing -= 1; c.cond.broadcast() } }
        do {
            ok(try h.execute(cmd, exactArguments: arguments))
        } catch let e as QMPError {
            reply(c, e, id: id)
        } catch {
            reply(c, QMPError("\(error)"), id: id)
        }
    }
}

extension QMPValue {
    /// JSON text, with integers exact (ids are echoed as given).
    var text: String {
        switch self {
        case let .int(i): return String(i)
        case let .uint(u): return String(u)
        case let .double(d): return d.isFinite ? JSONValue.number(d).description : (d > 0 ? "1e999" : "-1e999")
        case let .array(a): return "[" + a.map(\.text).joined(separator: ", ") + "]"
        case let .object(m): return "{" + m.map { JSONValue.string($0.0).description + ": " + $0.1.text }.joined(separator: ", ") + "}"
        default: return json.description
        }
    }

    /// JSON text as JSONValue prints it (no spaces), with integers exact.
    public var compactText: String {
        switch self {
        case let .int(i): return String(i)
        case let .uint(u): return String(u)
        case let .array(a): return "[" + a.map(\.compactText).joined(separator: ",") + "]"
        case let .object(m): return "{" + m.map { JSONValue.string($0.0).description + ":" + $0.1.compactText }.joined(separator: ",") + "}"
        default: return json.description
        }
    }
}
