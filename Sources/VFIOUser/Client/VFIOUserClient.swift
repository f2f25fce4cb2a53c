import Glibc
import SystemCalls
import VFIO

/// Errors the client reports, each as a message a VMM user can act on.
public enum VFIOUserClientError: Error, CustomStringConvertible, Equatable {
    /// The server replied with ERROR and this errno.
    case remote(command: VFIOUserCommand, errno: Errno)
    /// The server broke the protocol (mismatched reply, short payload...).
    case protocolViolation(String)
    /// The server closed the connection.
    case disconnected
    /// The connection was handed over to another VMM process (live update).
    case handedOver
    /// The connection cannot be handed over now, for this reason.
    case handoverRefused(String)
    /// The server sent nothing for `seconds` while we waited for its reply to `command` (or it
    /// did not drain what we sent). Given up between messages, later calls fail with it until
    /// the server's late reply came (then it is dropped and the connection works again); given
    /// up part-way through a message, the connection is out of step for good.
    case timeout(command: VFIOUserCommand, seconds: Double)
    /// The wait for `command` was given up because the cancel descriptor became readable.
    case cancelled(command: VFIOUserCommand)
    /// The server kept sending its own commands (DMA requests, or ones we refused) for
    /// `seconds` without answering `command`. Given up as `timeout` is.
    case busy(command: VFIOUserCommand, seconds: Double)

    public var description: String {
        switch self {
        case let .remote(c, e): return "server refused \(c): \(e) (the server's log says why)"
        case let .protocolViolation(s): return "protocol violation: \(s)"
        case .disconnected: return "server closed the connection"
        case .handedOver: return "the device connection was handed over to another VMM process (live update)"
        case let .handoverRefused(why): return "the device connection cannot be handed over: \(why)"
        case let .timeout(c, s): return "the server did not answer \(c) within \(formatSeconds(s)) s"
        case let .cancelled(c): return "cancelled while waiting for the server to answer \(c)"
        case let .busy(c, s): return "the server kept sending its own commands for \(formatSeconds(s)) s without answering \(c)"
        }
    }
    public var errno: Errno? { if case let .remote(_, e) = self { return e }; return nil }
}

/// Local memory the client mapped for DMA: used to serve DMA_READ/DMA_WRITE messages, and to log
/// the pages the client writes on the server's behalf (the server cannot see those).
final class ClientDMAMemory: @unchecked Sendable {
    struct Entry {
        let iova: UInt64, size: UInt64, base: UnsafeMutableRawPointer, writable: Bool
        /// Offset in the fd the server was given (nil: served by DMA_READ/WRITE messages).
        let fdOffset: UInt64?
        var dirty: DirtyBitmap?
    }
    private var entries: [Entry] = []
    private let lock = Mutex()
    var loggingPageSize: UInt64?

    func add(_ e: Entry) { lock.withLock { var e = e; if let ps = loggingPageSize { e.dirty = DirtyBitmap(pageSize: ps, length: e.size) }; entries.append(e) } }
    func remove(iova: UInt64, size: UInt64) { lock.withLock { entries.removeAll { $0.iova == iova && $0.size == size } } }
    func removeAll() { lock.withLock { entries = [] } }
    var all: [Entry] { lock.withLock { entries } }
    func startLogging(pageSize: UInt64) {
        lock.withLock { loggingPageSize = pageSize; for i in entries.indices { entries[i].dirty = DirtyBitmap(pageSize: pageSize, length: entries[i].size) } }
    }
    func stopLogging() { lock.withLock { loggingPageSize = nil; for i in entries.indices { entries[i].dirty = nil } } }

    func access(_ addr: UInt64, _ count: UInt64, write: Bool, _ body: (UnsafeMutableRawPointer) -> Void) throws {
        try lock.withLock {
            guard let e = entries.first(where: { addr >= $0.iova && addr - $0.iova < $0.size && count <= $0.size - (addr - $0.iova) }) else {
                throw Errno.EFAULT
            }
            if write && !e.writable { throw Errno.EACCES }
            body(e.base + Int(addr - e.iova))
            if write { e.dirty?.mark(offset: addr - e.iova, length: count) }
        }
    }

    /// Bits for pages the client itself wrote in [iova, iova+length), read-and-clear.
    func take(iova: UInt64, length: UInt64, pageSize: UInt64) -> [UInt64] {
        let pages = (length + pageSize - 1) / pageSize
        var out = [UInt64](repeating: 0, count: Int((pages + 63) / 64))
        lock.withLock {
            for e in entries {
                guard let d = e.dirty, e.iova < iova + length, e.iova + e.size > iova else { continue }
                let lo = max(e.iova, iova), hi = min(e.iova + e.size, iova + length)
                let sub = d.take(offset: lo - e.iova, length: hi - lo, reportPageSize: pageSize)
                out.orBits(sub, atBit: (lo - iova) / pageSize, limit: pages)
            }
        }
        return out
    }
}

/// An mmap'd view of a device region (from GET_REGION_INFO's fd and sparse areas).
public final class RegionMapping: @unchecked Sendable {
    public let index: UInt32
    public let areas: [(offset: UInt64, size: UInt64, memory: MappedRegion)]
    /// Mapped with PROT_WRITE (the region's WRITE flag). A store through a read-only mapping is
    /// SIGSEGV, so writes to a read-only region go to the server, which refuses them.
    public let writable: Bool
    init(index: UInt32, areas: [(UInt64, UInt64, MappedRegion)], writable: Bool) {
        self.index = index; self.areas = areas.map { ($0.0, $0.1, $0.2) }; self.writable = writable
    }

    /// A pointer to [offset, offset+count) if it lies inside one mmap'd area.
    public func pointer(offset: UInt64, count: Int) -> UnsafeMutableRawPointer? {
        for a in areas where offset >= a.offset && offset - a.offset + UInt64(count) <= a.size {
            return a.memory.base + Int(offset - a.offset)
        }
        return nil
    }
}

