import Glibc
import LiveUpdate
import Machine
import Migration
import SystemCalls
import VFIO
import VFIOUser

/// One VMM process: a micro-VM, its devices, migration in either direction, and the QMP
/// commands that drive them. QEMU's run states are kept where they mean the same thing.
///
/// One VM never runs in two places, and the run state always says what the vCPUs do:
/// - every long operation (migrate, migrate-incoming, live update, quit) claims the VM in one
///   locked step that also checks the run state, and a conflicting one is refused with a QMP
///   error naming what holds the VM;
/// - every run-state change (stop, cont, the verifier's pause, a device lost, the end of an
///   operation) runs under one control lock together with the vCPU pause or resume it implies,
///   and this VMM holds at most one pause of its own (`holdsPause`): two stops cannot pause
///   twice, and a cont never releases a pause that a migration or live update holds.
public final class VirtualMachineManager: QMPHandler, @unchecked Sendable {
    public enum RunState: String { case running, paused, inmigrate, postmigrate, finishMigrate = "finish-migrate", internalError = "internal-error" }

    /// What holds the VM while it lasts; at most one at a time.
    public enum Operation: String, Sendable {
        case migration = "a migration", incoming = "an incoming migration", liveUpdate = "a live update", quit = "quit"
    }

    public let vm: MicroVM
    public let policies: [DeviceMigrationPolicy]
    public var qmp: QMPServer?
    /// Guards the fields below (short sections only; never held across a vCPU pause).
    private let lock = Mutex()
    /// Serialises run-state changes with the pause or resume they imply. Order: control, then lock.
    private let control = Mutex()
    private var state: RunState
    private var operation: Operation?
    /// This VMM's own pause of the vCPUs (paused, internal-error, a stop during a migration);
    /// guarded by `control`.
    private var holdsPause = false
    /// The VM has a guest of its own (booted, migrated in, or taken over): no incoming
    /// migration may overwrite it.
    private var hasGuest = false
    /// QEMU's autostart: a destination resumes after the migration unless `stop` was given
    /// while it waited (or the source was paused).
    private var autostart = true
    /// Where a migration that fails returns the VM to: its state when it started, or paused
    /// after a `stop` meanwhile.
    private var resumeState: RunState = .running
    /// Why the VM is in internal-error (a device lost), if it is.
    private var lostReason: String?
    private var deviceWatch: DeviceWatch?
    /// The migration parameters; `peerTimeoutMS` (QMP x-vfio-live-peer-timeout) also bounds
    /// each wait of a live update on its successor.
    public private(set) var parameters = MigrationParameters()
    /// The destination being loaded (migrate-incoming), for `stop`/`cont` while it waits.
    private var incomingDestination: MigrationDestination?
    private var outgoing: MigrationSource?
    public private(set) var stats = MigrationStats()
    private var migrationThread: OSThread?
    /// Checksums of each device's memory (BAR4) when it stopped (source) or loaded (destination).
    public private(set) var deviceDigests: [UInt64] = []
    /// Called when the process should end (migration completed, quit).
    public var onExit: ((Int32) -> Void)?
    public var exitAfterMigration = true
    /// The command line this VMM was started with (a live update's successor reuses it).
    public var commandLine: [String] = CommandLine.arguments
    /// Devices that opt out of live update (index → why).
    public var liveUpdateOptOut: [Int: String] = [:]
    /// Kernel VFIO containers and the like that a live update carries over.
    public var liveUpdateParticipants: [CPRParticipant] = []
    var cprMode: LiveUpdateMode?
    var cprExecCommand: [String]?
    /// The last live update's report (either side), for query-migrate.
    public internal(set) var liveUpdateReport: LiveUpdateReport?
    /// Fault injection for tests: called at each step of an outgoing live update.
    public var liveUpdateFaultForTesting: ((String) throws -> Void)?
    /// The periodic integrity check (`vm run --verify-every`): the eventfd that ends its thread,
    /// each scan's start...end (monotonic ns; the last 1024), and the first report that failed.
    private var periodicStop: EventFD?
    private var periodicThread: OSThread?
    private var scans: [ClosedRange<UInt64>] = []
    private var periodicFailure: VerifierReport?

    public init(vm: MicroVM, policies: [DeviceMigrationPolicy], incoming: Bool) {
        self.vm = vm
        self.policies = policies
        state = incoming ? .inmigrate : .paused
    }

    // The periodic check's thread holds this VMM weakly: it ends at its next tick after this.
    deinit { deviceWatch?.stop() }

    public var runState: RunState { lock.withLock { state } }
    /// The operation that holds the VM now, if any.
    public var currentOperation: Operation? { lock.withLock { operation } }

