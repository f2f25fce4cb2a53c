import Glibc
import Machine
import SystemCalls
import VFIO
import VFIOUser

/// Why a migration cannot start, or failed; each case reads as the reason.
public enum MigrationError: Error, CustomStringConvertible {
    case blocked(String)
    case channel(String)
    case destination(String)
    case device(Int, String)
    case cancelled
    /// The peer made no progress (stopped reading, or did not answer) within the peer timeout.
    case peerTimeout(String)
    /// The destination was told to take the VM over (GO) and then went silent: it may run the
    /// guest, so the source stays paused (never two running copies).
    case unconfirmed(String)
    /// The incoming connection closed (or stayed silent) before the first stream byte: nothing
    /// on the destination was touched, and it can wait for another attempt.
    case closedBeforeStream(String)

    public var description: String {
        switch self {
        case let .blocked(why): return "migration blocked: \(why)"
        case let .channel(why): return "migration channel failed: \(why)"
        case let .destination(why): return "destination refused the migration: \(why)"
        case let .device(i, why): return "device \(i): \(why)"
        case .cancelled: return "migration cancelled"
        case let .peerTimeout(why): return "migration timed out: \(why)"
        case let .unconfirmed(why): return "migration outcome unknown: \(why)"
        case let .closedBeforeStream(why): return "no migration stream arrived: \(why)"
        }
    }

    var isUnconfirmed: Bool { if case .unconfirmed = self { return true }; return false }
}

/// `enable-migration` per device, as QEMU's vfio-pci property.
public enum DeviceMigrationPolicy: String, Sendable { case on, off, auto }

/// The pre-copy engine on the source. The VM keeps running while RAM and device state are
/// copied in iterations; each iteration sends the pages written since the last one (KVM's log
/// for vCPU writes, the device's DMA log for device writes). When the remaining data fits the
/// downtime limit at the measured bandwidth, the VM stops, the rest goes, and the destination
/// loads it and says READY; the source then commits with GO and the destination resumes. Any
/// failure before GO puts everything back: devices in the state they had (RUNNING, or STOP if
/// the VM was paused), logging stopped, and only the engine's own pause released.
///
/// `cancel()` and `requestSwitchover()` may be called from any thread, in any phase.
public final class MigrationSource: @unchecked Sendable {
    final class Device {
        let attached: AttachedDevice
        let migration: DeviceMigration
        /// How this device's DMA writes are found (DirtyTrackingChoice): its own DMA logging
        /// (`logging`), the IOMMU's tracker behind it (`tracker`, shared by a container's
        /// devices), or neither: all mapped RAM is dirty at stop.
        var dirtyMethod = DirtyTrackingMethod.deviceLogging
        var tracker: VFIOIOMMUDirtyTracker?
        var logging: Bool { dirtyMethod == .deviceLogging }
        var loggingStarted = false
        var initialDataSent = false
        /// What the device was in when the migration began: RUNNING, or STOP for a paused VM
        /// (QEMU leaves a stopped device in STOP and goes STOP→STOP_COPY at completion).
        var initialState: MigrationState = .running
        var inPreCopy = false
        init(_ a: AttachedDevice, _ m: DeviceMigration) { attached = a; migration = m }
    }

    /// Where the engine is; named in timeout errors.
    enum Phase: String { case setup, preCopy = "pre-copy", stopAndCopy = "stop-and-copy", handshake = "the switch-over handshake" }

    public let vm: MicroVM
    public let parameters: MigrationParameters
    public let stats: MigrationStats
    private let socket: StreamSocket
    private var devices: [Device] = []
    private var sectionID: UInt32 = 0
    private var pausedByUs = false
    private var phase = Phase.setup
    private var sendStart: UInt64 = 0
    /// Where RAM sections are assembled (4 MiB of data at most per section).
    private let staging: MappedRegion
    private var sentSinceStart: UInt64 = 0
    /// Time spent sleeping for max-bandwidth: taken out of the RAM rate the downtime is
    /// predicted with, as stop-and-copy is not paced.
    private var pacedNS: UInt64 = 0
    private var downtimeModel = DowntimeModel()
    /// migrate-set-parameters downtime-limit while the migration runs (QEMU applies it at once).
    private var downtimeLimitOverride: UInt64?
    private var downtimeLimitMS: UInt64 { control.withLock { downtimeLimitOverride } ?? parameters.downtimeLimitMS }
    public func setDowntimeLimit(_ ms: UInt64) {
        control.withLock { downtimeLimitOverride = ms }
        stats.update { stats.downtimeLimitMS = ms }
    }
    /// Data bytes per RAM section: 4 MiB, or about 50 ms at max-bandwidth, so pacing sleeps are
    /// short and the destination never sees a long silence.
    private let sectionDataLimit: Int
    // Shared with cancel()/requestSwitchover() (other threads), under `control`.
    private let control = Mutex()
    private var cancelFlag = false, switchoverFlag = false, finished = false, committed = false, socketOpen = true
    // Dirty-rate sampling (see sampleDirty).
    private var pendingDirty: [UInt64] = []
    private var lastSampleNS: UInt64 = 0
    private var dirtiedInWindow: UInt64 = 0
    private var windowStartNS: UInt64 = 0
    // Auto-converge (see considerThrottle).
    private var throttle: UInt64 = 0
    private lazy var throttler = VCPUThrottle(vm: vm)
    private var highDirtyCount = 0
    private var throttleWindowNS: UInt64 = 0, throttleWindowSent: UInt64 = 0, throttleWindowDirtied: UInt64 = 0
    /// Fault injection for tests: called before each section is sent (may throw or corrupt).
    public var beforeSection: ((MigrationStream.SectionType, UInt32) throws -> Void)?
    public var corruptNextSectionForTesting = false
    /// Called after each section went out (tests: widen a race).
    public var afterSectionForTesting: ((MigrationStream.SectionType, UInt32) -> Void)?
    /// Multifd: opens one more connection to the destination (the VMM connects it to the
    /// migration URI). Needed when `parameters.multifd` is set.
    public var openChannel: (() throws -> StreamSocket)?
    /// Called after each section went out on a multifd channel (tests: cut a channel).
    public var afterChannelSectionForTesting: ((Int, MigrationStream.SectionType) -> Void)?
    private var multifd: MultifdSender?
    private var channelStaging: [MappedRegion] = []
    private var channelSectionIDs: [MultifdReceiver.ManagedCounter] = []
    private var nextChannel = 0
    private var syncSequence: UInt64 = 0
    private var lastMainSendNS: UInt64 = 0
    /// Called after a successful migration, before the status says "completed".
    public var onCompleted: (() -> Void)?
    /// What the destination said on success (a JSON object).
    public private(set) var lastVerdict: String?
    /// True when the engine ended with the VM still paused by it: after a completed migration,
    /// or when the destination was told GO and then never confirmed (`.unconfirmed`). The
    /// engine's pause is then the caller's to release (`vm.resume()`, as `cont` does).
    public private(set) var vmLeftPaused = false

    /// Check the blockers; nothing is touched, and nothing is sent, until `run()`. A VMM that
    /// has not connected yet calls `checkBlockers` first, so a refused migration never reaches
    /// (or disturbs) the destination.
    public init(vm: MicroVM, to socket: StreamSocket, parameters: MigrationParameters, policies: [DeviceMigrationPolicy],
                stats: MigrationStats = MigrationStats()) throws {
        self.vm = vm; self.socket = socket; self.parameters = parameters; self.stats = stats
        let perSection = parameters.maxBandwidth > 0 ? min(max(parameters.maxBandwidth / 20, 64 << 10), 4 << 20) : 4 << 20
        sectionDataLimit = Int(perSection / 4096 * 4096)
        // The staging buffer serves only the payload-checksum capability (see flush).
        staging = try MappedRegion(anonymous: parameters.payloadChecksum ? (4 << 20) + 256 * 4096 : 4096, populate: parameters.payloadChecksum)
        devices = try Self.prepare(vm: vm, parameters: parameters, policies: policies)
        // One migration per VM at a time, claimed in one locked step with the check: two
        // concurrent `migrate`s must never both run and leave the guest on two destinations.
        try Self.claim(vm)
        claimed = true
        stats.deviceBytes = [UInt64](repeating: 0, count: devices.count)
    }

    deinit { if claimed { Self.release(vm) } }

    private var claimed = false
    private static let claimsLock = Mutex()
    nonisolated(unsafe) private static var claims: Set<ObjectIdentifier> = []

    private static func claim(_ vm: MicroVM) throws {
        try claimsLock.withLock {
            guard claims.insert(ObjectIdentifier(vm)).inserted else {
                throw MigrationError.blocked("a migration of this VM is already in progress")
            }
        }
    }
    private static func release(_ vm: MicroVM) { _ = claimsLock.withLock { claims.remove(ObjectIdentifier(vm)) } }

    /// Whether a MigrationSource holds this VM (created and not yet finished): a live update
    /// or a second migration must then be refused.
    public static func inProgress(_ vm: MicroVM) -> Bool { claimsLock.withLock { claims.contains(ObjectIdentifier(vm)) } }