/// The VMM side of vfio-user: connects, negotiates, and drives a device. Calls are synchronous
/// and serialized; server→client DMA commands are served inline (main socket) or by a thread
/// on the twin socket. Works with libvfio-user's documented deviations.
public final class VFIOUserClient: @unchecked Sendable {
    public struct Options: Sendable {
        public var offerTwinSocket = true
        public var maxMessageFDs: UInt64 = 8
        /// Relay device state between two servers with splice(2) (the data never enters user
        /// space); off, or refused by the kernel, it is received into a buffer and sent on.
        public var spliceRelay = true
        public var maxDataXferSize: UInt64 = Capabilities.defaultMaxDataXferSize
        /// Send libvfio-user's `migration: {pgsize: 4096}` (it accepts the absence as well).
        public var offerMigrationCapability = false
        public var offerWriteMultiple = true
        public var minor: UInt16 = 2
        /// The longest the client waits on the server, for anything: the connect, the VERSION
        /// reply, every reply, a send the server does not drain, the twin socket. A server that
        /// stays silent this long fails the call with `.timeout` (10 s: a dma-engine answers
        /// any command within milliseconds; a migration's largest step within a second).
        public var timeoutMilliseconds: Int32 = 10_000
        /// A descriptor (an eventfd a SIGINT/SIGTERM handler writes) that, once readable, makes
        /// a wait on the server give up with `.cancelled`. Can be changed with `setCancel(_:)`.
        public var cancel: Int32?
        public init() {}
    }

    public let connection: VFIOUserConnection
    public let options: Options
    public private(set) var serverCapabilities = Capabilities()
    public private(set) var serverVersion: (major: UInt16, minor: UInt16) = (0, 0)
    public private(set) var serverJSON: String?
    public private(set) var twinSocketActive = false
    private var twin: VFIOUserConnection?
    private var twinThread: OSThread?
    /// Stops the twin-socket reader without shutting the socket down (it may be shared with a
    /// successor process).
    private let twinCancel: EventFD
    let callLock = Mutex()
    /// Set while (or after) the connection belongs to a successor process: calls are refused
    /// and `close()` must not shut the shared socket down.
    var handedOver = false
    /// The server's VERSION reply payload, kept for a successor process to adopt.
    private var versionReply: [UInt8] = []
    let dmaMemory = ClientDMAMemory()
    private var regionMappings: [UInt32: RegionMapping] = [:]
    /// Number of DMA_READ/WRITE messages served for the server.
    public private(set) var dmaMessagesServed: UInt64 = 0
    /// Set when the stream is out of step (a message cut part-way, a reply that cannot be
    /// read off): every later call fails with it, for good.
    var broken: VFIOUserClientError?
    /// A wait given up between messages (timeout, cancel), and the ids whose replies the
    /// server still owes. As QEMU's vfio-user proxy does (hw/vfio-user/proxy.c: a timed-out
    /// request leaves the pending list, a reply to it is an "unexpected reply" that is dropped,
    /// and the connection stays up), such a reply is dropped when it comes; until then every
    /// call fails at once with `cutWait` (a hung server is not waited for again by each call of
    /// a rollback), and once the server has answered all it owes the connection works again.
    var cutWait: VFIOUserClientError?
    var owedReplies: [UInt16] = []
    /// Under its own lock: it can be changed while a call waits (it is read at every poll).
    private var cancelStorage: Int32?
    private let cancelLock = Mutex()
    var cancelFD: Int32? {
        get { cancelLock.withLock { cancelStorage } }
        set { cancelLock.withLock { cancelStorage = newValue } }
    }

    /// Connect to the server at `path` and negotiate, within `options.timeoutMilliseconds`
    /// each. A connect that times out throws ETIMEDOUT, a cancelled one ECANCELED.
    public convenience init(path: String, options: Options = Options()) throws {
        try self.init(socket: UnixSocket.connect(path: path, timeoutMilliseconds: options.timeoutMilliseconds, cancel: options.cancel),
                      options: options)
    }

    public init(socket: UnixSocket, options: Options = Options()) throws {
        self.options = options
        cancelStorage = options.cancel
        connection = VFIOUserConnection(socket: socket, maxReceiveFDs: Int(options.maxMessageFDs),
                                        maxMessageSize: Int(options.maxDataXferSize) + 64 * 1024 + 64 * 1024 * 1024)
        twinCancel = try EventFD(nonBlocking: true)
        try socket.setTimeouts(milliseconds: options.timeoutMilliseconds)
        socket.setSendBuffer()
        try negotiate()
    }

    /// Watch another cancel descriptor from now on, or none (e.g. once a VM is set up, so that
    /// its orderly shutdown can still talk to the device). A call already waiting picks it up
    /// within a poll slice (at most a second).
    public func setCancel(_ fd: Int32?) { cancelFD = fd }
    /// The cancel descriptor watched now (a migration swaps in its own and gives this back).
    public var cancelDescriptor: Int32? { cancelFD }

    deinit { close() }

    /// Close the connection. A connection handed over to a successor is only closed here (its
    /// descriptors), never shut down: the successor's copies must keep working.
    public func close() {
        let shared = callLock.withLock { handedOver }
        // Stop the twin reader before its socket goes: a poll on a closed descriptor never
        // reports it readable, so the reader would wait forever.
        stopTwinReader()
        if shared {
            twin?.socket.close()
            connection.socket.close()
        } else {
            twin?.close()
            connection.close()
        }
        twin = nil
    }

    private func negotiate() throws {
        var caps = Capabilities()
        caps.maxMessageFDs = options.maxMessageFDs
        caps.maxDataXferSize = options.maxDataXferSize
        if options.offerTwinSocket { caps.twinSocket = .init(supported: true) }
        if options.offerMigrationCapability { caps.migration = .init(pageSize: 4096) }
        if options.offerWriteMultiple { caps.writeMultiple = true }
        let req = VersionPayload(major: 0, minor: options.minor, capabilities: caps)
        let reply = try call(.version, req.encode())
        defer { reply.closeFDs() }
        versionReply = reply.payload
        let v: VersionPayload
        do { v = try VersionPayload(decoding: reply.payload[...]) } catch {
            throw VFIOUserClientError.protocolViolation("VERSION reply: \(error)")
        }
        guard v.major == 0 else { throw VFIOUserClientError.protocolViolation("server major version \(v.major), we speak 0") }
        serverVersion = (v.major, v.minor)
        serverCapabilities = v.capabilities
        serverJSON = v.rawJSON
        if let t = v.capabilities.twinSocket, t.supported {
            // An inconsistent twin-socket reply means the connection must be dropped (spec).
            guard options.offerTwinSocket, let idx = t.fdIndex, Int(idx) < reply.fds.count else {
                throw VFIOUserClientError.protocolViolation("server enabled twin_socket without a usable fd")
            }
            let fd = try reply.fds[Int(idx)].duplicate()
            let ts = UnixSocket(adopting: fd)
            // Our replies on the twin socket, and a message the server stops sending half-way,
            // are bounded as on the main socket.
            try ts.setTimeouts(milliseconds: options.timeoutMilliseconds)
            let c = VFIOUserConnection(socket: ts, maxReceiveFDs: 0, maxMessageSize: Int(options.maxDataXferSize) + 4096)
            twin = c
            twinSocketActive = true
            try startTwinReader()
        }
    }