    func set(_ s: RunState) { lock.withLock { state = s } }
    func withLock<T>(_ body: () throws -> T) rethrows -> T { try lock.withLock(body) }
    func withControl<T>(_ body: () throws -> T) rethrows -> T { try control.withLock(body) }
    func replaceStats(_ s: MigrationStats) { lock.withLock { stats = s } }

    // MARK: claims

    /// Claim the VM for `op` if no other operation holds it and its state is one of `allowed`:
    /// checked and taken in one locked step. Returns the state at the claim.
    @discardableResult
    func claim(_ op: Operation, _ what: String, allowed: [RunState]) throws -> RunState {
        // Under `control` too: a periodic scan in progress (it parks the vCPUs) ends before the
        // operation starts, and none starts while it lasts (periodicVerify).
        try control.withLock { try lock.withLock {
            if let busy = operation {
                throw QMPError(busy == .quit ? "\(what) refused: the VMM is quitting" : "\(what) refused: \(busy.rawValue) is in progress")
            }
            if state == .internalError, let why = lostReason { throw QMPError("\(what) refused: the VM is in internal-error (\(why))") }
            guard allowed.contains(state) else {
                throw QMPError("\(what) needs a VM in state \(allowed.map(\.rawValue).joined(separator: " or ")) (it is \(state.rawValue))")
            }
            operation = op
            return state
        } }
    }

    /// End `op`'s hold on the VM.
    func release(_ op: Operation) { lock.withLock { if operation == op { operation = nil } } }

    // Pause bookkeeping; the caller holds `control`.
    private func holdPauseLocked() { if !holdsPause { vm.pause(); holdsPause = true } }
    private func releasePauseLocked() { if holdsPause { holdsPause = false; vm.resume() } }

    /// Every device (of any transport) to `s` for a pause or a `cont`, in QEMU's order for a
    /// run-state change: P2P devices to RUNNING_P2P first, then each to `s`
    /// (DeviceMigration.transitionAll). A device without migration v2 or handed over to a
    /// successor is left alone.
    private func setDevices(_ s: MigrationState) {
        let ms = vm.devices.compactMap { d -> DeviceMigration? in
            if d.vfioUserClient?.isHandedOver == true { return nil }
            return try? DeviceMigration(device: d.device, prefer: .v2)
        }
        DeviceMigration.transitionAll(ms, to: s)
    }

    /// Start running (a fresh VM).
    public func boot() throws {
        try vm.start()
        control.withLock {
            vm.resume()
            lock.withLock { state = .running; hasGuest = true }
        }
        watchDevices()
    }

    /// The VM was taken over from a predecessor and runs here.
    func markRunningAfterTakeover() {
        lock.withLock { state = .running; hasGuest = true }
        watchDevices()
    }

    /// Checksum of each device's memory (BAR4, the dma-engine's) through its mmap'd view; 0
    /// for a device without one (edu, mtty: nothing there to compare).
    func digestDevices() -> [UInt64] {
        vm.devices.map { d in
            guard !d.device.isHandedOver, let m = try? d.device.mapRegionAreas(4), let a = m.areas.first, a.size <= UInt64(Int.max) else { return 0 }
            return Checksum.of(UnsafeRawBufferPointer(start: a.base, count: Int(a.size)))
        }
    }

    // MARK: a device lost

    /// Watch every device connection from now on (a VM that is ours to run). Only devices
    /// that have one (vfio-user) are watched: a kernel device has no peer that can die.
    func watchDevices() {
        let fds = vm.devices.enumerated().compactMap { i, d in d.device.lossWatchFD.map { (device: i, fd: $0) } }
        guard deviceWatch == nil, !fds.isEmpty else { return }
        do { deviceWatch = try DeviceWatch(fds: fds) { [weak self] i, why in self?.deviceLost(i, why) } } catch {
            // The VM runs on; a device server that dies is then found by the next call to it.
            Log.error("vmm", "device servers are not watched for loss: \(error)")
        }
    }

    /// A device server died under the VM. QEMU's choice for an unrecoverable device error
    /// (hw/vfio/pci.c, vfio_err_notifier_handler) is the reference: the VM stops in
    /// internal-error, a STOP event says so, and only a reset (here: a new VM) runs it again;
    /// cont is refused. A migration in progress is cancelled (its device is gone); once the VM
    /// has gone to a destination or a successor, the loss is no longer this VMM's concern.
    func deviceLost(_ index: Int, _ why: String) {
        let (act, op) = control.withLock { (enterInternalErrorLocked(index, why), lock.withLock { operation }) }
        guard act else { return }
        if op == .migration { lock.withLock { outgoing }?.cancel() }
        announceLost([(index, why)])
    }

    /// The VM stops in internal-error for device `index`; the caller holds `control`. False
    /// when the VM is no longer this VMM's to stop (postmigrate) or is stopped so already.
    private func enterInternalErrorLocked(_ index: Int, _ why: String) -> Bool {
        let s = lock.withLock { state }
        guard s != .postmigrate, s != .internalError else { return false }
        holdPauseLocked()
        lock.withLock { state = .internalError; lostReason = "device \(index) lost: \(why)"; resumeState = .internalError }
        return true
    }