    /// The blockers alone (no socket needed): throws `MigrationError.blocked` with the reason.
    /// Opens a migration session per device only to probe it; the devices are not changed.
    public static func checkBlockers(vm: MicroVM, parameters: MigrationParameters, policies: [DeviceMigrationPolicy]) throws {
        _ = try prepare(vm: vm, parameters: parameters, policies: policies)
    }

    private static func prepare(vm: MicroVM, parameters: MigrationParameters, policies: [DeviceMigrationPolicy]) throws -> [Device] {
        var out: [Device] = []
        for (i, d) in vm.devices.enumerated() {
            let policy = i < policies.count ? policies[i] : .auto
            if policy == .off { throw MigrationError.blocked("device \(i): migration is disabled for this VFIO device (enable-migration=off)") }
            let m: DeviceMigration
            do { m = try DeviceMigration(device: d.device) } catch DeviceMigrationError.notMigratable where d.device.transportName == "kernel VFIO" {
                // QEMU's words when VFIO_DEVICE_FEATURE MIGRATION answers ENOTTY (a driver
                // without migration, vfio-pci's edu) and there is no v1 region either.
                throw MigrationError.blocked("device \(i) (\(d.device.deviceName)): VFIO migration is not supported in kernel (QEMU's words: its driver offers no migration v2, VFIO_DEVICE_FEATURE MIGRATION answers ENOTTY)")
            } catch {
                throw MigrationError.blocked("device \(i) does not support migration (\(error))")
            }
            // QEMU's per-device choice (vfio_migration_realize): the device's DMA logging, else
            // the IOMMU's dirty tracking; with neither, AUTO blocks and enable-migration=on
            // only warns (here also x-allow-untracked-devices), and all mapped RAM counts as
            // dirty at stop.
            let canLog = d.device.supportsDMALogging
            let tracker = canLog ? nil : d.device.iommuDirtyTracker
            let method: DirtyTrackingMethod
            do {
                method = try DirtyTrackingMethod.choose(deviceLogging: [canLog], iommuDirtyTracking: tracker != nil,
                                                        allowUntracked: parameters.allowUntrackedDevices || policy == .on)
            } catch {
                throw MigrationError.blocked("device \(i): VFIO device doesn't support device and IOMMU dirty tracking (QEMU's words); set capability x-allow-untracked-devices, or enable-migration=on, to treat all its mapped pages as dirty at stop")
            }
            if method == .allDirty { Log.warning("migration", "device \(i) (\(d.device.deviceName)): VFIO device doesn't support device and IOMMU dirty tracking; all its mapped RAM is resent at stop") }
            let dev = Device(d, m)
            dev.dirtyMethod = method
            dev.tracker = method == .iommu ? tracker : nil
            out.append(dev)
        }
        // QEMU's rule (hw/vfio/migration.c, vfio_multiple_devices_migration_is_supported): with
        // more than one VFIO device, every one must have the P2P states, or none migrates: a
        // device stopped while another still runs could see its P2P DMA land nowhere.
        if out.count > 1, let lacking = out.indices.first(where: { !out[$0].migration.supportsP2P }) {
            throw MigrationError.blocked("device \(lacking): Multiple VFIO devices migration is supported only if all of them support P2P migration (QEMU's words)")
        }
        return out
    }

    /// The device migrations, in device order (statesVisited and its sequence, for reports and tests).
    public var deviceMigrations: [DeviceMigration] { devices.map(\.migration) }

    /// Each IOMMU tracker once, however many devices share it (one container, many devices).
    private var trackers: [VFIOIOMMUDirtyTracker] {
        var seen = Set<ObjectIdentifier>(), out: [VFIOIOMMUDirtyTracker] = []
        for d in devices { if let t = d.tracker, seen.insert(ObjectIdentifier(t)).inserted { out.append(t) } }
        return out
    }
    private var trackersStarted = false

    /// Stop the migration now, in any phase: the channel is shut down (a blocked send or
    /// receive returns at once), and `run()` rolls back and throws `.cancelled`. Returns false
    /// when it is too late: the destination was already told to take over (GO), or the
    /// migration has ended.
    @discardableResult
    public func cancel() -> Bool {
        control.withLock {
            guard !finished, !committed else { return false }
            cancelFlag = true
            if socketOpen { _ = Glibc.shutdown(socket.fd.rawValue, Int32(SHUT_RDWR)) }
            multifd?.shutdownSockets()
            deviceWaits?.cancel()  // a device server that hangs must not hold the cancel
            return true
        }
    }

    /// QEMU's rule for a `stop` during an active migration: stop-and-copy starts now, whatever
    /// the prediction, and the migration then ends normally. The caller pauses the vCPUs
    /// itself (the user's pause; the engine takes and releases its own) and leaves the
    /// devices alone. If the migration then fails, the devices are left in STOP rather than
    /// RUNNING, since the user stopped the VM (QEMU: no restart unless the VM ran before the
    /// stop). Returns false if no migration is in progress any more (do a normal stop then).
    @discardableResult
    public func requestSwitchover() -> Bool {
        control.withLock {
            guard !finished else { return false }
            switchoverFlag = true
            return true
        }
    }

    /// Cuts a hung device wait after a cancel (see DeviceWaitCancel); set while `run()` runs.
    private var deviceWaits: DeviceWaitCancel?
    /// Devices the rollback could not bring back (neither to their state nor by a reset): the
    /// caller reports them lost.
    public private(set) var lostDevices: [Int: String] = [:]

    private var isCancelled: Bool { control.withLock { cancelFlag } }
    private var switchoverRequested: Bool { control.withLock { switchoverFlag } }
    private func checkCancelled() throws { if isCancelled { throw MigrationError.cancelled } }

    /// What a failed socket operation means: our own cancel (which shut the socket down), the
    /// peer timeout (SO_SNDTIMEO/SO_RCVTIMEO give EAGAIN), or the channel's own error.
    private func channelError(_ error: Error, _ what: String, receiving: Bool = false) -> MigrationError {
        if isCancelled { return .cancelled }
        if let e = error as? Errno, e == .EAGAIN {
            let verb = receiving ? "did not answer" : "stopped reading"
            return .peerTimeout("destination \(verb) for \(parameters.peerTimeoutMS) ms during \(phase.rawValue) (\(what))")
        }
        return .channel("\(what): \(error)")
    }

    // MARK: sending

    private func nextID() -> UInt32 { sectionID &+= 1; return sectionID }

    private func send(_ type: MigrationStream.SectionType, pieces: [UnsafeRawBufferPointer], checksum: UInt64? = nil) throws {
        try checkCancelled()
        let id = nextID()
        try beforeSection?(type, id)
        let length = pieces.reduce(0) { $0 + $1.count }
        var sum = Checksum.seed
        if let c = checksum { sum = c } else { for p in pieces { sum = Checksum.update(sum, p) } }
        if corruptNextSectionForTesting { corruptNextSectionForTesting = false; sum ^= 1 }
        var t = BEWriter(); t.u64(sum)
        let head = MigrationStream.sectionHeader(type, id: id, length: length), tail = t.bytes
        let s0 = monotonicNanoseconds()
        do {
            try head.withUnsafeBytes { hb in try tail.withUnsafeBytes { tb in try sendAll([hb] + pieces + [tb]) } }
            if type == .ram && phase == .preCopy { downtimeModel.noteRAMSection(bytes: UInt64(length), ns: monotonicNanoseconds() - s0) }
        } catch {
            // The destination usually closed because it found something wrong: say what.
            let timedOut = (error as? Errno) == .EAGAIN
            if !timedOut, !isCancelled, (try? Poll.waitReadable(socket.fd, timeoutMilliseconds: 1000)) == true,
               let v = receiveSkippingProgress(), v.kind == .error {
                throw MigrationError.destination(v.text)
            }
            throw channelError(error, "sending \(type) section \(id)")
        }
        let n = UInt64(length + 24)
        lastMainSendNS = monotonicNanoseconds()
        stats.update { stats.transferredBytes += n }
        sentSinceStart += n
        afterSectionForTesting?(type, id)
        try pace()
        // After END the destination's next word is RDY, read by the handshake; before it,
        // anything readable is an early ERR (or a close).
        if type != .end { try checkDestination() }
    }

    private func send(_ type: MigrationStream.SectionType, _ payload: [UInt8]) throws {
        try payload.withUnsafeBytes { try send(type, pieces: [$0]) }
    }

    /// max-bandwidth: sleep when ahead of the allowed rate, in short slices that watch for
    /// cancel and switch-over. Stop-and-copy is not rate-limited (QEMU's ram_save_complete
    /// neither): the guest is paused, and limiting would only stretch the downtime.
    private func pace() throws {
        guard parameters.maxBandwidth > 0, phase != .stopAndCopy else { return }
        let due = sendStart + UInt64(Double(sentSinceStart) * 1e9 / Double(parameters.maxBandwidth))
        while true {
            let now = monotonicNanoseconds()
            guard due > now else { return }
            try checkCancelled()
            if switchoverRequested { return }
            try sampleDirty()
            usleep(UInt32(min(due - now, 20_000_000) / 1000))
            pacedNS += monotonicNanoseconds() - now
        }
    }