    /// Signal `twinCancel` and wait for the twin reader to end (it leaves `twinCancel`
    /// signalled; `reclaimAfterHandover` consumes it before starting a new reader).
    private func stopTwinReader() {
        try? twinCancel.signal()
        twinThread?.join()
        twinThread = nil
    }

    /// Serve server→client commands arriving on the twin socket until it closes or
    /// `twinCancel` is signalled.
    private func startTwinReader() throws {
        guard let c = twin else { return }
        let cancel = twinCancel
        twinThread = try OSThread(name: "vfu-twin") { [weak self, c, cancel] in
            while true {
                // The cancel descriptor first: poll reports the first readable one, and a server
                // that keeps sending must not keep the reader from stopping.
                guard let which = try? Poll.waitAnyReadable([cancel.fd.rawValue, c.socket.fd.rawValue], timeoutMilliseconds: -1),
                      which == 1, let msg = try? c.receive() else { return }
                guard let self else { return }
                self.serveServerCommand(msg, on: c)
            }
        }
    }

    /// Largest transfer per message: what the server accepts, and at most what we said we do.
    public var maxTransfer: Int { Int(min(serverCapabilities.maxDataXferSize, options.maxDataXferSize)) }

    // MARK: calls

    /// Send one command and wait for its reply, serving any server command that arrives first.
    public func call(_ cmd: VFIOUserCommand, _ payload: [UInt8], fds: [Int32] = []) throws -> Message {
        try payload.withUnsafeBytes { try call(cmd, [$0], fds: fds) }
    }

    public func call(_ cmd: VFIOUserCommand, _ payload: [UnsafeRawBufferPointer], fds: [Int32] = []) throws -> Message {
        try callLock.withLock {
            if handedOver { throw VFIOUserClientError.handedOver }
            if let b = broken { throw b }
            try settleOwedReplies()
            let id = connection.allocateID()
            do {
                try connection.send(id: id, command: cmd.rawValue, flags: MessageHeader.typeCommand, payload: payload, fds: fds)
            } catch { throw transportError(error, cmd) }
            var bound = replyBound()
            while true {
                do { try awaitReadable(cmd, bound) } catch {
                    if cutWait != nil { owedReplies.append(id) }
                    throw error
                }
                let m: Message
                do { m = try connection.receive(deadline: bound.overall) } catch { throw transportError(error, cmd) }
                if m.header.isCommand {
                    serveServerCommand(m, on: connection)
                    bound.served()
                    continue
                }
                guard m.header.messageID == id, m.header.command == cmd.rawValue else {
                    m.closeFDs()
                    throw VFIOUserClientError.protocolViolation("\(cmd) (id \(id)): got a reply for command \(m.header.command) id \(m.header.messageID)")
                }
                if m.header.isError {
                    m.closeFDs()
                    // libvfio-user: an errno outside 1..4096 is treated as EINVAL.
                    let e = m.header.errorNumber
                    throw VFIOUserClientError.remote(command: cmd, errno: Errno(e >= 1 && e <= 4096 ? Int32(e) : EINVAL))
                }
                return m
            }
        }
    }

    // MARK: waiting on the main socket (callLock held), shared by `call` and the migration pipeline

    private var timeoutSeconds: Double { Double(options.timeoutMilliseconds) / 1000 }

    /// When the server's silence turns into a timeout, counted from now.
    func replyDeadline() -> UInt64 { monotonicNanoseconds() + UInt64(options.timeoutMilliseconds) * 1_000_000 }

    /// However busy a server keeps us serving its own commands, one reply is waited for at most
    /// this many times the silence bound (QEMU's proxy bounds each reply's wait outright).
    static let busyReplyFactor: UInt64 = 6

    /// The bounds on the wait for one reply: the server's silence, restarted by each command it
    /// sends us meanwhile (a DMA request shows it is working), and an overall bound that a
    /// server sending commands without end cannot push back (it held the call, and its lock,
    /// for ever).
    struct ReplyBound {
        private let silenceNS: UInt64
        let overall: UInt64
        private(set) var deadline: UInt64
        init(timeoutMilliseconds ms: Int32) {
            silenceNS = UInt64(max(ms, 0)) * 1_000_000
            let now = monotonicNanoseconds()
            deadline = now + silenceNS
            overall = now + silenceNS * VFIOUserClient.busyReplyFactor
        }
        mutating func served() { deadline = min(monotonicNanoseconds() + silenceNS, overall) }
        /// The error for a wait that reached `deadline`.
        func expired(_ cmd: VFIOUserCommand) -> VFIOUserClientError {
            deadline == overall ? .busy(command: cmd, seconds: Double(silenceNS * VFIOUserClient.busyReplyFactor) / 1e9)
                                : .timeout(command: cmd, seconds: Double(silenceNS) / 1e9)
        }
    }

    func replyBound() -> ReplyBound { ReplyBound(timeoutMilliseconds: options.timeoutMilliseconds) }

    func awaitReadable(_ cmd: VFIOUserCommand, _ bound: ReplyBound) throws {
        try awaitReadable(cmd, deadline: bound.deadline, expired: bound.expired(cmd))
    }