    /// Say that the VM stopped for the devices `lost`: STOP, then an event per device.
    private func announceLost(_ lost: [(Int, String)]) {
        for (i, why) in lost { Log.error("vmm", "device \(i) lost: \(why); the VM stops in internal-error (QEMU's rule for an unrecoverable device error)") }
        qmp?.emit("STOP")
        for (i, why) in lost { qmp?.emit("X_VFIO_LIVE_DEVICE_LOST", data: .object([("device", .number(Double(i))), ("reason", .string(why))])) }
    }

    // MARK: migration

    public func startOutgoing(uri: String) throws {
        let address: SocketAddress
        do { address = try SocketAddress(uri: uri) } catch { throw QMPError("\(error)") }
        let before = try claim(.migration, "migrate", allowed: [.running, .paused])
        var handedToThread = false
        defer { if !handedToThread { release(.migration) } }
        let params = lock.withLock { parameters }
        // Refused before connecting: the waiting destination never sees this attempt.
        do { try MigrationSource.checkBlockers(vm: vm, parameters: params, policies: policies) } catch { throw QMPError("\(error)") }
        let sock: StreamSocket
        do { sock = try connectStream(address) } catch { throw QMPError("cannot connect to \(address): \(error)") }
        let newStats = MigrationStats()
        newStats.onStatus = { [weak self] s in self?.migrationEvent(s) }
        let src: MigrationSource
        do { src = try MigrationSource(vm: vm, to: sock, parameters: params, policies: policies, stats: newStats) } catch {
            // Nothing was sent: the destination sees a connection that closes empty, and waits on.
            sock.fd.close()
            throw QMPError("\(error)")
        }
        src.onCompleted = { [weak self] in if let self { self.deviceDigests = self.digestDevices() } }
        // The run state the destination resumes by is this VMM's, not the vCPUs' at the instant
        // the engine starts: the verifier's scan parks them for a moment too (issue 11's lab bug).
        src.pausedAtStart = before == .paused
        src.openChannel = { try connectStream(address) }  // multifd channels go to the same URI
        lock.withLock { outgoing = src; stats = newStats; resumeState = before }
        migrationThread?.join()
        handedToThread = true
        let migration: () -> Void = { [self] in
            do {
                try src.run()
                control.withLock { lock.withLock { state = .postmigrate; outgoing = nil } }
                release(.migration)
                qmp?.emit("STOP")
                Log.info("vmm", "migration completed: downtime \(formatMS(src.stats.downtimeMS)), \(src.stats.iterations) iterations; the source stops")
                // Leave QMP clients a moment to read the final query-migrate, then exit.
                if exitAfterMigration { usleep(1_500_000); onExit?(0) }
            } catch {
                // The source rolled back (devices as they were, or in STOP after a stop
                // meanwhile; its own pause released): the VM returns to the state it had, or
                // paused after a stop meanwhile, or stays in internal-error after a device was
                // lost. After GO without an answer the engine keeps the guest paused (it may
                // run at the destination): that pause becomes this VMM's, and the state paused.
                // A device the rollback could not reach (it hung, and cancel gave up on it) stops
                // the VM in internal-error in the same step, before the claim ends: it is never
                // seen running (nor sent to STOP) over a device it lost.
                let lost = src.lostDevices.sorted { $0.key < $1.key }.map { ($0.key, $0.value) }
                let (back, stopped) = control.withLock { () -> (RunState, Bool) in
                    var back = lock.withLock { lostReason != nil ? RunState.internalError : resumeState }
                    if src.vmLeftPaused {
                        if holdsPause { vm.resume() } else { holdsPause = true }
                        if back == .running { back = .paused }
                    }
                    if back == .paused && lost.isEmpty { setDevices(.stop) }
                    lock.withLock { state = back; outgoing = nil }
                    if let (i, why) = lost.first, enterInternalErrorLocked(i, why) { return (.internalError, true) }
                    return (back, false)
                }
                release(.migration)
                if back == .running { qmp?.emit("RESUME") }
                if stopped { announceLost(lost) }
            }
        }
        do { migrationThread = try OSThread(name: "migration", migration) } catch {
            // Nothing was sent: the destination sees a connection that closes empty.
            handedToThread = false
            lock.withLock { outgoing = nil }
            sock.fd.close()
            newStats.set(.failed, error: "\(error)")
            throw QMPError("cannot start the migration: \(error)")
        }
    }

    private func migrationEvent(_ s: MigrationStats.Status) {
        qmp?.emit("MIGRATION", data: .object([("status", .string(s.rawValue))]))
        if s == .device { lock.withLock { if state == .running || state == .paused { state = .finishMigrate } } }
    }

