import Glibc
import Machine
import SystemCalls
import VFIO
import VFIOUser

/// The incoming side: applies the stream to a paused VM whose devices wait in RESUMING, then
/// loads the devices (RESUMING→STOP validates their state) and vCPUs, tells the source READY
/// and waits for its GO; only then restores config space and interrupt wiring, runs the
/// devices, resumes (if the source VM was running), and says ACK. Any error is reported to the
/// source with its precise reason; the guest never runs on a partial state, nor without GO.
/// Every wait on the source is bounded by `peerTimeoutMS`.
public final class MigrationDestination: MigrationSink, @unchecked Sendable {
    public let vm: MicroVM
    private let socket: StreamSocket
    private var migrations: [DeviceMigration] = []
    private var configs: [Int: ArraySlice<UInt8>] = [:]
    public private(set) var pagesReceived: UInt64 = 0
    public private(set) var deviceBytes: [UInt64] = []
    private var ended = false
    /// When END arrived: the destination's load runs from here to READY.
    private var endReceivedAt: UInt64 = 0
    public private(set) var resumedAt: UInt64 = 0
    public let stats = MigrationStats()
    /// How long the source may send nothing (mid-stream, or before GO) before the migration
    /// fails; 0 = forever. The wait for the first byte is bounded by it too.
    public var peerTimeoutMS: UInt64 = 5000
    /// Resume the guest when the source VM was running (false: stay paused, as QEMU's -S).
    public var autostart = true
    /// The source VM's run state at switch-over (version-2 streams; nil before END, or from a
    /// version-1 source). false: the VM was paused there, and stays paused here (QEMU's rule);
    /// the caller's `cont` resumes it (devices to RUNNING, then `vm.resume()`).
    public private(set) var sourceWasRunning: Bool?
    /// Whether this run resumed the guest.
    public private(set) var resumed = false
    /// False until the first stream byte arrived: a failure before that left this VM untouched
    /// (error `.closedBeforeStream`), and the VMM can wait for another attempt.
    public private(set) var streamStarted = false
    /// Check the workload's invariants before resuming (tests; it adds to the downtime).
    public var verifyBeforeResume = false
    /// Called after everything is loaded, just before the guest resumes (checks, reports).
    public var beforeResume: (() -> Void)?
    /// Called when every device has loaded its state (RESUMING→STOP) and before any runs again:
    /// the one moment the destination's device state equals the source's stopped state.
    public var afterDevicesLoaded: (() -> Void)?

    /// The device migrations, in device order (statesVisited and its sequence, for reports and tests).
    public var deviceMigrations: [DeviceMigration] { migrations }

    /// Multifd: accepts the next connection on the migration listener within the given ms
    /// (nil when none came). Without it a source asking for multifd is refused.
    public var acceptChannel: ((Int32) throws -> StreamSocket?)?
    private var receiver: MultifdReceiver?
    private var decoder: MigrationStreamDecoder?
    private var channelPages: UInt64 = 0
    private var multifdDone = false
    private let deviceBytesLock = Mutex()

    public init(vm: MicroVM, from socket: StreamSocket) throws {
        self.vm = vm; self.socket = socket
        for (i, d) in vm.devices.enumerated() {
            do { migrations.append(try DeviceMigration(device: d.device)) } catch {
                throw MigrationError.device(i, "cannot receive migration state: \(error)")
            }
        }
        deviceBytes = [UInt64](repeating: 0, count: migrations.count)
    }

