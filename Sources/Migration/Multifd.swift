import Glibc
import SystemCalls
import VFIO

/// Multifd (QEMU's `multifd` capability and `multifd-channels` parameter): N extra connections
/// carry RAM and device state in parallel beside the main channel. The main channel keeps the
/// order: it announces the channels (a MULTIFD section after CONFIG), ends every pass with a
/// SYNC section, and carries config space, vCPUs and END.
///
/// Each extra channel starts with a hello (`"VLMFDCHN" | index u32 | channels u32 | nonce
/// u64`, the nonce from MULTIFD, so a stray connection of another attempt is told apart) and
/// then carries sections of the main stream's format: RAM, DEVICE and SYNC.
///
/// Why the destination never applies an older copy of a page after a newer one: within one
/// pass (one dirty bitmap) the source sends each page at most once, on one channel; every pass
/// ends with SYNC k on every channel and on the main channel; a channel thread at the
/// destination that reads SYNC k waits until the main thread has seen all channels reach it,
/// so nothing of pass k+1 is applied before all of pass k is. Device state keeps its order
/// because each device always goes on the same channel (device i on channel i mod N).
public enum Multifd {
    public static let helloMagic: [UInt8] = Array("VLMFDCHN".utf8)
    public static let helloSize = 24
    /// QEMU's multifd-channels is a uint8 (1-255, default 2).
    public static let channelRange: ClosedRange<Int> = 1...255

    static func hello(index: Int, channels: Int, nonce: UInt64) -> [UInt8] {
        var w = BEWriter(); w.append(helloMagic); w.u32(UInt32(index)); w.u32(UInt32(channels)); w.u64(nonce); return w.bytes
    }
    static func announcePayload(channels: Int, nonce: UInt64) -> [UInt8] {
        var w = BEWriter(); w.u32(UInt32(channels)); w.u32(0); w.u64(nonce); return w.bytes
    }
    /// SYNC: pass sequence u64, flags u32 (1 = the last: the channel ends after it), 0 u32.
    static func syncPayload(sequence: UInt64, last: Bool) -> [UInt8] {
        var w = BEWriter(); w.u64(sequence); w.u32(last ? 1 : 0); w.u32(0); return w.bytes
    }
    static func isHello(_ b: [UInt8]) -> Bool { b.count >= 8 && Array(b[0..<8]) == helloMagic }

    /// Connections waiting for their hello at once; beyond, the oldest is closed.
    static let maxPendingHellos = 64