    /// Accept one incoming migration on `uri` (tcp:HOST:PORT or unix:PATH), in the background.
    /// A connection that closes before sending anything (a source that refused its migration)
    /// or sends nothing within the peer timeout touches nothing, and the destination waits on.
    public func startIncoming(uri: String) throws {
        let address: SocketAddress
        do { address = try SocketAddress(uri: uri) } catch { throw QMPError("\(error)") }
        try lock.withLock {
            if let busy = operation { throw QMPError("migrate-incoming refused: \(busy.rawValue) is in progress") }
            guard !hasGuest, state == .inmigrate || state == .paused else {
                throw QMPError("migrate-incoming needs a VM started for incoming migration (this one runs its own guest, state \(state.rawValue))")
            }
            operation = .incoming
        }
        var handedToThread = false
        defer { if !handedToThread { release(.incoming) } }
        let accept: () throws -> StreamSocket?
        let acceptChannel: (Int32) throws -> StreamSocket?
        let close: () -> Void
        let shown: String
        switch address {
        case let .tcp(host, port):
            let l: TCPListener
            do { l = try TCPListener(host: host, port: port, backlog: Int32(Multifd.channelRange.upperBound + 1)) } catch { throw QMPError("cannot listen on \(address): \(error)") }
            accept = { try l.accept() }; close = { l.close() }; shown = "tcp:\(host):\(l.port)"
            acceptChannel = { ms in try l.accept(timeoutMilliseconds: ms) }
        case let .unix(path):
            let l: UnixListener
            do { l = try UnixListener(path: path, backlog: Int32(Multifd.channelRange.upperBound + 1)) } catch { throw QMPError("cannot listen on \(address): \(error)") }
            accept = { try l.accept() }; close = { l.close() }; shown = "unix:\(path)"
            acceptChannel = { ms in try l.accept(timeoutMilliseconds: ms) }
        }
        do { try vm.start() } catch {
            close()
            throw QMPError("cannot start the VM: \(error)")
        }
        set(.inmigrate)
        Log.info("vmm", "waiting for an incoming migration on \(shown)")
        handedToThread = true
        let incoming: () -> Void = { [self] in
            defer { close() }
            do {
                var d: MigrationDestination
                while true {
                    guard let conn = try accept() else { return }
                    d = try MigrationDestination(vm: vm, from: conn)
                    d.acceptChannel = acceptChannel
                    d.stats.onStatus = { [weak self] st in self?.migrationEvent(st) }
                    d.afterDevicesLoaded = { [weak self] in if let self { self.deviceDigests = self.digestDevices() } }
                    lock.withLock {
                        d.peerTimeoutMS = parameters.peerTimeoutMS
                        d.autostart = autostart
                        incomingDestination = d
                        stats = d.stats
                    }
                    do {
                        try d.run()
                        break
                    } catch MigrationError.closedBeforeStream(let why) {
                        // A source that refused (or said nothing): nothing here was touched.
                        conn.fd.close()
                        Log.info("vmm", "an incoming connection brought no migration (\(why)); still waiting on \(shown)")
                    }
                }
                // QEMU: the destination runs if the source ran and autostart holds (no `stop`
                // while it waited); otherwise it stays paused, devices in STOP, and the pause it
                // was created with becomes this VMM's (cont releases it).
                let resumed = d.resumed
                control.withLock {
                    if !resumed { holdsPause = true }
                    lock.withLock { state = resumed ? .running : .paused; hasGuest = true; incomingDestination = nil }
                }
                release(.incoming)
                watchDevices()
                qmp?.emit(resumed ? "RESUME" : "STOP")
                Log.info("vmm", "incoming migration completed; the guest \(resumed ? "runs here" : "stays paused here (the source was paused, or stop was given while it waited)")")
            } catch {
                Log.error("vmm", "incoming migration failed: \(error)")
                set(.internalError)
                release(.incoming)
                onExit?(1)
            }
        }
        do { migrationThread = try OSThread(name: "incoming", incoming) } catch {
            handedToThread = false
            close()
            throw QMPError("cannot wait for an incoming migration: \(error)")
        }
    }

    // MARK: run control