    /// Wait until the main socket is readable, in slices of at most 250 ms so that the cancel
    /// descriptor is honoured, up to `deadline`. A give-up sets `cutWait`: the caller adds the
    /// ids it is owed to `owedReplies` (between messages the stream is still in step; a caller
    /// waiting part-way through a message marks the connection broken instead).
    func awaitReadable(_ cmd: VFIOUserCommand, deadline: UInt64, expired: VFIOUserClientError? = nil) throws {
        while true {
            var watch = [connection.socket.fd.rawValue]
            if let c = cancelFD { watch.append(c) }
            let now = monotonicNanoseconds()
            guard now < deadline else { throw cut(expired ?? .timeout(command: cmd, seconds: timeoutSeconds)) }
            let ms = Int32(min((deadline - now) / 1_000_000 + 1, 250))
            switch try Poll.waitAnyReadable(watch, timeoutMilliseconds: ms) {
            case nil: continue
            case 1?: throw cut(.cancelled(command: cmd))
            default: return
            }
        }
    }

    private func cut(_ e: VFIOUserClientError) -> VFIOUserClientError {
        if cutWait == nil { cutWait = e }
        return e
    }

    /// Messages read at most, before one request, to settle owed replies.
    static let settleBudget = 256

    /// Before a new request: read off the late replies to requests whose wait was given up,
    /// without waiting for any (a server that still owes one fails the call at once with the
    /// give-up's error). Server commands among them are served; a reply nobody asked for is
    /// dropped, as QEMU's proxy does. Reading part of a message bounds the rest by
    /// SO_RCVTIMEO; a failure there leaves the stream out of step (broken).
    func settleOwedReplies() throws {
        guard let cutError = cutWait else { return }
        // A budget, as for any wait: a server that sends its own commands or stray replies
        // without end leaves the replies owed, and the call fails with the give-up's error.
        var budget = Self.settleBudget
        while !owedReplies.isEmpty {
            budget -= 1
            guard budget >= 0, (try? Poll.waitReadable(connection.socket.fd, timeoutMilliseconds: 0)) == true else { throw cutError }
            let m: Message
            do { m = try connection.receive() } catch {
                if Self.isDisconnect(error) { throw markBroken(.disconnected) }
                throw markBroken(.protocolViolation("reading the server's late reply (after: \(cutError)): \(error)"))
            }
            if m.header.isCommand { serveServerCommand(m, on: connection); continue }
            m.closeFDs()
            if let i = owedReplies.firstIndex(of: m.header.messageID) {
                owedReplies.remove(at: i)
                Log.debug("vfio-user", "dropped the late reply to id \(m.header.messageID) (command \(m.header.command)) after \(cutError)")
            } else {
                Log.warning("vfio-user", "dropped a reply to id \(m.header.messageID) (command \(m.header.command)) that no request is waiting for")
            }
        }
        cutWait = nil
        Log.info("vfio-user", "the server answered what it owed after \(cutError): the connection works again")
    }

    func markBroken(_ e: VFIOUserClientError) -> VFIOUserClientError {
        broken = e
        return e
    }

    /// The one mapping of a send or receive failure on the main socket to what callers see.
    /// EAGAIN is SO_SNDTIMEO / SO_RCVTIMEO firing part-way through a message (the server
    /// stopped reading, or stopped sending mid-message): the stream is out of step for good.
    /// The server went away: its end closed (a clean EOF between messages is ECONNRESET) or
    /// reset, or the stream ended part-way through a message.
    static func isDisconnect(_ e: Error) -> Bool {
        guard let e = e as? Errno else { return false }
        return e == .EPIPE || e == .ECONNRESET || e == .EPROTO
    }

    func transportError(_ e: Error, _ cmd: VFIOUserCommand) -> Error {
        if Self.isDisconnect(e) { return VFIOUserClientError.disconnected }
        if let e = e as? Errno {
            if e == .EAGAIN { return markBroken(.timeout(command: cmd, seconds: timeoutSeconds)) }
        }
        if let f = e as? FramingError { return VFIOUserClientError.protocolViolation("reply to \(cmd): \(f.reason)") }
        return e
    }

    /// Serve DMA_READ / DMA_WRITE from the server against the memory we mapped.
    func serveServerCommand(_ m: Message, on c: VFIOUserConnection) {
        m.closeFDs()
        let h = m.header
        do {
            guard let cmd = h.knownCommand, cmd == .dmaRead || cmd == .dmaWrite else { throw Errno.EINVAL }
            let a = try DMAAccess(decoding: m.payload[...], context: "\(cmd)")
            guard a.count <= options.maxDataXferSize else { throw Errno.E2BIG }
            if cmd == .dmaRead {
                var out = [UInt8](repeating: 0, count: Int(a.count))
                try dmaMemory.access(a.address, a.count, write: false) { p in out.withUnsafeMutableBytes { $0.copyMemory(from: UnsafeRawBufferPointer(start: p, count: Int(a.count))) } }
                try c.sendReply(to: h, payload: DMAAccess(address: a.address, count: a.count).encode() + out)
            } else {
                guard a.data.count == Int(a.count) else { throw Errno.EINVAL }
                try dmaMemory.access(a.address, a.count, write: true) { p in a.data.withUnsafeBytes { p.copyMemory(from: $0.baseAddress!, byteCount: $0.count) } }
                try c.sendReply(to: h, payload: DMAAccess(address: a.address, count: a.count).encode())
            }
            dmaMessagesServed &+= 1
        } catch {
            let e = (error as? Errno) ?? .EINVAL
            if h.wantsReply { try? c.sendError(to: h, errno: e) }
        }
    }

    // MARK: device info

    public func deviceInfo() throws -> DeviceInfo {
        let r = try call(.deviceGetInfo, DeviceInfo(flags: 0, regionCount: 0, irqCount: 0).encode())
        do { return try DeviceInfo(decoding: r.payload[...]) } catch { throw VFIOUserClientError.protocolViolation("\(error)") }
    }

    /// GET_REGION_INFO, growing argsz when the server says the reply needs more (caps + fd).
    public func regionInfo(_ index: UInt32) throws -> (info: RegionInfo, fd: FileDescriptor?) {
        var argsz: UInt32 = 32
        for _ in 0..<3 {
            let r = try call(.deviceGetRegionInfo, RegionInfo(argsz: argsz, flags: [], index: index, size: 0).encodeRequest())
            let info: RegionInfo
            do { info = try RegionInfo(decoding: r.payload[...]) } catch {
                r.closeFDs(); throw VFIOUserClientError.protocolViolation("\(error)")
            }
            if info.argsz > argsz && info.argsz <= 64 * 1024 {
                r.closeFDs(); argsz = info.argsz; continue
            }
            var fds = r.fds
            let fd = fds.isEmpty ? nil : fds.removeFirst()
            for f in fds { f.close() }
            return (info, fd)
        }
        throw VFIOUserClientError.protocolViolation("GET_REGION_INFO argsz did not converge")
    }