    /// Receive the whole migration and resume the guest. Throws (after telling the source) on
    /// any error; the VM is then left paused and its devices reset out of RESUMING.
    public func run() throws {
        MigrationSource.setPeerTimeout(socket, ms: peerTimeoutMS)
        // Nothing is touched, and nothing is said, until a first byte arrives.
        try awaitFirstByte()
        streamStarted = true
        stats.set(.active)
        do {
            let decoder = MigrationStreamDecoder(source: ChannelSource(socket, timeoutMS: peerTimeoutMS), sink: self)
            self.decoder = decoder
            defer { self.decoder = nil }  // it holds its sink (self): the cycle kept the connection open
            try decoder.run()
            receiver?.stop()
            guard ended else { throw StreamError.missingEnd }
            if decoder.version >= 2 {
                // Two-phase switch-over: loaded; the source decides.
                // The load time rides in READY's text (empty from older builds; see DestinationTimes).
                try Verdict.send(socket, .ready, DestinationTimes.readyText(loadNS: monotonicNanoseconds() - endReceivedAt))
                let go: Verdict.Message
                // One bound for the whole message, not one per byte that trickles in.
                let goDeadline = peerTimeoutMS == 0 ? UInt64.max : monotonicNanoseconds() &+ min(peerTimeoutMS, 1 << 40) * 1_000_000
                do { go = try Verdict.read(socket, deadline: goDeadline) } catch let e as Errno where e == .EAGAIN {
                    throw MigrationError.peerTimeout("the source did not say GO within \(peerTimeoutMS) ms; the guest does not run here")
                } catch {
                    throw MigrationError.channel("the source did not say GO (\(error)): it cancelled or failed; the guest does not run here")
                }
                guard go.kind == .go else { throw MigrationError.channel("the source sent \(go.kind) instead of GO") }
            }
            let goAt = monotonicNanoseconds()
            for i in migrations.indices { if let cfg = configs[i] { try applyConfig(i, cfg) } }
            // A guest that stays paused keeps its devices in STOP until `cont`. Else QEMU's
            // order at vm_start: every P2P device STOP→RUNNING_P2P, then each to RUNNING.
            if autostart && sourceWasRunning != false {
                let errors = DeviceMigration.transitionAll(migrations, to: .running)
                if let i = errors.firstIndex(where: { $0 != nil }) { throw MigrationError.device(i, "\(errors[i]!)") }
            }
            var summary = "{\"pages\":\(pagesReceived),\"device-bytes\":[\(deviceBytes.map(String.init).joined(separator: ","))]"
            if verifyBeforeResume {
                // A test instrument: it scans all guest memory inside the downtime window.
                let report = vm.verify()
                guard report.ok else { throw StreamError.configMismatch("guest memory fails verification after the load: \(report)") }
                summary += ",\"verified\":true"
            }
            summary += "}"
            beforeResume?()
            if autostart && sourceWasRunning != false {
                vm.resume()
                resumed = true
            }
            resumedAt = monotonicNanoseconds()
            // The resume time for the source's downtime breakdown (an older source ignores it).
            summary.removeLast()
            summary += ",\"x-resume-ns\":\(resumedAt - goAt)}"
            Verdict.send(socket, ok: true, summary)
            stats.set(.completed)
        } catch {
            var error = error
            if let r = receiver {
                // A failed channel shut the main read down: its reason is the real one.
                if let e = r.error, !((e as? MigrationError).map { if case .cancelled = $0 { return true }; return false } ?? false) { error = e }
                r.stop()
            }
            Verdict.send(socket, ok: false, "\(error)")
            for m in migrations { try? m.reset() }
            stats.set(.failed, error: "\(error)")
            throw error
        }
    }

    // MARK: MigrationSink

    public func config(ramSize: UInt64, vcpus: UInt32, devices: UInt32) throws {
        guard ramSize == vm.memory.size else {
            throw StreamError.configMismatch("source guest RAM is \(ramSize) bytes, this VM has \(vm.memory.size) (start it with --memory \(ramSize))")
        }
        guard vcpus == UInt32(vm.vcpuCount) else { throw StreamError.configMismatch("source has \(vcpus) vCPUs, this VM \(vm.vcpuCount)") }
        guard devices == UInt32(migrations.count) else { throw StreamError.configMismatch("source has \(devices) devices, this VM \(migrations.count)") }
        for (i, m) in migrations.enumerated() {
            do { try m.transition(to: .resuming) } catch { throw MigrationError.device(i, "\(error)") }
        }
    }