    /// The destination reports a failure as soon as it has one: check without blocking. A
    /// probe's answer (PRG) is noted and the check goes on.
    private func checkDestination() throws {
        // At most a few messages per check: a destination that floods PRG must not keep the
        // source here (the stream would stop, and no timeout fires while messages come).
        var budget = 64
        while budget > 0, (try? Poll.waitReadable(socket.fd, timeoutMilliseconds: 0)) == true {
            budget -= 1
            try checkCancelled()
            guard let v = Verdict.receive(socket) else { throw MigrationError.channel("the destination closed the connection") }
            if v.kind == .progress { noteProgress(v.text); continue }
            if v.kind == .error { throw MigrationError.destination(v.text) }
            throw MigrationError.channel("the destination sent \(v.kind) before the end of the stream")
        }
    }

    /// The next message that is not a probe's answer (those are noted), or nil.
    private func receiveSkippingProgress() -> Verdict.Message? {
        // Bounded: a destination that floods PRG has no verdict to give.
        for _ in 0..<1024 {
            guard let v = Verdict.receive(socket) else { return nil }
            guard v.kind == .progress else { return v }
            noteProgress(v.text)
        }
        return nil
    }

    // MARK: probes (see MigrationStream's SYNC)

    /// The last probe sent, when it went, and the last one the destination answered.
    private var probeNumber: UInt64 = 0, probeSentNS: UInt64 = 0, probeAnswered: UInt64 = 0
    /// Whether this destination answers probes at all (an older build does not).
    private var destinationAnswersProbes = false

    /// The delay of the last probe's answer.
    private var probeLagNS: UInt64 = 0
    /// The probe out is an idle one (nothing queued before it): its delay is a round trip, not
    /// a backlog.
    private var idleProbe = false
    /// When the last probe's answer was read.
    private var probeAnsweredAtNS: UInt64 = 0
    /// The probe sent after the stop-copy's RAM (single channel), and when its answer came:
    /// when the destination had applied the RAM remainder (the breakdown's split).
    private var stopProbeNumber: UInt64 = 0, stopProbeAnsweredNS: UInt64?

    private func noteProgress(_ text: String) {
        guard let n = DestinationTimes.value("x-probe", in: text), n <= probeNumber, n > probeAnswered else { return }
        probeAnswered = n
        destinationAnswersProbes = true
        guard n == probeNumber else { return }
        probeAnsweredAtNS = monotonicNanoseconds()
        if n == stopProbeNumber { stopProbeAnsweredNS = probeAnsweredAtNS; return }
        probeLagNS = probeAnsweredAtNS - probeSentNS
        if idleProbe { downtimeModel.noteRoundTrip(ns: probeLagNS) } else { downtimeModel.noteBacklog(ns: probeLagNS) }
    }

    /// A probe after everything sent so far (on the main channel; with multifd after the
    /// pass's SYNC, which the destination answers only once every channel reached it).
    private func sendProbe(idle: Bool = false) throws {
        probeNumber += 1
        idleProbe = idle
        // Before the send: its answer can come back (and be read by send's own check) at once.
        probeSentNS = monotonicNanoseconds()
        try send(.sync, MigrationStream.probePayload(probeNumber))
    }

    /// Wait until the destination answered the last probe: it has applied everything sent
    /// before it. The VM runs meanwhile, and its writes are sampled into the next pass.
    /// Returns false when no answer came within `timeoutMS` (or a stop asked for the
    /// switch-over now).
    private func awaitProbe(timeoutMS: UInt64) throws -> Bool {
        let deadline = monotonicNanoseconds() + timeoutMS * 1_000_000
        while probeAnswered < probeNumber {
            try checkCancelled()
            if switchoverRequested { return false }
            let now = monotonicNanoseconds()
            guard now < deadline else { return false }
            let ms = Int32(clamping: min((deadline - now) / 1_000_000 + 1, 5))
            if (try? Poll.waitReadable(socket.fd, timeoutMilliseconds: ms)) == true { try checkDestination() }
            try sampleDirty()
        }
        return true
    }

    /// Pages the vCPUs dirtied since the last look, OR'ed into the next iteration's bitmap.
    /// Sampling KVM's log every few milliseconds (instead of once per iteration) is what makes
    /// the dirty rate true: a page rewritten many times in one long iteration is one bit in a
    /// per-iteration bitmap, so a small working set capped the measured rate far below the
    /// guest's (a 4096-page set swept at 200 K pages/s over a 6 s iteration read 0.7 K/s).
    private func sampleDirty(force: Bool = false) throws {
        guard phase == .preCopy, !pendingDirty.isEmpty else { return }
        let now = monotonicNanoseconds()
        guard force || now - lastSampleNS >= 5_000_000 else { return }
        lastSampleNS = now
        let bits: [UInt64]
        do { bits = try vm.harvestDirtyPages() } catch { throw MigrationError.channel("harvesting the dirty log: \(error)") }
        var n = 0
        for k in 0..<min(bits.count, pendingDirty.count) where bits[k] != 0 {
            pendingDirty[k] |= bits[k]
            n += bits[k].nonzeroBitCount
        }
        dirtiedInWindow += UInt64(n)
        throttleWindowDirtied += UInt64(n)
        considerThrottle(now)
    }

    /// Auto-converge with QEMU's trigger (migration_trigger_throttle): when the bytes dirtied
    /// in a period exceed half of the bytes sent in it, twice, throttle the vCPUs
    /// (cpu-throttle-initial, then + cpu-throttle-increment, up to the max; QEMU's steps). QEMU
    /// evaluates at bitmap syncs, about once per iteration, and counts a page once per sync;
    /// here a period is 500 ms of pre-copy after the bulk pass and counts the sampled dirty
    /// rate, so a step comes every second whatever an iteration lasts: at a low max-bandwidth
    /// one iteration takes seconds, and a small working set rewritten within it counted once
    /// per iteration, so reaching 99 % took minutes.
    private var throttleUnavailable = false
    private func considerThrottle(_ now: UInt64) {
        guard parameters.autoConverge, !throttleUnavailable else { return }
        if stats.iterations == 0 || throttleWindowNS == 0 {
            // QEMU does not throttle during the bulk pass either.
            throttleWindowNS = now; throttleWindowSent = sentSinceStart; throttleWindowDirtied = 0
            return
        }
        guard now - throttleWindowNS >= 500_000_000 else { return }
        let sent = sentSinceStart - throttleWindowSent
        if Double(throttleWindowDirtied * 4096) > Double(sent) * 0.5 { highDirtyCount += 1 }
        throttleWindowNS = now; throttleWindowSent = sentSinceStart; throttleWindowDirtied = 0
        guard highDirtyCount >= 2 else { return }
        highDirtyCount = 0
        guard throttle < parameters.throttleMax else { return }
        throttle = throttle == 0 ? min(parameters.throttleInitial, parameters.throttleMax) : min(throttle + parameters.throttleIncrement, parameters.throttleMax)
        do { try throttler.set(percent: throttle) } catch {
            // Auto-converge is a help, not a need: the migration goes on (and may be forced or
            // fail to converge, as without the capability). Not tried again in this migration:
            // each try can hold this thread for OSThread's 2 s of retries.
            Log.warning("migration", "auto-converge: \(error); the vCPUs run unthrottled for the rest of this migration")
            throttle = 0
            throttleUnavailable = true
            stats.update { stats.throttlePercent = 0 }
            return
        }
        stats.update { stats.throttlePercent = throttle }
        Log.debug("migration", "auto-converge: vCPUs throttled to \(throttle)%")
    }

    /// Runs of pages collected for one RAM section.
    struct RAMBatch {
        var gpa: [UInt64] = [], count: [UInt32] = [], zero: [Bool] = []
        var dataBytes = 0
        var isEmpty: Bool { gpa.isEmpty }
        mutating func add(page p: UInt64, zero z: Bool) {
            if let last = gpa.indices.last, zero[last] == z, gpa[last] + UInt64(count[last]) * 4096 == p * 4096, count[last] < 256 {
                count[last] += 1
            } else {
                gpa.append(p * 4096); count.append(1); zero.append(z)
            }
            if !z { dataBytes += 4096 }
        }
        mutating func reset() { gpa.removeAll(keepingCapacity: true); count.removeAll(keepingCapacity: true); zero.removeAll(keepingCapacity: true); dataBytes = 0 }
    }

    /// One RAM section from the batch, pages straight from guest RAM to the socket (sendmsg
    /// with one iovec per run; no user-space copy). Live pages change under us, and that is
    /// safe for pre-copy's own reason: the dirty log this pass came from was harvested (and
    /// cleared) before any of its pages was read, so a write that lands while a page is being
    /// sent (even one that tears the copy the socket took) sets the page's bit again in KVM's
    /// log or the device's DMA log, and the page goes again in a later pass; the last pass runs
    /// with vCPUs paused and devices in STOP_COPY, so what it sends is final. The destination
    /// applies passes in order (one channel is one ordered stream), so a newer copy of a page
    /// always lands after an older one.
    ///
    /// With the payload-checksum capability the section is copied into the staging buffer with
    /// a fused checksum instead: a checksum over live memory would not match what the socket
    /// took a moment later.
    private func flush(_ b: inout RAMBatch) throws {
        guard !b.isEmpty else { return }
        if let mf = multifd {
            // Round robin over the channels; the worker builds and sends the section.
            let ch = nextChannel
            nextChannel = (nextChannel + 1) % mf.sockets.count
            sentSinceStart += UInt64(b.dataBytes)
            do { try mf.submit(.ram(b), to: ch) } catch { throw multifdFailed(error) }
            b.reset()
            try keepMainAlive()
            try checkDestination()
            try pace()
            try sampleDirty()
            return
        }
        try sendRAM(b, staging: staging) { pieces, sum in try send(.ram, pieces: pieces, checksum: sum) }
        b.reset()
        try sampleDirty()
    }