    public func irqInfo(_ index: UInt32) throws -> IRQInfo {
        let r = try call(.deviceGetIRQInfo, IRQInfo(flags: [], index: index, count: 0).encode())
        do { return try IRQInfo(decoding: r.payload[...]) } catch { throw VFIOUserClientError.protocolViolation("\(error)") }
    }

    public func regionIOFDs(_ index: UInt32) throws -> (RegionIOFDsReply, [FileDescriptor]) {
        let r = try call(.deviceGetRegionIOFDs, RegionIOFDsRequest(argsz: 16 + 48 * 64, index: index).encode())
        do { return (try RegionIOFDsReply(decoding: r.payload[...]), r.fds) } catch {
            r.closeFDs(); throw VFIOUserClientError.protocolViolation("\(error)")
        }
    }

    // MARK: region access

    /// mmap the region's areas if the server offers an fd; nil when it does not.
    @discardableResult
    public func mapRegion(_ index: UInt32) throws -> RegionMapping? {
        if let m = regionMappings[index] { return m }
        let (info, fd) = try regionInfo(index)
        guard let fd, info.flags.contains(.mmap) else { fd?.close(); return nil }
        defer { fd.close() }
        var areas: [(UInt64, UInt64, MappedRegion)] = []
        for a in info.sparseAreas ?? [SparseMMapArea(offset: 0, size: info.size)] where a.size > 0 {
            areas.append((a.offset, a.size, try MappedRegion(fd: fd, offset: info.offset + a.offset, length: Int(a.size),
                                                             writable: info.flags.contains(.write))))
        }
        let m = RegionMapping(index: index, areas: areas, writable: info.flags.contains(.write))
        regionMappings[index] = m
        return m
    }

    public func regionRead(_ index: UInt32, offset: UInt64, count: Int) throws -> [UInt8] {
        var out = [UInt8](repeating: 0, count: count)
        try out.withUnsafeMutableBytes { try regionRead(index, offset: offset, into: $0) }
        return out
    }