    public func ramDestination(gpa: UInt64, pages: UInt32) throws -> UnsafeMutableRawBufferPointer {
        pagesReceived += UInt64(pages)
        return UnsafeMutableRawBufferPointer(start: vm.memory.base + Int(gpa), count: Int(pages) * 4096)
    }

    /// A run of zero pages: only the pages that are not zero already are cleared, as QEMU's
    /// ram_handle_zero does. An incoming VM's RAM is populated and zero, so most zero runs cost
    /// a read of each page instead of a write (clearing them all was about 8% of a multifd
    /// channel receiver's time).
    public func ramZero(gpa: UInt64, pages: UInt32) throws {
        pagesReceived += UInt64(pages)
        let base = vm.memory.base + Int(gpa)
        for k in 0..<Int(pages) where !GuestMemory.isZeroPage(base + k * 4096) {
            memset(base + k * 4096, 0, 4096)
        }
    }

    public func deviceSetup(device: UInt32) throws {}

    public func deviceData(device: UInt32, _ data: UnsafeRawBufferPointer) throws {
        do { try migrations[Int(device)].write(data) } catch { throw MigrationError.device(Int(device), "loading state: \(error)") }
        deviceBytesLock.withLock { deviceBytes[Int(device)] += UInt64(data.count) }
    }

    public func deviceConfig(device: UInt32, _ data: ArraySlice<UInt8>) throws {
        configs[Int(device)] = data
    }

    public func deviceInitialDataSent(device: UInt32) throws {}

    public func vcpus(_ states: [VCPUStateBytes]) throws {
        do { try vm.restoreVCPUs(states.map { VCPUState(regs: $0.regs, sregs: $0.sregs, fpu: $0.fpu) }) } catch {
            throw StreamError.configMismatch("vCPU state: \(error)")
        }
    }

    public func end(pagesSent: UInt64) throws {
        endReceivedAt = monotonicNanoseconds()
        if receiver != nil && !multifdDone { throw StreamError.malformed(.end, id: 0, "END before the last multifd SYNC") }
        pagesReceived += channelPages
        channelPages = 0
        guard pagesSent == pagesReceived else {
            throw StreamError.malformed(.end, id: 0, "the source sent \(pagesSent) pages, \(pagesReceived) arrived")
        }
        for (i, m) in migrations.enumerated() {
            // RESUMING→STOP is where the device validates the image.
            do { try m.transition(to: .stop) } catch { throw MigrationError.device(i, "\(error)") }
        }
        afterDevicesLoaded?()
        ended = true
    }

    public func sourceRunState(running: Bool) throws { sourceWasRunning = running }

    /// MULTIFD: accept the channels (bounded by the peer timeout), check each hello, and start
    /// a reader per channel. Connections whose hello is not this migration's are closed.
    public func multifd(channels: UInt32, nonce: UInt64) throws {
        guard let accept = acceptChannel else {
            throw MultifdError.setup("the source asks for \(channels) multifd channels, and this destination takes none")
        }
        guard receiver == nil else { throw StreamError.malformed(.multifd, id: 0, "a second MULTIFD section") }
        let socks = try Multifd.acceptChannels(Int(channels), nonce: nonce, timeoutMS: peerTimeoutMS, accept: accept)
        for s in socks { MigrationSource.setPeerTimeout(s, ms: peerTimeoutMS) }
        let main = socket
        let rcv = MultifdReceiver(sockets: socks, timeoutMS: peerTimeoutMS) { _ = Glibc.shutdown(main.fd.rawValue, Int32(SHUT_RD)) }
        receiver = rcv
        let flags = decoder?.flags ?? 0, ram = vm.memory.size, devs = UInt32(migrations.count), timeout = peerTimeoutMS
        try rcv.start { [unowned self] i in
            MigrationStreamDecoder(channel: ChannelSource(rcv.sockets[i], timeoutMS: timeout), sink: MultifdChannelSink(self, rcv, i),
                                   ramSize: ram, devices: devs, flags: flags)
        }
    }