    /// QMP `stop`. Serialised with every other run-state change: the check, the pause and the
    /// new state are one step, so concurrent stops pause once and a cont undoes exactly that.
    /// QEMU's rules: on a destination still waiting it clears autostart; during a migration it
    /// pauses the guest and the migration goes on with it stopped (then goes back paused if
    /// it fails); on a VM that does not run it changes nothing.
    func stop() throws {
        let emitted = try control.withLock { () -> Bool in
            let (s, op) = lock.withLock { (state, operation) }
            if op == .liveUpdate { throw QMPError("stop refused: a live update is in progress (the VM is handed over or taken back within the peer timeout)") }
            switch s {
            case .inmigrate:
                lock.withLock { autostart = false; incomingDestination?.autostart = false }
                return false
            case .running where op == .migration && lock.withLock({ outgoing })?.requestSwitchover() == true:
                // QEMU: stop during a migration is the switch-over point. The devices belong to
                // the migration now; only the vCPUs stop (this VMM's pause), and the migration
                // goes to stop-and-copy at once.
                holdPauseLocked()
                lock.withLock { state = .paused; resumeState = .paused }
                return true
            case .finishMigrate:
                holdPauseLocked()
                lock.withLock { resumeState = .paused }
                return false
            case .running:
                holdPauseLocked()
                setDevices(.stop)
                lock.withLock { state = .paused }
                return true
            case .paused, .postmigrate, .internalError:
                return false
            }
        }
        if emitted { qmp?.emit("STOP") }
    }

    /// QMP `cont`. Only a pause this VMM holds is released (never the migration's or the live
    /// update's); a VM that migrated away or lost a device is never run again here.
    func cont() throws {
        try control.withLock {
            let (s, op) = lock.withLock { (state, operation) }
            if op == .liveUpdate { throw QMPError("cont refused: a live update is in progress") }
            switch s {
            case .running:
                return
            case .inmigrate:
                lock.withLock { autostart = true; incomingDestination?.autostart = true }
                return
            case .paused where op == .migration:
                throw QMPError("cont refused: the VM was stopped during a migration, which now finishes with it stopped; cont after the migration ends (if it fails)")
            case .paused:
                setDevices(.running)
                releasePauseLocked()
                lock.withLock { state = .running }
            case .finishMigrate:
                throw QMPError("cont refused: the migration is switching over (finish-migrate)")
            case .postmigrate:
                throw QMPError("cont refused: the VM migrated away and runs elsewhere now; running it here too would run it twice")
            case .internalError:
                throw QMPError("cont refused: the VM is in internal-error (\(lock.withLock { lostReason } ?? "it failed")); it must be restarted")
            }
        }
        qmp?.emit("RESUME")
    }

    /// The integrity verifier, serialised with the run-state changes. It is refused while a
    /// live update may be handing the guest to another process (whose writes it would see
    /// half-way) and after the VM went elsewhere.
    public func verify() throws -> VerifierReport {
        try control.withLock {
            let (s, op) = lock.withLock { (state, operation) }
            if op == .liveUpdate { throw QMPError("x-vfio-live-verify refused: a live update is in progress") }
            if s == .postmigrate, let r = lock.withLock({ liveUpdateReport }) {
                throw QMPError("x-vfio-live-verify refused: the VM runs in pid \(r.successorPID) since the live update")
            }
            return scanLocked()
        }
    }

    /// The verifier's scan, with a lost device as the first violation; the caller holds `control`.
    private func scanLocked() -> VerifierReport {
        var r = vm.verify()
        if let why = lock.withLock({ lostReason }) { r.violations.insert(why, at: 0) }
        return r
    }

    // MARK: the periodic integrity check

    /// Every scan's start...end (monotonic ns), oldest first: the last 1024.
    public var verifierScans: [ClosedRange<UInt64>] { lock.withLock { scans } }
    /// The first periodic report that found a violation, if one did.
    public var verificationFailure: VerifierReport? { lock.withLock { periodicFailure } }

    /// Check the guest every `seconds` on a thread of its own (`vm run`), handing each report to
    /// `report`; what it skips is said at `periodicVerify`.
    public func startPeriodicVerification(every seconds: Double, report: @escaping (VerifierReport) -> Void) throws {
        let stop = try EventFD(nonBlocking: true)
        let ms = Int32(min(max(seconds * 1000, 1), Double(Int32.max)))
        let old = lock.withLock { () -> EventFD? in defer { periodicStop = stop }; return periodicStop }
        try? old?.signal()
        periodicThread = try OSThread(name: "verifier") { [weak self] in
            while (try? Poll.waitReadable(stop.fd, timeoutMilliseconds: ms)) == false {
                guard let self else { break }
                if let r = self.periodicVerify() { report(r) }
            }
            stop.fd.close()
        }
    }

    /// End the periodic check (waits for a scan in progress).
    public func stopPeriodicVerification() {
        let stop = lock.withLock { () -> EventFD? in defer { periodicStop = nil }; return periodicStop }
        try? stop?.signal()
        if stop != nil { periodicThread?.join(); periodicThread = nil }
    }