    /// Build one RAM section of `b` (see flush) and hand its pieces and checksum to `emit`.
    private func sendRAM(_ b: RAMBatch, staging: MappedRegion, _ emit: ([UnsafeRawBufferPointer], UInt64) throws -> Void) throws {
        let base = vm.memory.base
        var table = BEWriter()
        table.u32(UInt32(b.gpa.count))
        for i in b.gpa.indices { table.u64(b.gpa[i]); table.u32(b.count[i]); table.u32(b.zero[i] ? 1 : 0) }
        let t = table.bytes
        var sum = t.withUnsafeBytes { Checksum.update(Checksum.seed, $0) }
        var z: UInt64 = 0, n: UInt64 = 0
        var runs: [UnsafeRawBufferPointer] = []
        if parameters.payloadChecksum {
            var at = 0
            for i in b.gpa.indices {
                if b.zero[i] { z += UInt64(b.count[i]); continue }
                let bytes = Int(b.count[i]) * 4096
                sum = Checksum.copy(sum, from: UnsafeRawBufferPointer(start: base + Int(b.gpa[i]), count: bytes), to: staging.base + at)
                at += bytes
                n += UInt64(b.count[i])
            }
            runs = [UnsafeRawBufferPointer(start: staging.base, count: at)]
        } else {
            runs.reserveCapacity(b.gpa.count)
            for i in b.gpa.indices {
                if b.zero[i] { z += UInt64(b.count[i]); continue }
                runs.append(UnsafeRawBufferPointer(start: base + Int(b.gpa[i]), count: Int(b.count[i]) * 4096))
                n += UInt64(b.count[i])
            }
        }
        try t.withUnsafeBytes { tb in try emit([tb] + runs, sum) }
        stats.update { stats.zeroPages += z; stats.normalPages += n; stats.ramBytes += n * 4096 }
    }

    // MARK: multifd (see Multifd.swift)

    /// Connect the channels and say hello on each, before any stream byte goes out: a failure
    /// here leaves the destination untouched (its main connection closes empty).
    private func openChannels() throws {
        guard let open = openChannel else { throw MigrationError.blocked("multifd is on but nothing can open its channels (the VMM connects them to the migration URI)") }
        let n = parameters.multifdChannels
        guard Multifd.channelRange.contains(n) else { throw MigrationError.blocked("multifd-channels \(n) is outside \(Multifd.channelRange)") }
        multifdNonce = UInt64.random(in: 1...UInt64.max)
        var socks: [StreamSocket] = []
        do {
            for i in 0..<n {
                let s = try open()
                socks.append(s)
                Self.setPeerTimeout(s, ms: parameters.peerTimeoutMS, sendSliceMS: max(parameters.peerTimeoutMS / 4, 1))
                try s.send(Multifd.hello(index: i, channels: n, nonce: multifdNonce))
            }
            channelStaging = try (0..<n).map { _ in
                try MappedRegion(anonymous: parameters.payloadChecksum ? (4 << 20) + 256 * 4096 : 4096, populate: parameters.payloadChecksum)
            }
        } catch {
            for s in socks { s.fd.close() }
            throw MigrationError.channel("opening multifd channel \(socks.count) of \(n): \(error)")
        }
        channelSectionIDs = (0..<n).map { _ in MultifdReceiver.ManagedCounter() }
        let sender = MultifdSender(sockets: socks)
        control.withLock { multifd = sender }
        do { try sender.start { [unowned self] ch, job in try self.perform(ch, job, on: socks[ch]) } } catch {
            // Before the first stream byte: the destination sees the connection close.
            throw MigrationError.channel("starting the multifd channels' threads: \(error)")
        }
    }
    private var multifdNonce: UInt64 = 0

    private func stopChannels() {
        let mf = control.withLock { () -> MultifdSender? in let m = multifd; multifd = nil; return m }
        mf?.stop()
    }

    /// A worker's job on channel `ch` (runs on that channel's thread).
    private func perform(_ ch: Int, _ job: MultifdSender.Job, on s: StreamSocket) throws {
        do {
            switch job {
            case let .ram(b):
                try sendRAM(b, staging: channelStaging[ch]) { pieces, sum in try channelSend(ch, s, .ram, pieces, sum) }
            case let .device(i, final):
                try sendDeviceData(i, final: final) { bytes in try bytes.withUnsafeBytes { try self.channelSend(ch, s, .device, [$0], nil) } }
            case let .sync(seq, last):
                try Multifd.syncPayload(sequence: seq, last: last).withUnsafeBytes { try channelSend(ch, s, .sync, [$0], nil) }
            }
        } catch let e as MigrationError {
            throw e
        } catch {
            throw channelError(error, "multifd channel \(ch)")
        }
    }

    /// One section on channel `ch` (its own section ids).
    private func channelSend(_ ch: Int, _ s: StreamSocket, _ type: MigrationStream.SectionType, _ pieces: [UnsafeRawBufferPointer], _ checksum: UInt64?) throws {
        try checkCancelled()
        channelSectionIDs[ch].value += 1
        let id = UInt32(truncatingIfNeeded: channelSectionIDs[ch].value)
        let length = pieces.reduce(0) { $0 + $1.count }
        var sum = Checksum.seed
        if let c = checksum { sum = c } else { for p in pieces { sum = Checksum.update(sum, p) } }
        var t = BEWriter(); t.u64(sum)
        let head = MigrationStream.sectionHeader(type, id: id, length: length), tail = t.bytes
        try head.withUnsafeBytes { hb in try tail.withUnsafeBytes { tb in try sendAll([hb] + pieces + [tb], on: s) } }
        let n = UInt64(length + 24)
        stats.update { stats.transferredBytes += n }
        afterChannelSectionForTesting?(ch, type)
    }

    /// The end of a pass: SYNC on every channel, then on the main channel once all went out.
    private func syncPass(last: Bool) throws {
        guard let mf = multifd else { return }
        syncSequence += 1
        do {
            for ch in mf.sockets.indices { try mf.submit(.sync(syncSequence, last: last), to: ch) }
            try mf.drain()
        } catch { throw multifdFailed(error) }
        try send(.sync, Multifd.syncPayload(sequence: syncSequence, last: last))
    }

    /// Device data of a pass on its channel (device i always on channel i mod N: its order).
    private func queueDeviceData(_ i: Int, final: Bool) throws {
        guard let mf = multifd else { try sendDeviceData(i, final: final); return }
        do { try mf.submit(.device(i, final: final), to: i % mf.sockets.count) } catch { throw multifdFailed(error) }
    }

    /// The main channel is silent while the channels carry a pass: a keep-alive SYNC (flag 2,
    /// no barrier) every quarter of the peer timeout keeps the destination from calling the
    /// source silent.
    private func keepMainAlive() throws {
        let quarter = max(parameters.peerTimeoutMS / 4, 1) * 1_000_000
        guard parameters.peerTimeoutMS > 0, monotonicNanoseconds() - lastMainSendNS >= quarter else { return }
        var w = BEWriter(); w.u64(syncSequence); w.u32(2); w.u32(0)
        try send(.sync, w.bytes)
    }

    /// What a channel failure means: our cancel, the destination's own refusal (its ERR on the
    /// main channel), or the channel's error.
    private func multifdFailed(_ e: Error) -> Error {
        if isCancelled { return MigrationError.cancelled }
        if (try? Poll.waitReadable(socket.fd, timeoutMilliseconds: 1000)) == true, let v = receiveSkippingProgress(), v.kind == .error {
            return MigrationError.destination(v.text)
        }
        return e
    }