    /// SYNC on the main channel: every channel must have reached it before any goes on.
    public func sync(sequence: UInt64, last: Bool) throws {
        guard let r = receiver else { throw StreamError.malformed(.sync, id: 0, "SYNC without multifd channels") }
        guard !multifdDone else { throw StreamError.malformed(.sync, id: 0, "SYNC after the last one") }
        channelPages = try r.mainReached(sequence)
        if last { multifdDone = true }
    }

    /// False acts as a build from before probes (tests): keep-alives are ignored.
    var answersProbes = true
    /// Called before probe N is answered (tests: a destination that is behind).
    var beforeProbeAnswerForTesting: ((UInt64) -> Void)?

    /// A probe: everything before it is applied (RAM in guest memory, device data written;
    /// with multifd the SYNC before it waited for every channel). The source times the answer
    /// to know how far behind this side is, and switches over only once it caught up.
    public func probe(_ number: UInt64) throws {
        guard answersProbes else { return }
        beforeProbeAnswerForTesting?(number)
        do { try Verdict.send(socket, .progress, "{\"x-probe\":\(number)}") } catch {
            throw MigrationError.channel("answering the source's probe \(number): \(error)")
        }
    }

    /// Wait (bounded) for the stream's first byte without consuming it.
    private func awaitFirstByte() throws {
        let ms = peerTimeoutMS == 0 ? Int32(-1) : Int32(clamping: peerTimeoutMS)
        let readable: Bool
        do { readable = try Poll.waitReadable(socket.fd, timeoutMilliseconds: ms) } catch {
            throw MigrationError.closedBeforeStream("polling the connection: \(error)")
        }
        guard readable else { throw MigrationError.closedBeforeStream("the source connected but sent nothing for \(peerTimeoutMS) ms") }
        var b = [UInt8](repeating: 0, count: 8)
        let n = recv(socket.fd.rawValue, &b, 8, Int32(MSG_PEEK))
        // A multifd channel of an earlier, failed attempt waited in the listener's queue.
        if n == 8 && Multifd.isHello(b) { throw MigrationError.closedBeforeStream("a multifd channel of an attempt that gave up, not a migration stream") }
        if n == 0 { throw MigrationError.closedBeforeStream("the source closed the connection before sending anything (it refused the migration, or gave up)") }
        if n < 0 { throw MigrationError.closedBeforeStream("the connection failed before the stream: \(Errno(errno))") }
    }

    /// The source's config space goes back before the device runs, in the ranges this device's
    /// layout carries (`configStateRanges`: command, BARs, interrupt line, the wired
    /// interrupt's capability); the interrupt is wired to this VM's own eventfd again.
    private func applyConfig(_ i: Int, _ payload: ArraySlice<UInt8>) throws {
        var r = BEReader(payload)
        guard let n = r.u32(), n >= 64, n <= 256, let cfg = r.bytes(Int(n)), let wired = r.bytes(1) else {
            throw MigrationError.device(i, "CONFIG record is not 64 to 256 bytes of config space plus interrupt state")
        }
        let a = vm.devices[i]
        do {
            for range in a.configStateRanges where range.upperBound <= Int(n) {
                try a.device.regionWrite(VFIOPCIIndex.config, offset: UInt64(range.lowerBound),
                                         Array(cfg[(cfg.startIndex + range.lowerBound)..<(cfg.startIndex + range.upperBound)]))
            }
            if wired.first == 1 { try a.rewireInterrupt() }
        } catch {
            throw MigrationError.device(i, "restoring config space: \(error)")
        }
    }
}