    /// The destination's side of channel setup: accept until `n` channels of migration `nonce`
    /// said hello, within `timeoutMS` (0 = forever). Every accepted connection's hello is
    /// awaited at the same time, so that a stray connection that stays silent, or sends half a
    /// hello, holds no real channel up (reading hellos one after the other, one silent stray
    /// used up the whole timeout). A connection whose hello is not one of this migration's
    /// channels (another attempt's nonce, a wrong count, an index out of range or taken, not
    /// a hello at all, closed before it) is closed, and the reason logged.
    static func acceptChannels(_ n: Int, nonce: UInt64, timeoutMS: UInt64, accept: (Int32) throws -> StreamSocket?) throws -> [StreamSocket] {
        var socks = [StreamSocket?](repeating: nil, count: n)
        var pending: [StreamSocket] = []
        let deadline = timeoutMS == 0 ? UInt64.max : monotonicNanoseconds() + timeoutMS * 1_000_000
        func refuse(_ s: StreamSocket, _ why: String) {
            s.fd.close()
            Log.info("migration", "a connection on the migration listener is not a channel of this migration (\(why)); closed")
        }
        do {
            while socks.contains(where: { $0 == nil }) {
                let now = monotonicNanoseconds()
                guard now < deadline else {
                    throw MultifdError.setup("\(socks.filter { $0 == nil }.count) of \(n) channels did not connect and say hello within \(timeoutMS) ms")
                }
                // Short slices while a hello is awaited: the listener and the hellos are watched in turn.
                let slice: UInt64 = pending.isEmpty ? 250 : 10
                if let s = try accept(Int32(clamping: min((deadline - now) / 1_000_000 + 1, slice))) {
                    if pending.count >= maxPendingHellos { refuse(pending.removeFirst(), "too many connections without a hello") }
                    pending.append(s)
                }
                var waiting: [StreamSocket] = []
                for s in pending {
                    var b = [UInt8](repeating: 0, count: helloSize)
                    let got = recv(s.fd.rawValue, &b, helloSize, Int32(MSG_PEEK | MSG_DONTWAIT))
                    if got < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) { waiting.append(s); continue }
                    if got <= 0 { refuse(s, got == 0 ? "closed before its hello" : "failed before its hello: \(Errno(errno))"); continue }
                    if got < helloSize {
                        if Array(b[0..<min(got, 8)]) != Array(helloMagic[0..<min(got, 8)]) { refuse(s, "not a multifd hello"); continue }
                        waiting.append(s); continue
                    }
                    _ = recv(s.fd.rawValue, &b, helloSize, Int32(MSG_DONTWAIT))  // the 24 bytes peeked
                    var r = BEReader(b[8...])
                    let idx = Int(r.u32() ?? 0), count = r.u32() ?? 0, theirs = r.u64() ?? 0
                    if !isHello(b) { refuse(s, "not a multifd hello") }
                    else if theirs != nonce { refuse(s, "the nonce of another migration attempt") }
                    else if count != UInt32(n) { refuse(s, "it says \(count) channels, this migration has \(n)") }
                    else if idx >= n { refuse(s, "channel index \(idx) of \(n)") }
                    else if socks[idx] != nil { refuse(s, "channel \(idx) is already connected") }
                    else { socks[idx] = s }
                }
                pending = waiting
            }
        } catch {
            for case let s? in socks { s.fd.close() }
            for s in pending { s.fd.close() }
            throw error
        }
        for s in pending { refuse(s, "every channel was already connected") }
        return socks.map { $0! }
    }
}

/// Why a multifd channel failed; each case reads as the reason.
public enum MultifdError: Error, CustomStringConvertible {
    case setup(String)
    case channel(Int, String)
    public var description: String {
        switch self {
        case let .setup(why): return "multifd channel setup failed: \(why)"
        case let .channel(i, why): return "multifd channel \(i): \(why)"
        }
    }
}

// MARK: source side

/// The source's channel workers: each owns one connection and a short queue of jobs (a RAM
/// batch, a device's data, a SYNC). The first failure stops them all and is what `submit` and
/// `drain` throw.
final class MultifdSender: @unchecked Sendable {
    enum Job { case ram(MigrationSource.RAMBatch), device(Int, final: Bool), sync(UInt64, last: Bool) }

    let sockets: [StreamSocket]
    private let cond = Condition()
    private var queues: [[Job]]
    private var busy: [Bool]
    private var failure: Error?
    private var stopping = false
    private var threads: [OSThread] = []
    private static let maxQueued = 2

    init(sockets: [StreamSocket]) {
        self.sockets = sockets
        queues = Array(repeating: [], count: sockets.count)
        busy = Array(repeating: false, count: sockets.count)
    }

    /// Throws when a worker's thread cannot be had; `stop()` ends the ones started.
    func start(perform: @escaping (Int, Job) throws -> Void) throws {
        for i in sockets.indices {
            threads.append(try OSThread(name: "multifd-\(i)") { [self] in
                while true {
                    let job: Job? = cond.mutex.withLock {
                        while queues[i].isEmpty && !stopping { cond.wait() }
                        if stopping { return nil }
                        busy[i] = true
                        return queues[i].removeFirst()
                    }
                    guard let job else { return }
                    var err: Error?
                    do { try perform(i, job) } catch { err = error }
                    cond.mutex.withLock {
                        busy[i] = false
                        if let e = err, failure == nil { failure = e; stopping = true }
                        cond.broadcast()
                    }
                    if err != nil { return }
                }
            })
        }
    }