    /// Send the pages set in `bitmap` as RAM sections of runs; zero pages travel as run
    /// headers only. In pre-copy a switch-over request ends the pass early: the result's
    /// `stoppedAt` is then the first page not looked at (the rest of the bitmap still has to go).
    /// Every page has gone once (the first pre-copy pass ended without a switch-over request).
    private var bulkPassDone = false
    /// Pages ahead whose first cache line is prefetched for the zero-page test.
    static let prefetchDistance: UInt64 = 8
    @discardableResult
    private func sendPages(_ bitmap: [UInt64]) throws -> (sent: UInt64, stoppedAt: UInt64?) {
        let base = vm.memory.base
        let pages = vm.memory.size / 4096
        var batch = RAMBatch()
        var sent: UInt64 = 0
        var p: UInt64 = 0
        // Holes of the memfd are zero pages we need not (and should not) read. Only the bulk
        // pass looks them up: the lookup scans the whole memfd (about 20 ms per GiB), and a page
        // dirtied after the bulk pass was written, so it is data. Doing it in stop-copy made an
        // idle VM's downtime grow by about 10 ms per GiB.
        let extents = bulkPassDone ? nil : vm.memory.dataExtents()
        var e = 0
        while p < pages {
            let w = bitmap[Int(p / 64)]
            if w == 0 && p % 64 == 0 { p += 64; continue }
            if w & (1 << (p % 64)) == 0 { p += 1; continue }
            let addr = p * 4096
            var inHole = false
            if let extents {
                while e < extents.count && extents[e].upperBound <= addr { e += 1 }
                inHole = e == extents.count || !extents[e].contains(addr)
            }
            if !inHole {
                // A dirty page a few ahead gets its first line on the way.
                let ahead = p + Self.prefetchDistance
                if ahead < pages, bitmap[Int(ahead / 64)] & (1 << (ahead % 64)) != 0 { GuestMemory.prefetchPage(base + Int(ahead * 4096)) }
            }
            batch.add(page: p, zero: inHole || GuestMemory.isZeroPage(base + Int(addr)))
            sent += 1
            // The staging buffer holds 4 MiB plus one run.
            if batch.gpa.count >= 400 || batch.dataBytes >= sectionDataLimit {
                try flush(&batch)
                if phase == .preCopy && switchoverRequested { return (sent, p + 1) }
            }
            p += 1
        }
        try flush(&batch)
        return (sent, nil)
    }

    /// Device records in a DEVICE section: everything the device has now (pre-copy), or to the
    /// end of its stream (stop-copy).
    @discardableResult
    private func sendDeviceData(_ i: Int, final: Bool, emit: (([UInt8]) throws -> Void)? = nil) throws -> UInt64 {
        let d = devices[i]
        var moved: UInt64 = 0
        var records = BEWriter()
        records.u32(UInt32(i))
        func flush() throws {
            records.u64(MigrationStream.VFIOTag.endOfState.rawValue)
            if let emit { try emit(records.bytes) } else { try send(.device, records.bytes) }
            records = BEWriter(); records.u32(UInt32(i))
        }
        // Pre-copy with nothing pending (initial and dirty bytes both 0): no read, as QEMU's
        // iterate reports the device done then.
        let idle = !final && d.initialDataSent && d.migration.preCopyInfo().map { $0.initialBytes == 0 && $0.dirtyBytes == 0 } == true
        // A device whose reads are never short would keep this loop (and the VM's pause) forever.
        var budget = DeviceMigration.DataBudget()
        while !idle {
            try checkCancelled()
            if !final && switchoverRequested { break }
            let data: [UInt8]
            do { data = try d.migration.read(max: 1 << 20) } catch { throw MigrationError.device(i, "reading migration data: \(error)") }
            if !data.isEmpty {
                records.u64(MigrationStream.VFIOTag.dataState.rawValue); records.u64(UInt64(data.count)); records.append(data)
                moved += UInt64(data.count)
                if records.bytes.count >= 4 << 20 { try flush() }
                do { try budget.check(moved: moved, device: d.migration) } catch { throw MigrationError.device(i, "reading migration data: \(error)") }
            }
            if data.count < 1 << 20 { break }  // a short read ends the data available now
        }
        // QEMU sends DEV_INIT_DATA_SENT once the kernel's initial_bytes (PRECOPY_INFO) reached
        // 0 (vfio_save_iterate); a transport without that query: after its first round.
        if !final && !d.initialDataSent && (d.migration.preCopyInfo()?.initialBytes ?? 0) == 0 {
            d.initialDataSent = true
            records.u64(MigrationStream.VFIOTag.initDataSent.rawValue)
        }
        try flush()
        stats.update { stats.deviceBytes[i] += moved }
        return moved
    }

    /// The device's standard config header (up to 256 bytes) and whether its interrupt is
    /// wired; the destination restores its own `configStateRanges` from it and rewires.
    private func sendDeviceConfig(_ i: Int) throws {
        let a = devices[i].attached
        let cfg: [UInt8]
        do {
            let size = try a.device.describeRegion(VFIOPCIIndex.config).size
            cfg = try a.device.regionRead(VFIOPCIIndex.config, offset: 0, count: Int(min(size, 256)))
        } catch { throw MigrationError.device(i, "reading config space: \(error)") }
        var w = BEWriter()
        w.u32(UInt32(i))
        w.u64(MigrationStream.VFIOTag.configState.rawValue)
        var body = BEWriter()
        body.u32(UInt32(cfg.count)); body.append(cfg)
        // Byte 0: the interrupt PCI attach chose (MSI-X, MSI or INTx) is wired to an eventfd.
        body.append([a.interruptKind.irqIndex != nil ? 1 : 0, 0])
        w.u32(UInt32(body.bytes.count)); w.append(body.bytes)
        w.u64(MigrationStream.VFIOTag.endOfState.rawValue)
        try send(.device, w.bytes)
    }

    /// KVM's log OR every device's DMA log OR each IOMMU tracker's bitmap (once per tracker).
    /// A device with neither marks all mapped RAM dirty at stop (`final`), as QEMU's
    /// vfio_container_query_dirty_bitmap does without tracking: what it wrote during pre-copy
    /// is unknown, so the stop-copy resends it all.
    private func harvest(final: Bool = false) throws -> [UInt64] {
        var bits = try vm.harvestDirtyPages()
        for (i, d) in devices.enumerated() {
            switch d.dirtyMethod {
            case .deviceLogging:
                let w: [UInt64]
                do { w = try d.attached.device.dmaLoggingReport(iova: 0, length: vm.memory.size, pageSize: 4096) } catch {
                    throw MigrationError.device(i, "DMA_LOGGING_REPORT failed: \(error)")
                }
                for k in 0..<min(w.count, bits.count) { bits[k] |= w[k] }
            case .iommu: break
            case .allDirty:
                guard final, d.attached.pci?.dmaMapped != false else { break }
                for k in bits.indices { bits[k] = ~0 }
                let pages = vm.memory.size / 4096
                if pages % 64 != 0 { bits[bits.count - 1] = (1 << (pages % 64)) - 1 }
            }
        }
        for t in trackers {
            let w: [UInt64]
            do { w = try t.dirtyBitmap(iova: 0, size: vm.memory.size, pageSize: 4096) } catch {
                throw MigrationError.channel("reading the IOMMU's dirty bitmap: \(error)")
            }
            for k in 0..<min(w.count, bits.count) { bits[k] |= w[k] }
        }
        return bits
    }

    /// SO_SNDTIMEO/SO_RCVTIMEO: no send or receive on the channel blocks longer than the peer
    /// timeout without progress (EAGAIN then, reported as `.peerTimeout`).
    static func setPeerTimeout(_ s: StreamSocket, ms: UInt64, sendSliceMS: UInt64? = nil) {
        guard ms > 0 else { return }
        for (opt, v) in [(SO_SNDTIMEO, sendSliceMS ?? ms), (SO_RCVTIMEO, ms)] {
            var tv = timeval(tv_sec: Int(v / 1000), tv_usec: Int(v % 1000) * 1000)
            _ = setsockopt(s.fd.rawValue, SOL_SOCKET, opt, &tv, socklen_t(MemoryLayout<timeval>.size))
        }
    }

    /// Less than this in a whole peer-timeout window is a stalled peer, not a slow one.
    static let minimumProgress = 64 << 10

    /// All of `buffers` in sendmsg calls, failing with EAGAIN when less than 64 KiB went out
    /// in the peer timeout since the last 64 KiB. SO_SNDTIMEO alone bounds one call without any progress, but
    /// a SIGSTOPped peer's kernel still takes a trickle as it collapses its receive queue, so
    /// each call made a little progress and the stall lasted 3x the timeout. The send timeout
    /// is a slice here (a quarter of the window) so the loop looks at the clock.
    private func sendAll(_ buffers: [UnsafeRawBufferPointer], on channel: StreamSocket? = nil) throws {
        let socket = channel ?? self.socket
        var iovs = buffers.filter { $0.count > 0 }.map { iovec(iov_base: UnsafeMutableRawPointer(mutating: $0.baseAddress), iov_len: $0.count) }
        let window = parameters.peerTimeoutMS * 1_000_000
        var windowStart = monotonicNanoseconds(), windowBytes = 0
        var first = 0
        while first < iovs.count {
            var n = iovs.withUnsafeMutableBufferPointer { p -> Int in
                var m = msghdr()
                m.msg_iov = p.baseAddress! + first
                m.msg_iovlen = p.count - first
                return Glibc.sendmsg(socket.fd.rawValue, &m, Int32(MSG_NOSIGNAL))
            }
            if n < 0 {
                let e = errno
                if e == EINTR { continue }
                guard e == EAGAIN || e == EWOULDBLOCK else { throw Errno(e) }
                n = 0
            }
            windowBytes += n
            // Drop what went out from the front of the list.
            while n > 0 {
                if n >= iovs[first].iov_len { n -= iovs[first].iov_len; first += 1 } else {
                    iovs[first].iov_base += n
                    iovs[first].iov_len -= n
                    n = 0
                }
            }
            // The stall clock restarts at each 64 KiB that went out.
            let now = monotonicNanoseconds()
            if windowBytes >= Self.minimumProgress { windowStart = now; windowBytes = 0 }
            else if window > 0 && now - windowStart >= window && first < iovs.count { throw Errno.EAGAIN }
            if isCancelled { throw MigrationError.cancelled }
        }
    }