    /// One periodic check, or nil when it is not the moment: only a VM that is here (not still
    /// arriving, not gone), with no operation holding it, is scanned, and a device lost is a
    /// violation as for `verify` (so `vm run` ends on it). A scan parks every vCPU while it reads the working set
    /// (100-300 ms in the TCG lab), which lengthened any migration downtime it overlapped
    /// (1.7 s in a lab run) and perturbed pre-copy; so none runs while a migration (either
    /// direction) or a live update lasts, and a claim waits for a scan in progress (both under
    /// `control`). Checking resumes afterwards: on the source if the migration failed or was
    /// cancelled, on the destination once the guest runs there. That scan is the one that finds
    /// a page the migration lost.
    func periodicVerify() -> VerifierReport? {
        control.withLock {
            let (s, op) = lock.withLock { (state, operation) }
            guard op == nil, s != .inmigrate, s != .postmigrate, s != .finishMigrate else { return nil }
            if !vm.readsInterrupts && !vm.devices.isEmpty {
                // A live update's commit or thaw could not start the interrupt reader (no
                // thread then): the VM is this VMM's and no one else reads its eventfds now.
                do { try vm.startInterruptCounting(); Log.info("vmm", "the devices' interrupts are read again") } catch {
                    Log.warning("vmm", "the devices' interrupts are still not read: \(error)")
                }
            }
            let start = monotonicNanoseconds()
            let r = scanLocked()
            let end = monotonicNanoseconds()
            lock.withLock {
                scans.append(start...end)
                if scans.count > 1024 { scans.removeFirst(scans.count - 1024) }
                if !r.ok, periodicFailure == nil { periodicFailure = r }
            }
            return r
        }
    }

    // MARK: QMP

    /// The commands whose integers must be exact (max-bandwidth's "unlimited" is 2^64-1);
    /// the others go through the JSONValue handler.
    public func execute(_ command: String, exactArguments a: QMPValue?) throws -> QMPValue {
        switch command {
        case "migrate-set-parameters":
            try lock.withLock {
                if let v = a?["downtime-limit"] {
                    guard let n = v.uint64, n <= 2_000_000 else { throw QMPError("downtime-limit must be 0..2000000 ms") }
                    parameters.downtimeLimitMS = n
                    outgoing?.setDowntimeLimit(n)  // a migration in progress takes it at its next decision (as QEMU)
                }
                if let v = a?["max-bandwidth"] { guard let n = v.uint64 else { throw QMPError("max-bandwidth must be bytes per second") }; parameters.maxBandwidth = n }
                if let v = a?["x-max-iterations"] { guard let n = v.uint64, n > 0 else { throw QMPError("x-max-iterations must be positive") }; parameters.maxIterations = n }
                if let v = a?["cpu-throttle-initial"]?.uint64 { parameters.throttleInitial = min(max(v, 1), 99) }
                if let v = a?["cpu-throttle-increment"]?.uint64 { parameters.throttleIncrement = min(max(v, 1), 99) }
                if let v = a?["multifd-channels"] {
                    guard let n = v.uint64, n <= 255, Multifd.channelRange.contains(Int(n)) else { throw QMPError("multifd-channels must be 1..255") }
                    parameters.multifdChannels = Int(n)
                }
                if let v = a?["x-vfio-live-peer-timeout"] {
                    guard let n = v.uint64, n == 0 || (n >= 100 && n <= 3_600_000) else {
                        throw QMPError("x-vfio-live-peer-timeout must be 100..3600000 ms, or 0 for none")
                    }
                    parameters.peerTimeoutMS = n
                }
                if case let .string(m)? = a?["mode"] {
                    if m == "normal" { cprMode = nil } else {
                        guard let mode = LiveUpdateMode(rawValue: m) else { throw QMPError("mode must be normal, cpr-transfer or cpr-exec") }
                        cprMode = mode
                    }
                }
                if case let .array(list)? = a?["cpr-exec-command"] {
                    let argv = list.compactMap { v -> String? in if case let .string(s) = v { return s }; return nil }
                    guard !argv.isEmpty, argv.count == list.count else { throw QMPError("cpr-exec-command must be a non-empty list of strings") }
                    cprExecCommand = argv
                }
            }
            return .object([])
        case "query-migrate-parameters":
            let (p, mode) = lock.withLock { (parameters, cprMode) }
            return .object([("mode", .string(mode?.rawValue ?? "normal")), ("downtime-limit", .uint(p.downtimeLimitMS)), ("max-bandwidth", .uint(p.maxBandwidth)),
                            ("x-max-iterations", .uint(p.maxIterations)), ("cpu-throttle-initial", .uint(UInt64(p.throttleInitial))),
                            ("cpu-throttle-increment", .uint(UInt64(p.throttleIncrement))), ("x-vfio-live-peer-timeout", .uint(p.peerTimeoutMS)),
                            ("multifd-channels", .int(Int64(p.multifdChannels)))])
        default:
            return QMPValue(try execute(command, arguments: a?.json))
        }
    }