    var error: Error? { cond.mutex.withLock { failure } }

    /// Queue a job on channel `i`, waiting while its queue is full.
    func submit(_ job: Job, to i: Int) throws {
        try cond.mutex.withLock {
            while queues[i].count >= Self.maxQueued && failure == nil && !stopping { cond.wait() }
            if let f = failure { throw f }
            if stopping { throw MigrationError.cancelled }
            queues[i].append(job)
            cond.broadcast()
        }
    }

    /// Wait until every queued job went out (or one failed).
    func drain() throws {
        try cond.mutex.withLock {
            while failure == nil && !stopping && (queues.contains { !$0.isEmpty } || busy.contains(true)) { cond.wait() }
            if let f = failure { throw f }
            if stopping { throw MigrationError.cancelled }
        }
    }

    /// Stop the workers (a blocked send returns: the sockets are shut down) and join them.
    func stop() {
        cond.mutex.withLock { stopping = true; cond.broadcast() }
        for s in sockets { _ = Glibc.shutdown(s.fd.rawValue, Int32(SHUT_RDWR)) }
        for t in threads { t.join() }
        threads = []
        for s in sockets { s.fd.close() }
    }

    /// Shut the connections down without joining (cancel, from any thread).
    func shutdownSockets() { for s in sockets { _ = Glibc.shutdown(s.fd.rawValue, Int32(SHUT_RDWR)) } }
}

// MARK: destination side

/// The destination's channel readers and the barrier between passes.
final class MultifdReceiver: @unchecked Sendable {
    private let cond = Condition()
    private(set) var sockets: [StreamSocket] = []
    private var reached: [UInt64]      // the last SYNC each channel read
    private var released: UInt64 = 0   // the last SYNC the main channel let through
    private var finished: [Bool]
    private var failure: Error?
    private var threads: [OSThread] = []
    let pages: [ManagedCounter]
    let timeoutMS: UInt64
    /// Wakes the main thread's read when a channel fails (shuts the main socket's read side).
    let onFailure: () -> Void

    final class ManagedCounter: @unchecked Sendable { var value: UInt64 = 0 }

    init(sockets: [StreamSocket], timeoutMS: UInt64, onFailure: @escaping () -> Void) {
        self.sockets = sockets; self.timeoutMS = timeoutMS; self.onFailure = onFailure
        reached = Array(repeating: 0, count: sockets.count)
        finished = Array(repeating: false, count: sockets.count)
        pages = sockets.map { _ in ManagedCounter() }
    }

    var error: Error? { cond.mutex.withLock { failure } }

    /// Throws when a reader's thread cannot be had; `stop()` ends the ones started.
    func start(decoder: @escaping (Int) -> MigrationStreamDecoder) throws {
        for i in sockets.indices {
            let d = decoder(i)
            threads.append(try OSThread(name: "multifd-in-\(i)") { [self] in
                do { try d.runChannel() } catch { fail(MultifdError.channel(i, "\(error)")) }
                cond.mutex.withLock { finished[i] = true; cond.broadcast() }
            })
        }
    }

    func fail(_ e: Error) {
        let first = cond.mutex.withLock { () -> Bool in
            guard failure == nil else { return false }
            failure = e; cond.broadcast(); return true
        }
        if first { onFailure(); for s in sockets { _ = Glibc.shutdown(s.fd.rawValue, Int32(SHUT_RDWR)) } }
    }

    /// A channel read SYNC `seq`: wait until the main channel released it.
    func channelReached(_ i: Int, _ seq: UInt64) throws {
        try cond.mutex.withLock {
            // Passes end one after the other: a SYNC ahead would let the main channel past a
            // pass this channel has not delivered (an older page copy could land after a newer).
            guard seq == reached[i] &+ 1 else {
                throw StreamError.malformed(.sync, id: 0, "pass \(seq) out of order (pass \(reached[i] &+ 1) expected)")
            }
            reached[i] = seq
            cond.broadcast()
            while released < seq && failure == nil { cond.wait() }
            if let f = failure { throw f }
        }
    }