    // MARK: the migration

    /// Run the whole migration. Throws after rolling back on failure or cancel.
    public func run() throws {
        guard control.withLock({ !finished && claimed }) else { throw MigrationError.blocked("this migration already ran; start a new one") }
        // The VM is free for another migration (or a live update) once this one has ended.
        defer { if claimed { claimed = false; Self.release(vm) } }
        stats.update { stats.startNS = monotonicNanoseconds(); stats.totalBytes = vm.memory.size; stats.downtimeLimitMS = parameters.downtimeLimitMS }
        stats.set(.setup)
        Self.setPeerTimeout(socket, ms: parameters.peerTimeoutMS, sendSliceMS: max(parameters.peerTimeoutMS / 4, 1))
        // Whatever happens, the channel closes: a destination waiting for more learns it is over.
        defer {
            stopChannels()
            control.withLock {
                _ = Glibc.shutdown(socket.fd.rawValue, Int32(SHUT_RDWR))
                socket.fd.close()
                socketOpen = false
            }
        }
        // Without its watcher a cancel could not give up a wait on a hanging device: no
        // migration then (nothing has been touched yet).
        let waits: DeviceWaitCancel
        do { waits = try DeviceWaitCancel(clients: devices.compactMap { $0.attached.vfioUserClient }) } catch {
            let e = MigrationError.blocked("cannot watch the devices' waits for a cancel: \(error)")
            stats.update { stats.totalTimeMS = Double(monotonicNanoseconds() - stats.startNS) / 1e6 }
            stats.set(.failed, error: "\(e)")
            throw e
        }
        control.withLock { deviceWaits = waits; if cancelFlag { waits.cancel() } }
        defer { waits.release() }
        do {
            try migrate()
        } catch let error as MigrationError where error.isUnconfirmed {
            stopChannels()
            waits.release()
            // GO went out: the destination may run the guest, so nothing is rolled back.
            finishUnconfirmed()
            stats.update { stats.totalTimeMS = Double(monotonicNanoseconds() - stats.startNS) / 1e6; stats.sourceOutcome = "the source VM stays paused (the destination may run it)" }
            stats.set(.failed, error: "\(error)")
            Log.error("migration", "\(error)")
            throw error
        } catch {
            let error = isCancelled ? MigrationError.cancelled : error
            // The workers first: none may still read a device that goes back to RUNNING.
            stopChannels()
            waits.release()  // the rollback waits on the devices with their own cancel again
            let stopped = rollback()
            let cancelled = (error as? MigrationError).map { if case .cancelled = $0 { return true }; return false } ?? false
            var outcome = stopped ? "the VM stays paused at the source, as it was stopped" : "the VM runs on at the source"
            for (i, why) in lostDevices.sorted(by: { $0.key < $1.key }) { outcome += "; device \(i) is lost (\(why))" }
            stats.update { stats.totalTimeMS = Double(monotonicNanoseconds() - stats.startNS) / 1e6; stats.sourceOutcome = outcome }
            stats.set(cancelled ? .cancelled : .failed, error: "\(error)")
            Log.warning("migration", "\(error); \(outcome)")
            throw error
        }
    }