    public func execute(_ command: String, arguments a: JSONValue?) throws -> JSONValue {
        switch command {
        case "query-status":
            let s = runState
            return .object([("status", .string(s.rawValue)), ("singlestep", .bool(false)), ("running", .bool(s == .running))])
        case "stop":
            try stop()
            return .object([])
        case "cont":
            try cont()
            return .object([])
        case "migrate":
            if let mode = lock.withLock({ cprMode }) {
                try startLiveUpdate(mode: mode, to: try cprChannel(a), command: lock.withLock { cprExecCommand })
                return .object([])
            }
            guard case let .string(uri)? = a?["uri"] else { throw QMPError("Parameter 'uri' is missing") }
            try startOutgoing(uri: uri)
            return .object([])
        case "x-vfio-live-update":
            guard case let .string(m)? = a?["mode"], let mode = LiveUpdateMode(rawValue: m) else {
                throw QMPError("'mode' must be cpr-transfer or cpr-exec")
            }
            var to: String?
            if case let .string(u)? = a?["to"] { to = try unixPath(u) }
            var command: [String]?
            if case let .string(b)? = a?["binary"] { command = [b] + commandLine.dropFirst() }
            try startLiveUpdate(mode: mode, to: to, command: command)
            return .object([])
        case "migrate-incoming":
            guard case let .string(uri)? = a?["uri"] else { throw QMPError("Parameter 'uri' is missing") }
            try startIncoming(uri: uri)
            return .object([])
        case "migrate_cancel", "migrate-cancel":
            lock.withLock { outgoing }?.cancel()
            return .object([])
        case "query-migrate":
            return queryMigrate()
        case "migrate-set-parameters", "query-migrate-parameters":
            return try execute(command, exactArguments: a.map(QMPValue.init)).json
        case "migrate-set-capabilities":
            guard case let .array(list)? = a?["capabilities"] else { throw QMPError("Parameter 'capabilities' is missing") }
            try lock.withLock {
                for c in list {
                    guard case let .string(name)? = c["capability"], let on = c["state"]?.boolValue else { throw QMPError("each capability needs 'capability' and 'state'") }
                    switch name {
                    case "auto-converge": parameters.autoConverge = on
                    case "x-allow-untracked-devices": parameters.allowUntrackedDevices = on
                    case "x-vfio-live-payload-checksum": parameters.payloadChecksum = on
                    case "multifd": parameters.multifd = on
                    default: throw QMPError("capability '\(name)' is not supported (auto-converge, multifd, x-allow-untracked-devices, x-vfio-live-payload-checksum)")
                    }
                }
            }
            return .object([])
        case "query-migrate-capabilities":
            let p = lock.withLock { parameters }
            return .array([.object([("capability", .string("auto-converge")), ("state", .bool(p.autoConverge))]),
                           .object([("capability", .string("x-allow-untracked-devices")), ("state", .bool(p.allowUntrackedDevices))]),
                           .object([("capability", .string("x-vfio-live-payload-checksum")), ("state", .bool(p.payloadChecksum))]),
                           .object([("capability", .string("multifd")), ("state", .bool(p.multifd))])])
        case "x-vfio-live-verify":
            let r = try verify()
            return .object([("ok", .bool(r.ok)), ("pages", .number(Double(r.pagesChecked))), ("page-writes", .number(Double(r.pageWrites))),
                            ("dma-round-trips", .number(Double(r.dmaRoundsOK))), ("dma-errors", .number(Double(r.dmaErrors))),
                            ("violation", r.violations.first.map { .string($0) } ?? .null), ("mode", .string(vm.executionMode))])
        case "x-vfio-live-devices":
            let digests = lock.withLock { deviceDigests }
            return .array(vm.devices.enumerated().map { i, d in
                // A device without migration has no state to report (edu): "none", as it is not
                // unreachable.
                let st: String
                if d.device.isHandedOver { st = "handed-over" }
                else if let s = try? d.device.migrationState() { st = "\(s)" }
                else { st = Self.hasNoMigration(d.device) ? "none" : "unreachable" }
                return .object([("index", .number(Double(i))), ("interrupts", .number(Double(d.interrupts))),
                                ("digest", .string(i < digests.count ? String(digests[i], radix: 16) : "")), ("state", .string(st)),
                                ("transport", .string(d.device.transportName)), ("name", .string(d.device.deviceName))])
            })
        case "x-vfio-live-pid":
            return .object([("pid", .number(Double(getpid())))])
        case "quit":
            // Claimed like any operation: nothing starts after it. A migration in progress is
            // cancelled (QEMU ends it too); a live update must end first, as quitting half-way
            // through a handover could leave the guest with neither VMM.
            let was = try lock.withLock { () -> Operation? in
                if operation == .liveUpdate { throw QMPError("quit refused: a live update is in progress (it ends within the peer timeout)") }
                let was = operation
                operation = .quit
                return was
            }
            if was == .migration { lock.withLock { outgoing }?.cancel() }
            onExit?(0)
            return .object([])
        default:
            throw QMPError("The command \(command) has not been found", class: "CommandNotFound")
        }
    }