    /// The main channel read SYNC `seq`: wait (bounded) until every channel reached it, then
    /// let them go on. Returns the pages the channels received up to it.
    func mainReached(_ seq: UInt64) throws -> UInt64 {
        let expected = cond.mutex.withLock { released &+ 1 }
        guard seq == expected else { throw StreamError.malformed(.sync, id: 0, "pass \(seq) out of order on the main channel (pass \(expected) expected)") }
        let deadline = timeoutMS == 0 ? UInt64.max : monotonicNanoseconds() + timeoutMS * 1_000_000
        return try cond.mutex.withLock {
            while failure == nil && reached.contains(where: { $0 < seq }) {
                let now = monotonicNanoseconds()
                if now >= deadline {
                    let slow = reached.indices.filter { reached[$0] < seq }
                    let e = MultifdError.channel(slow[0], "did not reach sync \(seq) within \(timeoutMS) ms")
                    failure = e
                    cond.broadcast()
                    throw e
                }
                cond.wait(timeoutSeconds: min(Double(deadline - now) / 1e9, 1))
            }
            if let f = failure { throw f }
            released = seq
            cond.broadcast()
            return pages.reduce(0) { $0 + $1.value }
        }
    }

    /// Stop and join the readers (after the last SYNC they have ended by themselves).
    func stop() {
        cond.mutex.withLock { if failure == nil && finished.contains(false) { failure = MigrationError.cancelled }; cond.broadcast() }
        for (i, s) in sockets.enumerated() where !cond.mutex.withLock({ finished[i] }) { _ = Glibc.shutdown(s.fd.rawValue, Int32(SHUT_RDWR)) }
        for t in threads { t.join() }
        threads = []
        for s in sockets { s.fd.close() }
        sockets = []
    }
}

/// Where a channel's sections go: guest RAM (counted per channel) and the devices' loaders.
final class MultifdChannelSink: MigrationSink {
    unowned let destination: MigrationDestination
    let receiver: MultifdReceiver
    let index: Int
    init(_ d: MigrationDestination, _ r: MultifdReceiver, _ i: Int) { destination = d; receiver = r; index = i }

    func config(ramSize: UInt64, vcpus: UInt32, devices: UInt32) throws { throw StreamError.malformed(.config, id: 0, "CONFIG on a multifd channel") }
    func ramDestination(gpa: UInt64, pages: UInt32) throws -> UnsafeMutableRawBufferPointer {
        receiver.pages[index].value += UInt64(pages)
        return UnsafeMutableRawBufferPointer(start: destination.vm.memory.base + Int(gpa), count: Int(pages) * 4096)
    }
    func ramZero(gpa: UInt64, pages: UInt32) throws {
        receiver.pages[index].value += UInt64(pages)
        memset(destination.vm.memory.base + Int(gpa), 0, Int(pages) * 4096)
    }
    func deviceSetup(device: UInt32) throws {}
    func deviceData(device: UInt32, _ data: UnsafeRawBufferPointer) throws { try destination.deviceData(device: device, data) }
    func deviceConfig(device: UInt32, _ data: ArraySlice<UInt8>) throws { throw StreamError.malformed(.device, id: 0, "device config belongs on the main channel") }
    func deviceInitialDataSent(device: UInt32) throws {}
    func vcpus(_ states: [VCPUStateBytes]) throws { throw StreamError.malformed(.vcpus, id: 0, "VCPUS on a multifd channel") }
    func end(pagesSent: UInt64) throws { throw StreamError.malformed(.end, id: 0, "END on a multifd channel") }
    func sync(sequence: UInt64, last: Bool) throws { try receiver.channelReached(index, sequence) }
}