    private func migrate() throws {
        let pages = vm.memory.size / 4096
        sendStart = monotonicNanoseconds()
        try checkCancelled()
        vmWasPausedAtStart = pausedAtStart ?? vm.isPaused
        // Setup first, before any byte goes out: a failure here leaves the destination
        // untouched (it sees the connection close before the stream: `.closedBeforeStream`).
        // Dirty logging on (vCPUs and devices), running devices to PRE_COPY.
        try vm.setDirtyLogging(true)
        _ = try vm.harvestDirtyPages()
        for (i, d) in devices.enumerated() {
            do { d.initialState = try d.migration.state() } catch { throw MigrationError.device(i, "reading its migration state: \(error)") }
            if d.logging {
                do { try d.attached.device.startDMALogging(pageSize: 4096, ranges: [(0, vm.memory.size)]) } catch {
                    throw MigrationError.device(i, "DMA_LOGGING_START failed: \(error)")
                }
                d.loggingStarted = true
            }
            // A stopped device (paused VM) stays in STOP until stop-copy, as in QEMU.
            if d.migration.capabilities.contains(.preCopy) && d.initialState == .running {
                do { try d.migration.transition(to: .preCopy) } catch { throw MigrationError.device(i, "\(error)") }
                d.inPreCopy = true
            }
        }
        if !trackers.isEmpty {
            // The container's VFIO_IOMMU_DIRTY_PAGES (QEMU: vfio_container_set_dirty_page_tracking).
            trackersStarted = true
            for t in trackers {
                do { try t.startDirtyTracking() } catch { throw MigrationError.blocked("starting the IOMMU's dirty tracking: \(error)") }
            }
        }
        let streamFlags = parameters.payloadChecksum ? 0 : MigrationStream.flagUncheckedPayload
        if parameters.multifd { try openChannels() }
        do { try MigrationStream.header(flags: streamFlags | (parameters.multifd ? MigrationStream.flagMultifd : 0)).withUnsafeBytes { try sendAll([$0]) } } catch { throw channelError(error, "sending the stream header") }
        try send(.config, MigrationStream.configPayload(ramSize: vm.memory.size, vcpus: vm.vcpuCount, devices: devices.count))
        if parameters.multifd { try send(.multifd, Multifd.announcePayload(channels: parameters.multifdChannels, nonce: multifdNonce)) }
        for i in devices.indices {
            var w = BEWriter(); w.u32(UInt32(i))
            w.u64(MigrationStream.VFIOTag.setupState.rawValue); w.u64(MigrationStream.VFIOTag.endOfState.rawValue)
            try send(.device, w.bytes)
        }
        // A first probe now, with little queued before it: its answer, long before the first
        // switch-over decision, tells whether this destination answers probes at all.
        try sendProbe()
        stats.update { stats.setupNS = monotonicNanoseconds() - stats.startNS }
        stats.set(.active)
        phase = .preCopy
        vcpuSchedAtStart = (monotonicNanoseconds(), DowntimeModel.threadSchedStats())
        // Iterations.
        var dirty = [UInt64](repeating: ~0, count: Int((pages + 63) / 64))
        if pages % 64 != 0 { dirty[dirty.count - 1] = (1 << (pages % 64)) - 1 }
        pendingDirty = [UInt64](repeating: 0, count: dirty.count)
        lastSampleNS = monotonicNanoseconds(); windowStartNS = lastSampleNS; dirtiedInWindow = 0
        while true {
            try checkCancelled()
            if switchoverRequested { break }
            let t0 = monotonicNanoseconds(), b0 = stats.transferredBytes, p0 = pacedNS
            // A pass to a destination that has applied everything before it, after the bulk
            // pass (whose zero runs the destination clears slowly): its end-to-end time is
            // what the stop-copy's RAM will cost (DowntimeModel.caughtUpPass).
            let toCaughtUp = bulkPassDone && destinationAnswersProbes && probeAnswered == probeNumber
            let pass = try sendPages(dirty)
            if pass.stoppedAt == nil { bulkPassDone = true }
            let ramNS = monotonicNanoseconds() - t0
            downtimeModel.noteRAM(bytes: stats.transferredBytes - b0, ns: ramNS - min(pacedNS - p0, ramNS))
            if let stop = pass.stoppedAt {
                // Switch-over requested mid-pass: pages from `stop` on were not sent yet.
                for k in dirty.indices {
                    let first = UInt64(k) * 64
                    if first + 64 <= stop { dirty[k] = 0 } else if first < stop { dirty[k] &= ~((1 << (stop - first)) - 1) }
                }
                for k in dirty.indices { dirty[k] |= pendingDirty[k]; pendingDirty[k] = 0 }
                try syncPass(last: false)
                break
            }
            if multifd != nil {
                // On the channels, beside RAM: the downtime model keeps the device rates it
                // measured without multifd (MIG_DATA_SIZE still feeds the prediction).
                for i in devices.indices where devices[i].inPreCopy { try queueDeviceData(i, final: false) }
            } else {
                for i in devices.indices where devices[i].inPreCopy {
                    let d0 = monotonicNanoseconds(), q0 = pacedNS
                    let moved = try sendDeviceData(i, final: false)
                    let dt = monotonicNanoseconds() - d0
                    downtimeModel.noteDevice(i, bytes: moved, ns: dt - min(pacedNS - q0, dt))
                }
            }
            try syncPass(last: false)
            // Everything of this pass is out: the probe's answer says when it is applied.
            try sendProbe()
            try sampleDirty(force: true)
            let h0 = monotonicNanoseconds()
            dirty = try harvest()
            downtimeModel.harvestNS = monotonicNanoseconds() - h0
            for k in dirty.indices { dirty[k] |= pendingDirty[k]; pendingDirty[k] = 0 }
            let now = monotonicNanoseconds()
            let dt = max(now - t0, 1)
            let bytes = stats.transferredBytes - b0
            // Bandwidth of this iteration (a floor of 1 MB/s keeps the estimate finite).
            let bw = max(Double(bytes) / (Double(dt) / 1e9), 1e6)
            // Everything inside the stop, from costs measured in this migration (DowntimeModel);
            // the destination is still applying this pass (its probe is unanswered), which a
            // stop now would wait for: the backlog the last probe took to drain.
            var prediction = predictSwitchover(dirty, fallbackRate: bw, caughtUp: false)
            // The dirty rate over the last iteration(s), at least 250 ms of them.
            let window = now - windowStartNS
            let rate: UInt64? = window >= 250_000_000 || stats.iterations == 0 ? UInt64(Double(dirtiedInWindow) / (Double(max(window, 1)) / 1e9)) : nil
            if rate != nil { windowStartNS = now; dirtiedInWindow = 0 }
            stats.update {
                stats.iterations += 1
                stats.bandwidth = bw
                if let r = rate { stats.dirtyPagesRate = r }
            }
            publish(prediction)
            Log.debug("migration", "iteration \(stats.iterations): \(pass.sent) pages, \(prediction.dirtyPages) dirtied meanwhile, expected downtime \(Int(prediction.phases.totalMS)) ms, dirty rate \(stats.dirtyPagesRate) pages/s")
            // Switch over only when the whole predicted stop fits the limit.
            let limit = Double(downtimeLimitMS)
            let forced = prediction.phases.totalMS > limit && stats.iterations >= parameters.maxIterations
            if prediction.phases.totalMS > limit && !forced { continue }
            // Before the stop, the destination catches up with what it has not applied yet (the
            // VM runs meanwhile): a stop now would wait for it inside the downtime. Then the
            // prediction again, with what was dirtied during the wait.
            let bound = min(parameters.peerTimeoutMS == 0 ? 5000 : parameters.peerTimeoutMS, 2000)
            let w0 = monotonicNanoseconds()
            let caughtUp = try awaitProbe(timeoutMS: bound)
            catchUpNS += monotonicNanoseconds() - w0
            for k in dirty.indices { dirty[k] |= pendingDirty[k]; pendingDirty[k] = 0 }
            if caughtUp {
                if toCaughtUp {
                    let paced = pacedNS - p0
                    let e2e = probeAnsweredAtNS > t0 ? probeAnsweredAtNS - t0 : 0
                    downtimeModel.noteCaughtUpPass(bytes: stats.transferredBytes - b0, ns: e2e - min(paced, e2e))
                }
                // Nothing queued now: each answer's delay is the bare round trip that each of
                // the switch-over's two exchanges (END→READY, GO→ACK) takes; three of them, as
                // one is a wake-up latency on a loaded machine.
                for _ in 0..<3 where !switchoverRequested {
                    try sendProbe(idle: true)
                    guard try awaitProbe(timeoutMS: bound) else { break }
                }
                for k in dirty.indices { dirty[k] |= pendingDirty[k]; pendingDirty[k] = 0 }
                prediction = predictSwitchover(dirty, fallbackRate: bw, caughtUp: true)
                publish(prediction)
                if prediction.phases.totalMS > limit && !forced {
                    Log.debug("migration", "the destination caught up, but what was dirtied meanwhile does not fit: one more pass")
                    continue
                }
                // The pass before went to a destination that was behind (or was the bulk pass):
                // what the VM dirtied while it caught up goes now, with the VM running, to a
                // destination that has nothing queued, timed end to end. The stop then sends
                // only what this short pass leaves, predicted at the rate it measured. After
                // this pass the destination is caught up at its start, so there is one such pass.
                if !toCaughtUp && !forced && !switchoverRequested && prediction.dirtyPages * 4096 >= DowntimeModel.minimumTimedPassBytes {
                    Log.debug("migration", "the destination caught up: one pass of the \(prediction.dirtyPages) pages dirtied meanwhile, timed end to end, before the stop")
                    continue
                }
            } else if !switchoverRequested && destinationAnswersProbes && !forced {
                // Bounded by maxIterations too: a destination that answers a first probe and
                // then never again (or always late) would otherwise keep pre-copy going forever.
                if stats.iterations < parameters.maxIterations {
                    Log.debug("migration", "the destination is more than \(bound) ms behind: one more pass")
                    continue
                }
                Log.warning("migration", "the destination is still more than \(bound) ms behind after \(stats.iterations) iterations: switching over anyway")
                stats.update { stats.forcedSwitchover = true }
            } else if !switchoverRequested && !destinationAnswersProbes {
                Log.info("migration", "the destination does not answer probes (an older build): switching over without knowing its backlog")
            }
            if forced {
                stats.update { stats.forcedSwitchover = true }
                Log.warning("migration", "not converging after \(stats.iterations) iterations (expected downtime \(Int(prediction.phases.totalMS)) ms > \(Int(limit)) ms): switching over anyway")
            }
            break
        }
        // Stop-and-copy.
        try checkCancelled()
        phase = .stopAndCopy
        if switchoverRequested {
            stats.update { stats.switchoverRequested = true }
            Log.info("migration", "switch-over requested (the VM was stopped): stop-and-copy starts now")
        }
        stats.set(.device)
        throttler.stop()  // first: the throttle thread must not resume after our pause
        let caughtUpAtStop = destinationAnswersProbes && probeAnswered == probeNumber
        // Each phase of the downtime is timed from one boundary to the next, so that the
        // breakdown sums to the downtime.
        var clock = DowntimeClock()
        vm.pause()
        pausedByUs = true
        // QEMU's order at VM stop (vm_state_notify: every prepare handler, then every main
        // handler): every P2P device to PRE_COPY_P2P / RUNNING_P2P first, then each to
        // STOP_COPY, so no device stops while another can still start P2P DMA to it.
        let errors = DeviceMigration.transitionAll(devices.map(\.migration), to: .stopCopy)
        if let i = errors.firstIndex(where: { $0 != nil }) { throw MigrationError.device(i, "\(errors[i]!)") }
        clock.mark(\.pause)
        let final = try harvest(final: true)
        // With what was sampled since the last pass (nothing, normally: merged before the stop).
        for k in dirty.indices { dirty[k] |= final[k] | (k < pendingDirty.count ? pendingDirty[k] : 0) }
        try sendPages(dirty)
        // One channel: a probe after the RAM, whose answer (read in the READY wait) says when
        // the destination had applied it, for the breakdown's RAM remainder / handshake split.
        if multifd == nil && destinationAnswersProbes {
            try sendProbe()
            stopProbeNumber = probeNumber
        }
        clock.mark(\.ramRemainder)
        if multifd != nil {
            // The channels carry every device's state at once: the breakdown gives that
            // time to the first device and the config records to each.
            for i in devices.indices { try queueDeviceData(i, final: true) }
            try syncPass(last: true)
            for i in devices.indices { try sendDeviceConfig(i); clock.markDevice() }
        } else {
            for i in devices.indices { try sendDeviceData(i, final: true); try sendDeviceConfig(i); clock.markDevice() }
        }
        let states: [VCPUState]
        do { states = try vm.saveVCPUs() } catch { throw MigrationError.channel("saving vCPU state: \(error)") }
        try send(.vcpus, MigrationStream.vcpusPayload(states.map { VCPUStateBytes(regs: $0.regs, sregs: $0.sregs, fpu: $0.fpu) }))
        clock.mark(\.vcpuState)
        let endSentNS = clock.lastMarkNS
        // The destination resumes only if the guest was running here: a VM paused before the
        // migration, or stopped during it, stays paused (QEMU's global run state).
        let running = devices.allSatisfy { $0.initialState == .running } && !switchoverRequested && !vmWasPausedAtStart
        try send(.end, MigrationStream.endPayload(pagesSent: stats.normalPages + stats.zeroPages, sourceRunning: running))
        let queued = DowntimeModel.sendQueueBytes(socket.fd.rawValue)
        // Two-phase switch-over: the destination loads everything and says READY; only then
        // is it told GO. Until GO the source can still take the VM back (cancel, timeout).
        phase = .handshake
        let ready = try receiveVerdict("waiting for the destination to load the state")
        let readyWait = clock.lap()
        guard ready.kind == .ready else {
            if ready.kind == .error { throw MigrationError.destination(ready.text) }
            throw MigrationError.channel("the destination answered \(ready.kind) before GO")
        }
        try control.withLock {
            if cancelFlag { throw MigrationError.cancelled }
            committed = true
        }
        do { try Verdict.send(socket, .go, "") } catch {
            // GO did not leave: the destination cannot have taken over.
            throw MigrationError.channel("sending GO: \(error)")
        }
        let verdict: Verdict.Message
        // The destination brings its devices to RUNNING now: a hung one costs it up to its
        // device timeout (per device) before it says ERR and the VM is ours again. Waiting only
        // the peer timeout (5 s against 10 s) left both sides paused, the outcome unknown.
        let deviceBoundMS = devices.reduce(UInt64(2000)) { $0 + $1.attached.device.callTimeoutMilliseconds }
        do { verdict = try receiveVerdict("waiting for the destination to resume the guest", atLeastMS: deviceBoundMS) } catch {
            throw MigrationError.unconfirmed("the destination was told to take over (GO) but \(error); the source VM stays paused so the guest cannot run twice (check the destination; `cont` here only if it does not run)")
        }
        guard verdict.kind == .ack else {
            // Neither ACK nor ERR after GO (a second READY, say): whether it runs is unknown.
            guard verdict.kind == .error else {
                throw MigrationError.unconfirmed("the destination was told to take over (GO) and answered \(verdict.kind), neither ACK nor ERR; the source VM stays paused so the guest cannot run twice (check the destination; `cont` here only if it does not run)")
            }
            // An error after GO: the destination failed before resuming, the VM is ours again.
            control.withLock { committed = false }
            throw MigrationError.destination(verdict.text)
        }
        let ackWait = clock.lap()
        let downtime = clock.elapsedMS
        // The destination applied the RAM about half a round trip before its answer came.
        let back = (downtimeModel.probeRoundTripNS ?? 0) / 2
        let drain = stopProbeAnsweredNS.map { $0 > endSentNS + back ? $0 - back - endSentNS : 0 } ?? 0
        let breakdown = clock.phases(readyWaitNS: readyWait, ackWaitNS: ackWait,
                                     loadNS: DestinationTimes.value("x-load-ns", in: ready.text),
                                     resumeNS: DestinationTimes.value("x-resume-ns", in: verdict.text), ramDrainNS: drain)
        control.withLock { finished = true }
        // Done: off the downtime path, the source's devices end their sessions.
        for d in devices {
            _ = try? d.migration.transition(to: .stop)
            if d.loggingStarted { try? d.attached.device.stopDMALogging() }
        }
        stopTrackers()
        try? vm.setDirtyLogging(false)
        stats.update {
            stats.downtimeMS = downtime
            stats.downtimeBreakdown = breakdown
            stats.downtimeInputs.sendQueueAtEnd = queued
            stats.downtimeInputs.caughtUpAtStop = caughtUpAtStop
            stats.remainingBytes = 0
            stats.totalTimeMS = Double(monotonicNanoseconds() - stats.startNS) / 1e6
        }
        lastVerdict = verdict.text
        vmLeftPaused = true
        onCompleted?()
        stats.set(.completed)
        if stats.forcedSwitchover { Log.warning("migration", stats.summary) } else { Log.info("migration", stats.summary) }
    }