    /// The device answers that it has no migration (as edu), rather than not answering.
    static func hasNoMigration(_ d: any VFIODevice) -> Bool {
        do { return try d.migrationCapabilities() == nil } catch { return false }
    }

    /// A downtime breakdown in ms, three decimals.
    static func phasesJSON(_ p: DowntimePhases) -> JSONValue {
        func ms(_ v: Double) -> JSONValue { .number((v * 1000).rounded() / 1000) }
        return .object([
            ("pause", ms(p.pause)), ("ram-remainder", ms(p.ramRemainder)), ("devices", .array(p.devices.map(ms))),
            ("vcpu-state", ms(p.vcpuState)), ("destination-load", ms(p.destinationLoad)), ("handshake", ms(p.handshake)),
            ("resume", ms(p.resume)), ("total", ms(p.totalMS)), ("destination-reported", .bool(p.destinationReported)),
        ])
    }

    static func inputsJSON(_ i: DowntimeInputs) -> JSONValue {
        func ms(_ v: Double) -> JSONValue { .number((v * 1000).rounded() / 1000) }
        return .object([
            ("ram-rate", .number(i.ramRate.rounded())), ("harvest", ms(i.harvestMS)),
            ("device-rates", .array(i.deviceRates.map { $0.map { .number($0.rounded()) } ?? .null })),
            ("device-round-trips", .array(i.deviceRoundTripMS.map(ms))), ("destination-backlog", ms(i.backlogMS)),
            ("round-trip", i.roundTripMS.map(ms) ?? .null), ("catch-up", ms(i.catchUpMS)),
            ("destination-answers-probes", .bool(i.destinationAnswersProbes)), ("caught-up-at-stop", .bool(i.caughtUpAtStop)), ("send-queue-at-end", .number(Double(i.sendQueueAtEnd))),
        ])
    }

    func queryMigrate() -> JSONValue {
        let s = lock.withLock { stats }
        return s.snapshot { st in
            var o: [(String, JSONValue)] = []
            guard st.status != .none else { return .object([]) }
            o.append(("status", .string(st.status.rawValue)))
            o.append(("total-time", .number(st.totalTimeMS > 0 ? st.totalTimeMS.rounded() : Double((monotonicNanoseconds() - st.startNS) / 1_000_000))))
            o.append(("setup-time", .number(Double(st.setupNS / 1_000_000))))
            o.append(("expected-downtime", .number(Double(st.expectedDowntimeMS))))
            if st.status == .completed { o.append(("downtime", .number(st.downtimeMS.rounded()))) }
            o.append(("ram", .object([
                ("total", .number(Double(st.totalBytes))), ("transferred", .number(Double(st.transferredBytes))),
                ("remaining", .number(Double(st.remainingBytes))), ("duplicate", .number(Double(st.zeroPages))),
                ("normal", .number(Double(st.normalPages))), ("normal-bytes", .number(Double(st.ramBytes))),
                ("dirty-pages-rate", .number(Double(st.dirtyPagesRate))), ("mbps", .number((st.bandwidth * 8 / 1e6).rounded())),
                ("dirty-sync-count", .number(Double(st.iterations))), ("page-size", .number(4096)),
            ])))
            o.append(("vfio", .object([("transferred", .number(Double(st.deviceBytes.reduce(0, +))))])))
            o.append(("x-vfio-live", .object([
                ("iterations", .number(Double(st.iterations))), ("device-bytes", .array(st.deviceBytes.map { .number(Double($0)) })),
                ("throttle-percent", .number(Double(st.throttlePercent))), ("forced-switchover", .bool(st.forcedSwitchover)),
                ("source-outcome", st.status == .failed || st.status == .cancelled ? .string(st.sourceOutcome) : .null),
            ])))
            // Per-phase downtime (vfio-live's, in QEMU's x- style): measured once completed,
            // and the prediction behind expected-downtime while it runs.
            if let b = st.downtimeBreakdown { o.append(("x-downtime-breakdown", Self.phasesJSON(b))) }
            if let b = st.expectedBreakdown { o.append(("x-expected-downtime-breakdown", Self.phasesJSON(b))) }
            // The costs measured in this migration that the prediction is made of.
            if st.expectedBreakdown != nil { o.append(("x-downtime-inputs", Self.inputsJSON(st.downtimeInputs))) }
            if let e = st.errorDescription { o.append(("error-desc", .string(e))) }
            if let r = liveUpdateReport, let j = try? JSONValue.parse(Array(r.json.utf8)[...]) { o.append(("x-vfio-live-cpr", j)) }
            return .object(o)
        }
    }
}

func formatMS(_ v: Double) -> String { "\(Int(v.rounded())) ms" }