    public func regionRead(_ index: UInt32, offset: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws {
        if let m = regionMappings[index], let p = m.pointer(offset: offset, count: buffer.count) {
            buffer.copyMemory(from: UnsafeRawBufferPointer(start: p, count: buffer.count))
            return
        }
        var done = 0
        while done < buffer.count || buffer.count == 0 {
            let n = min(maxTransfer, buffer.count - done)
            let req = RegionAccess(offset: offset + UInt64(done), region: index, count: UInt32(n)).encode()
            let r = try call(.regionRead, req)
            let a = try RegionAccess(decoding: r.payload[...], context: "REGION_READ reply")
            guard a.data.count >= n else { throw VFIOUserClientError.protocolViolation("REGION_READ returned \(a.data.count) of \(n) bytes") }
            a.data.prefix(n).withUnsafeBytes { UnsafeMutableRawBufferPointer(rebasing: buffer[done..<done + n]).copyMemory(from: $0) }
            done += n
            if buffer.count == 0 { break }
        }
    }

    public func regionWrite(_ index: UInt32, offset: UInt64, _ data: [UInt8]) throws {
        try data.withUnsafeBytes { try regionWrite(index, offset: offset, from: $0) }
    }

    public func regionWrite(_ index: UInt32, offset: UInt64, from data: UnsafeRawBufferPointer) throws {
        if let m = regionMappings[index], m.writable, let p = m.pointer(offset: offset, count: data.count) {
            p.copyMemory(from: data.baseAddress!, byteCount: data.count)
            return
        }
        var done = 0
        repeat {
            let n = min(maxTransfer, data.count - done)
            var w = WireWriter(capacity: 16); w.u64(offset + UInt64(done)); w.u32(index); w.u32(UInt32(n))
            let head = w.bytes
            _ = try head.withUnsafeBytes { h in try call(.regionWrite, [h, UnsafeRawBufferPointer(rebasing: data[done..<done + n])]) }
            done += n
        } while done < data.count
    }

    public func read32(_ index: UInt32, _ offset: UInt64) throws -> UInt32 {
        let b = try regionRead(index, offset: offset, count: 4)
        return UInt32(b[0]) | UInt32(b[1]) << 8 | UInt32(b[2]) << 16 | UInt32(b[3]) << 24
    }
    public func write32(_ index: UInt32, _ offset: UInt64, _ v: UInt32) throws {
        try regionWrite(index, offset: offset, [UInt8(v & 0xff), UInt8(v >> 8 & 0xff), UInt8(v >> 16 & 0xff), UInt8(v >> 24)])
    }
    public func read64(_ index: UInt32, _ offset: UInt64) throws -> UInt64 {
        UInt64(try read32(index, offset)) | UInt64(try read32(index, offset + 4)) << 32
    }
    public func write64(_ index: UInt32, _ offset: UInt64, _ v: UInt64) throws {
        var w = WireWriter(); w.u64(v)
        try regionWrite(index, offset: offset, w.bytes)
    }

    // MARK: DMA

    /// Map `size` bytes of client memory at `iova`. With `fd` the server mmaps it directly
    /// (the fast path); without, the server uses DMA_READ/DMA_WRITE messages that we serve from
    /// `local`.
    public func mapDMA(iova: UInt64, size: UInt64, local: UnsafeMutableRawPointer, fd: FileDescriptor?, offset: UInt64 = 0,
                       writable: Bool = true) throws {
        let flags: DMAMapFlags = writable ? [.read, .write] : [.read]
        dmaMemory.add(.init(iova: iova, size: size, base: local, writable: writable, fdOffset: fd == nil ? nil : offset, dirty: nil))
        do {
            _ = try call(.dmaMap, DMAMapRequest(flags: flags, offset: fd == nil ? 0 : offset, address: iova, size: size).encode(),
                         fds: fd.map { [$0.rawValue] } ?? [])
        } catch {
            dmaMemory.remove(iova: iova, size: size)
            throw error
        }
    }

    /// DMA_UNMAP; with `dirtyPageSize`, returns the dirty bitmap of the range (server's bits OR
    /// the pages we wrote for it through DMA_WRITE messages).
    @discardableResult
    public func unmapDMA(iova: UInt64, size: UInt64, dirtyPageSize: UInt64? = nil) throws -> [UInt64]? {
        guard let ps = dirtyPageSize else {
            _ = try call(.dmaUnmap, DMAUnmapRequest(address: iova, size: size).encode())
            dmaMemory.remove(iova: iova, size: size)
            return nil
        }
        let need = DirtyBitmap.byteCount(pages: (size + ps - 1) / ps)
        let req = DMAUnmapRequest(argsz: UInt32(40 + need), flags: .getDirtyBitmap, address: iova, size: size,
                                  bitmap: .init(pageSize: ps, size: UInt64(need)))
        let r = try call(.dmaUnmap, req.encode())
        guard r.payload.count >= 40 + need else {
            throw VFIOUserClientError.protocolViolation("DMA_UNMAP reply has \(r.payload.count) bytes, bitmap needs \(40 + need)")
        }
        var words = [UInt64](littleEndianBitmap: r.payload[40..<(40 + need)])
        let own = dmaMemory.take(iova: iova, length: size, pageSize: ps)
        for i in words.indices where i < own.count { words[i] |= own[i] }
        dmaMemory.remove(iova: iova, size: size)
        return words
    }

    public func unmapAllDMA() throws {
        _ = try call(.dmaUnmap, DMAUnmapRequest(flags: .unmapAll, address: 0, size: 0).encode())
        dmaMemory.removeAll()
    }

    // MARK: IRQs

    /// Attach eventfds to vectors [start, start+count) of IRQ `index` (TRIGGER).
    public func setIRQs(index: UInt32, start: UInt32 = 0, eventfds: [EventFD]) throws {
        let req = SetIRQsRequest(flags: [.dataEventFD, .actionTrigger], index: index, start: start, count: UInt32(eventfds.count))
        _ = try call(.deviceSetIRQs, req.encode(), fds: eventfds.map { $0.fd.rawValue })
    }

    /// Disable every vector of IRQ `index`.
    public func disableIRQs(index: UInt32) throws {
        _ = try call(.deviceSetIRQs, SetIRQsRequest(flags: [.dataNone, .actionTrigger], index: index, start: 0, count: 0).encode())
    }

    public func reset() throws { _ = try call(.deviceReset, [UInt8]()) }

    // MARK: DEVICE_FEATURE and migration v2

    /// DEVICE_FEATURE; returns the reply's data (after the 8-byte feature header).
    public func feature(_ index: UInt32, flags: UInt32, data: [UInt8] = [], replyData: Int = 0) throws -> ArraySlice<UInt8> {
        let f = DeviceFeature(argsz: UInt32(8 + max(data.count, replyData)), flags: index | flags, data: data[...])
        let r = try call(.deviceFeature, f.encode())
        guard r.payload.count >= 8 else { throw VFIOUserClientError.protocolViolation("DEVICE_FEATURE reply shorter than 8 bytes") }
        return r.payload[8...]
    }

    public func probeFeature(_ index: UInt32, get: Bool) -> Bool {
        (try? feature(index, flags: DeviceFeature.probe | (get ? DeviceFeature.get : DeviceFeature.set))) != nil
    }

    /// The device's migration flags, or nil if it does not support migration.
    public func migrationCapabilities() throws -> MigrationCapabilities? {
        do {
            var r = WireReader(try feature(DeviceFeature.migration, flags: DeviceFeature.get, replyData: 8), context: "MIGRATION")
            return MigrationCapabilities(rawValue: try r.u64())
        } catch let e as VFIOUserClientError where e.errno == .ENOTTY || e.errno == .EINVAL || e.errno == .ENOSYS {
            return nil
        }
    }

    public func migrationState() throws -> MigrationState {
        var r = WireReader(try feature(DeviceFeature.migDeviceState, flags: DeviceFeature.get, replyData: 8), context: "MIG_DEVICE_STATE")
        let raw = try r.u32()
        guard let s = MigrationState(rawValue: raw) else { throw VFIOUserClientError.protocolViolation("unknown device state \(raw)") }
        return s
    }

    public func setMigrationState(_ s: MigrationState) throws {
        var w = WireWriter(); w.u32(s.rawValue); w.i32(-1)
        _ = try feature(DeviceFeature.migDeviceState, flags: DeviceFeature.set, data: w.bytes)
    }

    public func migrationDataSize() throws -> UInt64 {
        var r = WireReader(try feature(DeviceFeature.migDataSize, flags: DeviceFeature.get, replyData: 8), context: "MIG_DATA_SIZE")
        return try r.u64()
    }

    /// MIG_DATA_READ of at most `max` bytes; a short (or empty) result ends the current data.
    /// Parsed by `size`, never by message size (libvfio-user pads). The data is received
    /// straight into the returned array (no zero fill, no second copy).
    public func readMigrationData(max: Int) throws -> [UInt8] {
        let n = Swift.max(0, min(max, maxTransfer))
        return try [UInt8](unsafeUninitializedCapacity: n) { buf, count in
            count = 0
            count = try readMigrationData(into: UnsafeMutableRawBufferPointer(buf))
        }
    }

    /// MIG_DATA_WRITE of `data`, in messages of at most `maxTransfer` bytes, each sent from
    /// `data` itself (header and data in one sendmsg).
    public func writeMigrationData(_ data: UnsafeRawBufferPointer) throws {
        var done = 0
        while done < data.count {
            let n = min(maxTransfer, data.count - done)
            var w = WireWriter(); w.u32(UInt32(8 + n)); w.u32(UInt32(n))
            let head = w.bytes
            _ = try head.withUnsafeBytes { h in try call(.migDataWrite, [h, UnsafeRawBufferPointer(rebasing: data[done..<done + n])]) }
            done += n
        }
    }

    /// The granularity the server chose at DMA_LOGGING_START (nil when not logging): REPORT
    /// asks for bitmaps at it, and the client converts them to the caller's page size.
    public private(set) var dmaLoggingPageSize: UInt64?
    /// The page sizes a server may choose: powers of two from a 512-byte sector to 1 GiB (a
    /// finer one makes a report's bitmap absurdly large, a coarser one every write a GiB).
    public static let dmaLoggingPageSizes: ClosedRange<UInt64> = 512...(1 << 30)

    /// DMA_LOGGING_START over `ranges`; the client also starts logging its own message writes.
    /// `pageSize` is a hint: the server returns the size it chose (the kernel uAPI's rule;
    /// libvfio-user returns nothing, and the hint stands).
    public func startDMALogging(pageSize: UInt64, ranges: [(iova: UInt64, length: UInt64)]) throws {
        guard pageSize > 0, pageSize & (pageSize - 1) == 0 else { throw Errno(EINVAL) }  // the caller's page size
        var w = WireWriter(); w.u64(pageSize); w.u32(UInt32(ranges.count)); w.u32(0)
        for r in ranges { w.u64(r.iova); w.u64(r.length) }
        let data = try feature(DeviceFeature.dmaLoggingStart, flags: DeviceFeature.set, data: w.bytes)
        var chosen = pageSize
        if !data.isEmpty {
            var r = WireReader(data, context: "DMA_LOGGING_START reply")
            let ps = try? r.u64()
            guard let ps, ps & (ps &- 1) == 0, Self.dmaLoggingPageSizes.contains(ps) else {
                _ = try? feature(DeviceFeature.dmaLoggingStop, flags: DeviceFeature.set)
                throw VFIOUserClientError.protocolViolation(ps.map { "DMA_LOGGING_START: the server chose page size \($0), not a power of two from 512 B to 1 GiB" }
                    ?? "DMA_LOGGING_START reply carries \(data.count) bytes, not a page size")
            }
            chosen = ps
        }
        dmaLoggingPageSize = chosen
        dmaMemory.startLogging(pageSize: pageSize)
    }

    public func stopDMALogging() throws {
        dmaMemory.stopLogging()
        dmaLoggingPageSize = nil
        _ = try feature(DeviceFeature.dmaLoggingStop, flags: DeviceFeature.set)
    }

    /// DMA_LOGGING_REPORT for one range: the server's bits OR the ones we logged ourselves.
    /// Checks the reply length (libvfio-user answers a range spanning two mappings with an
    /// empty success).
    public func dmaLoggingReport(iova: UInt64, length: UInt64, pageSize: UInt64) throws -> [UInt64] {
        guard pageSize > 0, pageSize & (pageSize - 1) == 0 else { throw Errno(EINVAL) }  // the caller's page size
        guard length > 0, length - 1 <= UInt64.max - iova else { throw Errno(EINVAL) }  // an empty or wrapping range
        // At the server's granularity; then re-based to the caller's.
        let ps = dmaLoggingPageSize ?? pageSize
        let need = DirtyBitmap.byteCount(pages: (length + ps - 1) / ps)
        var w = WireWriter(); w.u64(iova); w.u64(length); w.u64(ps)
        let data = try feature(DeviceFeature.dmaLoggingReport, flags: DeviceFeature.get, data: w.bytes, replyData: 24 + need)
        guard data.count >= 24 + need else {
            throw VFIOUserClientError.protocolViolation("DMA_LOGGING_REPORT reply carries \(data.count) bytes, \(24 + need) expected")
        }
        var words = [UInt64](littleEndianBitmap: data[(data.startIndex + 24)..<(data.startIndex + 24 + need)])
        if ps != pageSize { words = Self.rebase(words, from: ps, to: pageSize, length: length) }
        let own = dmaMemory.take(iova: iova, length: length, pageSize: pageSize)
        for i in words.indices where i < own.count { words[i] |= own[i] }
        return words
    }

    /// A bitmap of `length` bytes at page size `from`, as one at page size `to`: a coarser
    /// page's bit sets every finer page it covers, finer pages OR into the coarser one.
    static func rebase(_ words: [UInt64], from: UInt64, to: UInt64, length: UInt64) -> [UInt64] {
        let pages = (length + to - 1) / to
        var out = [UInt64](repeating: 0, count: Int((pages + 63) / 64))
        for (i, word) in words.enumerated() where word != 0 {
            var bits = word
            while bits != 0 {
                let p = UInt64(i * 64 + bits.trailingZeroBitCount)
                bits &= bits - 1
                let start = p * from
                guard start < length else { break }
                let end = min(start + from, length)
                var q = start / to
                while q <= (end - 1) / to { out[Int(q / 64)] |= 1 << (q % 64); q += 1 }
            }
        }
        return out
    }

    // MARK: live update (CPR)

    /// What a successor process needs to drive this connection without renegotiating: the
    /// VERSION reply, the DMA mappings (by offset in the fd the server holds) and the next
    /// message id. The socket, the twin socket and the eventfds travel as descriptors.
    public struct HandoverState: Equatable, Sendable {
        public struct Mapping: Equatable, Sendable {
            public var iova: UInt64, size: UInt64, writable: Bool
            public var fdOffset: UInt64?
        }
        public var versionReply: [UInt8]
        public var nextMessageID: UInt16
        public var twinSocket: Bool
        public var mappings: [Mapping]

        static let magic: UInt32 = 0x4f48_5556  // "VUHO"
        static let maxMappings = 1024

        public func encode() -> [UInt8] {
            var w = WireWriter()
            w.u32(Self.magic); w.u32(1)
            w.u32(UInt32(versionReply.count)); w.append(versionReply)
            w.u16(nextMessageID); w.u8(twinSocket ? 1 : 0)
            w.u32(UInt32(mappings.count))
            for m in mappings { w.u64(m.iova); w.u64(m.size); w.u8(m.writable ? 1 : 0); w.u8(m.fdOffset == nil ? 0 : 1); w.u64(m.fdOffset ?? 0) }
            return w.bytes
        }

        public init(decoding b: ArraySlice<UInt8>) throws {
            var r = WireReader(b, context: "vfio-user handover record")
            guard try r.u32() == Self.magic, try r.u32() == 1 else { throw WireError.invalid("vfio-user handover record: bad magic or version") }
            let n = Int(try r.u32())
            guard n <= 64 * 1024 else { throw WireError.invalid("vfio-user handover record: VERSION reply of \(n) bytes") }
            versionReply = Array(try r.bytes(n))
            nextMessageID = try r.u16()
            twinSocket = try r.u8() != 0
            let count = Int(try r.u32())
            guard count <= Self.maxMappings else { throw WireError.invalid("vfio-user handover record: \(count) DMA mappings (at most \(Self.maxMappings))") }
            mappings = []
            for _ in 0..<count {
                let iova = try r.u64(), size = try r.u64(), writable = try r.u8() != 0, hasFD = try r.u8() != 0, off = try r.u64()
                guard size > 0, iova &+ size > iova else { throw WireError.invalid("vfio-user handover record: DMA mapping [\(hex(iova)), +\(hex(size))) is empty or wraps") }
                mappings.append(Mapping(iova: iova, size: size, writable: writable, fdOffset: hasFD ? off : nil))
            }
            guard r.remaining == 0 else { throw WireError.invalid("vfio-user handover record: \(r.remaining) trailing bytes") }
        }

        public init(versionReply: [UInt8], nextMessageID: UInt16, twinSocket: Bool, mappings: [Mapping]) {
            self.versionReply = versionReply; self.nextMessageID = nextMessageID; self.twinSocket = twinSocket; self.mappings = mappings
        }
    }

    /// The twin socket's descriptor, for handing over (nil when not negotiated).
    public var twinSocketFD: FileDescriptor? { twin?.socket.fd }

    /// The state a successor adopts. Taken while the guest may still run: the message id only
    /// needs to be unused by the time the successor sends, and ids are never reused before
    /// 65536 calls.
    public func handoverState() -> HandoverState {
        HandoverState(versionReply: versionReply, nextMessageID: connection.peekNextID(), twinSocket: twin != nil,
                      mappings: dmaMemory.all.map { .init(iova: $0.iova, size: $0.size, writable: $0.writable, fdOffset: $0.fdOffset) })
    }

    /// Stop using the connection because a successor takes it over: waits for a call in
    /// progress, refuses new ones, and stops the twin-socket reader. Nothing is sent to the
    /// server, which sees no change. Undone by `reclaimAfterHandover()`.
    public func releaseForHandover() {
        callLock.withLock { handedOver = true }
        stopTwinReader()
    }

    /// `releaseForHandover`, refused while the server still owes the reply to a request whose
    /// wait was given up (the late replies that have come are dropped first): the handover
    /// record has no place for it, so the successor would take that reply for the answer to its
    /// own first request. Refused, the connection stays this process's, untouched.
    public func releaseForHandoverInStep() throws {
        let owed: String? = callLock.withLock {
            if let why = owedReplyBlocker() { return why }
            handedOver = true
            return nil
        }
        if let owed { throw VFIOUserClientError.handoverRefused(owed) }
        stopTwinReader()
    }

    /// Why the connection cannot be handed over now, or nil (see `releaseForHandoverInStep`).
    public func handoverBlocker() -> String? { callLock.withLock { owedReplyBlocker() } }

    /// callLock held.
    private func owedReplyBlocker() -> String? {
        guard !handedOver, cutWait != nil else { return nil }
        _ = try? settleOwedReplies()
        guard let cut = cutWait, !owedReplies.isEmpty else { return nil }
        return "its server still owes the reply to \(owedReplies.count) request\(owedReplies.count == 1 ? "" : "s") whose wait was given up (\(cut)); a successor would take it for the answer to its own first request"
    }

    /// Take the connection back after a failed handover (the successor never used it). Does
    /// nothing if the connection was not handed over (a refused `releaseForHandoverInStep`).
    public func reclaimAfterHandover() {
        let was: Bool = callLock.withLock {
            defer { handedOver = false }
            return handedOver
        }
        guard was else { return }
        _ = try? twinCancel.consume()
        guard twin != nil else { return }
        do { try startTwinReader() } catch {
            // The connection works on; only the server's DMA requests on the twin socket go
            // unanswered (the server's own timeout fails that DMA).
            Log.error("vfio-user", "taking the connection back after a refused handover: \(error); server-to-client DMA on the twin socket is not served")
        }
    }

    public var isHandedOver: Bool { callLock.withLock { handedOver } }

    /// Adopt a connection a predecessor process configured: no VERSION, no DMA_MAP, nothing
    /// sent. `local(fdOffset, size)` gives this process's address of each mapping (guest RAM
    /// mapped again at a new address); mappings served by messages need one too.
    public init(adopting socket: UnixSocket, twin: UnixSocket?, state: HandoverState, options: Options = Options(),
                local: (HandoverState.Mapping) throws -> UnsafeMutableRawPointer) throws {
        // Until adopted, the sockets count as the predecessor's: an adoption that fails (a bad
        // record, a mapping, no thread for the twin reader) runs deinit, whose close must only
        // close our descriptors, never shut the connection down under the VMM that keeps the VM.
        handedOver = true
        self.options = options
        cancelStorage = options.cancel
        twinCancel = try EventFD(nonBlocking: true)
        try socket.setTimeouts(milliseconds: options.timeoutMilliseconds)
        socket.setSendBuffer()
        connection = VFIOUserConnection(socket: socket, maxReceiveFDs: Int(options.maxMessageFDs),
                                        maxMessageSize: Int(options.maxDataXferSize) + 64 * 1024 + 64 * 1024 * 1024)
        let v: VersionPayload
        do { v = try VersionPayload(decoding: state.versionReply[...]) } catch {
            throw VFIOUserClientError.protocolViolation("handed-over VERSION reply: \(error)")
        }
        guard state.twinSocket == (twin != nil) else {
            throw VFIOUserClientError.protocolViolation("handover record says twin socket \(state.twinSocket), \(twin == nil ? "none" : "one") was passed")
        }
        serverVersion = (v.major, v.minor)
        serverCapabilities = v.capabilities
        serverJSON = v.rawJSON
        versionReply = state.versionReply
        connection.setNextID(state.nextMessageID)
        for m in state.mappings {
            dmaMemory.add(.init(iova: m.iova, size: m.size, base: try local(m), writable: m.writable, fdOffset: m.fdOffset, dirty: nil))
        }
        if let t = twin {
            try t.setTimeouts(milliseconds: options.timeoutMilliseconds)
            self.twin = VFIOUserConnection(socket: t, maxReceiveFDs: 0, maxMessageSize: Int(options.maxDataXferSize) + 4096)
            twinSocketActive = true
            try startTwinReader()
        }
        callLock.withLock { handedOver = false }  // adopted
    }
}