    /// A prediction with what it was made from.
    struct Prediction { var phases: DowntimePhases; var dirtyPages: UInt64; var remainingBytes: UInt64 }

    /// The downtime of a switch-over now with `dirty` left (see DowntimeModel.predict). Each
    /// device's stop-copy size is asked now (its round trip timed for the model).
    /// The vCPU threads' scheduling when pre-copy began (DowntimeModel.vcpuQueueNS).
    private var vcpuSchedAtStart: (ns: UInt64, stats: [Int32: DowntimeModel.SchedStat]) = (0, [:])

    private func predictSwitchover(_ dirty: [UInt64], fallbackRate: Double, caughtUp: Bool) -> Prediction {
        let dirtyCount = UInt64(dirty.setBitCount)
        let now = monotonicNanoseconds()
        downtimeModel.noteVCPUScheduling(from: vcpuSchedAtStart.stats, to: DowntimeModel.threadSchedStats(), ns: now - vcpuSchedAtStart.ns)
        var deviceSizes: [UInt64?] = []
        for (i, d) in devices.enumerated() {
            let r0 = monotonicNanoseconds()
            deviceSizes.append(d.migration.stopCopySize())
            downtimeModel.noteRoundTrip(i, ns: monotonicNanoseconds() - r0)
        }
        let remaining = dirtyCount * 4096 + deviceSizes.reduce(UInt64(0)) { $0 + ($1 ?? (1 << 20)) }
        let phases = downtimeModel.predict(dirtyPages: dirtyCount, deviceSizes: deviceSizes, vcpuStateBytes: vm.vcpuCount * 1024,
                                           rttNS: DowntimeModel.connectionRoundTripNS(socket.fd.rawValue), fallbackRate: fallbackRate,
                                           backlogNS: caughtUp ? 0 : downtimeModel.backlogNS)
        return Prediction(phases: phases, dirtyPages: dirtyCount, remainingBytes: remaining)
    }

    /// The last wait before the stop for the destination to catch up.
    private var catchUpNS: UInt64 = 0

    private func publish(_ p: Prediction) {
        let inputs = downtimeModel.inputs(catchUpNS: catchUpNS, answersProbes: destinationAnswersProbes)
        stats.update {
            stats.downtimeInputs = inputs
            stats.remainingBytes = p.remainingBytes
            stats.expectedDowntimeMS = UInt64(p.phases.totalMS.rounded())
            stats.expectedBreakdown = p.phases
        }
    }

    /// Whether the VM was paused (by someone else) when the migration began.
    private var vmWasPausedAtStart = false
    /// The owner's run state as the migration begins (a VMM's: true once `stop` paused it).
    /// nil: read from `vm.isPaused`, which also holds during another party's brief pause (the
    /// integrity verifier's scan), and would then send a running guest as paused.
    public var pausedAtStart: Bool?

    /// One verdict from the destination, bounded by the peer timeout and by cancel.
    /// `atLeastMS`: wait that long even if the peer timeout is shorter (after GO: the
    /// destination may take its device timeout per device before it can say ERR).
    private func receiveVerdict(_ what: String, atLeastMS: UInt64 = 0) throws -> Verdict.Message {
        // Progress messages do not restart the peer timeout: a destination that sends only PRG
        // (a flood, answers to probes never sent) has given no verdict, as one that is silent.
        let longer = parameters.peerTimeoutMS > 0 && atLeastMS > parameters.peerTimeoutMS
        let ms = longer ? atLeastMS : parameters.peerTimeoutMS
        let (span, over) = ms.multipliedReportingOverflow(by: 1_000_000)
        let deadline = ms == 0 || over ? UInt64.max : monotonicNanoseconds() &+ span
        while true {
            // Longer than the socket's own timeout: poll first (a read cut by SO_RCVTIMEO
            // part-way through a message would lose its start).
            while longer {
                let now = monotonicNanoseconds()
                guard now < deadline else { throw MigrationError.peerTimeout("destination did not answer for \(ms) ms during \(phase.rawValue) (\(what))") }
                if (try? Poll.waitReadable(socket.fd, timeoutMilliseconds: Int32(clamping: min((deadline - now) / 1_000_000 + 1, 250)))) == true { break }
            }
            let v: Verdict.Message
            do { v = try Verdict.read(socket, deadline: deadline) } catch { throw channelError(error, what, receiving: true) }
            guard v.kind == .progress else { return v }
            // A probe's late answer (one that came after the wait for it gave up).
            noteProgress(v.text)
            try checkCancelled()
            if monotonicNanoseconds() >= deadline {
                throw MigrationError.peerTimeout("destination sent only progress messages for \(parameters.peerTimeoutMS) ms during \(phase.rawValue) (\(what))")
            }
        }
    }

    /// After GO without confirmation: no rollback, the VM stays paused (see `.unconfirmed`).
    private func finishUnconfirmed() {
        control.withLock { finished = true }
        for d in devices {
            _ = try? d.migration.transition(to: .stop)
            if d.loggingStarted { try? d.attached.device.stopDMALogging() }
        }
        stopTrackers()
        try? vm.setDirtyLogging(false)
        vmLeftPaused = pausedByUs
    }

    private func stopTrackers() {
        guard trackersStarted else { return }
        trackersStarted = false
        for t in trackers { try? t.stopDirtyTracking() }
    }

    /// Everything back as it was: devices in their state from before (RUNNING, or STOP for a
    /// VM that was paused or was stopped during the migration), logging off, our pause released.
    /// Returns whether the VM stays paused (it was paused, or stopped during the migration).
    @discardableResult
    private func rollback() -> Bool {
        let stopped = control.withLock { () -> Bool in finished = true; return switchoverFlag }
        throttler.stop()
        // Back in QEMU's order for a VM start (every P2P device to RUNNING_P2P, then each to
        // RUNNING), or STOP for a VM that stays stopped. A device that cannot get there is
        // reset, as QEMU's vfio_migration_set_state does when the recover state fails too.
        for target in [MigrationState.running, .stop] {
            let group = devices.indices.filter { (stopped || devices[$0].initialState == .stop ? MigrationState.stop : .running) == target }
            let errors = DeviceMigration.transitionAll(group.map { devices[$0].migration }, to: target)
            for (k, e) in errors.enumerated() where e != nil {
                let i = group[k]
                Log.warning("migration", "device \(i) did not return to \(target) (\(e!)); resetting it")
                do { try devices[i].migration.reset() } catch {
                    lostDevices[i] = "it did not return to \(target) (\(e!)), nor could it be reset (\(error))"
                    Log.error("migration", "device \(i) is lost: \(lostDevices[i]!)")
                }
                if target == .stop { _ = try? devices[i].migration.transition(to: .stop) }
            }
        }
        for d in devices where d.loggingStarted { try? d.attached.device.stopDMALogging() }
        stopTrackers()
        try? vm.setDirtyLogging(false)
        if pausedByUs { vm.resume(); pausedByUs = false }
        return stopped || vmWasPausedAtStart || devices.contains { $0.initialState == .stop }
    }
}
