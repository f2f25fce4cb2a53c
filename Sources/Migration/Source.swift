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

    public var description: String {
        switch self {
        case let .blocked(why): return "migration blocked: \(why)"
        case let .channel(why): return "migration channel failed: \(why)"
        case let .destination(why): return "destination refused the migration: \(why)"
        case let .device(i, why): return "device \(i): \(why)"
        case .cancelled: return "migration cancelled"
        }
    }
}

/// `enable-migration` per device, as QEMU's vfio-pci property.
public enum DeviceMigrationPolicy: String, Sendable { case on, off, auto }

/// The pre-copy engine on the source. The VM keeps running while RAM and device state are
/// copied in iterations; each iteration sends the pages written since the last one (KVM's log
/// for vCPU writes, the device's DMA log for device writes). When the remaining data fits the
/// downtime limit at the measured bandwidth, the VM stops, the rest goes, and the destination
/// resumes. Any failure before the destination's ACK puts everything back: devices RUNNING,
/// logging stopped, vCPUs resumed.
public final class MigrationSource: @unchecked Sendable {
    final class Device {
        let attached: AttachedDevice
        let migration: DeviceMigration
        var logging = false
        var initialDataSent = false
        init(_ a: AttachedDevice, _ m: DeviceMigration) { attached = a; migration = m }
    }

    public let vm: MicroVM
    public let parameters: MigrationParameters
    public let stats: MigrationStats
    private let socket: StreamSocket
    private var devices: [Device] = []
    private var cancelFlag = false
    private let cancelLock = Mutex()
    private var sectionID: UInt32 = 0
    private var pausedByUs = false
    private var sendStart: UInt64 = 0
    /// Where RAM sections are assembled (4 MiB of data at most per section).
    private let staging: MappedRegion
    private var sentSinceStart: UInt64 = 0
    /// Fault injection for tests: called before each section is sent (may throw or corrupt).
    public var beforeSection: ((MigrationStream.SectionType, UInt32) throws -> Void)?
    public var corruptNextSectionForTesting = false

    /// Check the blockers and prepare; nothing is touched until `run()`.
    public init(vm: MicroVM, to socket: StreamSocket, parameters: MigrationParameters, policies: [DeviceMigrationPolicy],
                stats: MigrationStats = MigrationStats()) throws {
        self.vm = vm; self.socket = socket; self.parameters = parameters; self.stats = stats
        staging = try MappedRegion(anonymous: (4 << 20) + 256 * 4096, populate: true)
        for (i, d) in vm.devices.enumerated() {
            let policy = i < policies.count ? policies[i] : .auto
            if policy == .off { throw MigrationError.blocked("device \(i): migration is disabled for this VFIO device (enable-migration=off)") }
            let m: DeviceMigration
            do { m = try DeviceMigration(device: d.client) } catch {
                throw MigrationError.blocked("device \(i) does not support migration (\(error))")
            }
            let canLog = d.client.probeFeature(DeviceFeature.dmaLoggingStart, get: false)
            if !canLog && !parameters.allowUntrackedDevices {
                throw MigrationError.blocked("device \(i) supports no dirty tracking of its DMA; set capability x-allow-untracked-devices to treat all its mapped pages as dirty")
            }
            let dev = Device(d, m)
            dev.logging = canLog
            devices.append(dev)
        }
        stats.deviceBytes = [UInt64](repeating: 0, count: devices.count)
    }

    public func cancel() { cancelLock.withLock { cancelFlag = true } }
    private func checkCancelled() throws { if cancelLock.withLock({ cancelFlag }) { throw MigrationError.cancelled } }

    // MARK: sending

    private func nextID() -> UInt32 { sectionID &+= 1; return sectionID }

    private func send(_ type: MigrationStream.SectionType, pieces: [UnsafeRawBufferPointer], checksum: UInt64? = nil) throws {
        let id = nextID()
        try beforeSection?(type, id)
        let length = pieces.reduce(0) { $0 + $1.count }
        var sum = Checksum.seed
        if let c = checksum { sum = c } else { for p in pieces { sum = Checksum.update(sum, p) } }
        if corruptNextSectionForTesting { corruptNextSectionForTesting = false; sum ^= 1 }
        var t = BEWriter(); t.u64(sum)
        let head = MigrationStream.sectionHeader(type, id: id, length: length), tail = t.bytes
        do {
            try head.withUnsafeBytes { hb in try tail.withUnsafeBytes { tb in try socket.send([hb] + pieces + [tb]) } }
        } catch {
            // The destination usually closed because it found something wrong: say what.
            if (try? Poll.waitReadable(socket.fd, timeoutMilliseconds: 1000)) == true, let v = Verdict.receive(socket), !v.ok {
                throw MigrationError.destination(v.text)
            }
            throw MigrationError.channel("sending \(type) section \(id): \(error)")
        }
        let n = UInt64(length + 24)
        stats.update { stats.transferredBytes += n }
        sentSinceStart += n
        try pace()
        try checkDestination()
    }

    private func send(_ type: MigrationStream.SectionType, _ payload: [UInt8]) throws {
        try payload.withUnsafeBytes { try send(type, pieces: [$0]) }
    }

    /// max-bandwidth: sleep when ahead of the allowed rate.
    private func pace() throws {
        guard parameters.maxBandwidth > 0 else { return }
        let due = sendStart + sentSinceStart * 1_000_000_000 / parameters.maxBandwidth
        let now = monotonicNanoseconds()
        if due > now { usleep(UInt32(min(due - now, 1_000_000_000) / 1000)) }
    }

    /// The destination reports a failure as soon as it has one: check without blocking.
    private func checkDestination() throws {
        guard (try? Poll.waitReadable(socket.fd, timeoutMilliseconds: 0)) == true else { return }
        if let v = Verdict.receive(socket), !v.ok { throw MigrationError.destination(v.text) }
        throw MigrationError.channel("the destination closed the connection")
    }

    private static func isZero(_ p: UnsafeRawPointer) -> Bool {
        var acc: UInt64 = 0
        var i = 0
        while i < 4096 {
            acc |= p.load(fromByteOffset: i, as: UInt64.self) | p.load(fromByteOffset: i + 8, as: UInt64.self)
                | p.load(fromByteOffset: i + 16, as: UInt64.self) | p.load(fromByteOffset: i + 24, as: UInt64.self)
            if acc != 0 { return false }
            i += 32
        }
        return true
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

    /// One RAM section from the batch. Live pages change under us: they are copied into the
    /// staging buffer and checksummed in the same pass; a page written after its copy is dirty
    /// again and goes in a later iteration.
    private func flush(_ b: inout RAMBatch) throws {
        guard !b.isEmpty else { return }
        let base = vm.memory.base
        var table = BEWriter()
        table.u32(UInt32(b.gpa.count))
        for i in b.gpa.indices { table.u64(b.gpa[i]); table.u32(b.count[i]); table.u32(b.zero[i] ? 1 : 0) }
        let t = table.bytes
        var sum = t.withUnsafeBytes { Checksum.update(Checksum.seed, $0) }
        var at = 0
        var z: UInt64 = 0, n: UInt64 = 0
        for i in b.gpa.indices {
            if b.zero[i] { z += UInt64(b.count[i]); continue }
            let bytes = Int(b.count[i]) * 4096
            sum = Checksum.copy(sum, from: UnsafeRawBufferPointer(start: base + Int(b.gpa[i]), count: bytes), to: staging.base + at)
            at += bytes
            n += UInt64(b.count[i])
        }
        try t.withUnsafeBytes { tb in
            try send(.ram, pieces: [tb, UnsafeRawBufferPointer(start: staging.base, count: at)], checksum: sum)
        }
        stats.update { stats.zeroPages += z; stats.normalPages += n; stats.ramBytes += n * 4096 }
        b.reset()
        try checkCancelled()
    }

    /// Send the pages set in `bitmap` as RAM sections of runs; zero pages travel as run
    /// headers only. Returns the page count sent.
    @discardableResult
    private func sendPages(_ bitmap: [UInt64]) throws -> UInt64 {
        let base = vm.memory.base
        let pages = vm.memory.size / 4096
        var batch = RAMBatch()
        var sent: UInt64 = 0
        var p: UInt64 = 0
        // Holes of the memfd are zero pages we need not (and should not) read.
        let extents = vm.memory.dataExtents()
        var e = 0
        while p < pages {
            let w = bitmap[Int(p / 64)]
            if w == 0 && p % 64 == 0 { p += 64; continue }
            if w & (1 << (p % 64)) == 0 { p += 1; continue }
            let addr = p * 4096
            while e < extents.count && extents[e].upperBound <= addr { e += 1 }
            let inHole = e == extents.count || !extents[e].contains(addr)
            batch.add(page: p, zero: inHole || Self.isZero(base + Int(addr)))
            sent += 1
            // The staging buffer holds 4 MiB plus one run.
            if batch.gpa.count >= 400 || batch.dataBytes >= 4 << 20 { try flush(&batch) }
            p += 1
        }
        try flush(&batch)
        return sent
    }

    /// Device records in a DEVICE section: everything the device has now (pre-copy), or to the
    /// end of its stream (stop-copy).
    @discardableResult
    private func sendDeviceData(_ i: Int, final: Bool) throws -> UInt64 {
        let d = devices[i]
        var moved: UInt64 = 0
        var records = BEWriter()
        records.u32(UInt32(i))
        func flush() throws {
            records.u64(MigrationStream.VFIOTag.endOfState.rawValue)
            try send(.device, records.bytes)
            records = BEWriter(); records.u32(UInt32(i))
        }
        while true {
            let data: [UInt8]
            do { data = try d.migration.read(max: 1 << 20) } catch { throw MigrationError.device(i, "reading migration data: \(error)") }
            if !data.isEmpty {
                records.u64(MigrationStream.VFIOTag.dataState.rawValue); records.u64(UInt64(data.count)); records.append(data)
                moved += UInt64(data.count)
                if records.bytes.count >= 4 << 20 { try flush() }
            }
            if data.count < 1 << 20 { break }  // a short read ends the data available now
        }
        if !final && !d.initialDataSent {
            d.initialDataSent = true
            records.u64(MigrationStream.VFIOTag.initDataSent.rawValue)
        }
        try flush()
        stats.update { stats.deviceBytes[i] += moved }
        return moved
    }

    /// The VMM's copy of the device's config space and interrupt wiring.
    private func sendDeviceConfig(_ i: Int) throws {
        let c = devices[i].attached.client
        let cfg: [UInt8]
        do { cfg = try c.regionRead(7, offset: 0, count: 256) } catch { throw MigrationError.device(i, "reading config space: \(error)") }
        var w = BEWriter()
        w.u32(UInt32(i))
        w.u64(MigrationStream.VFIOTag.configState.rawValue)
        var body = BEWriter()
        body.u32(UInt32(cfg.count)); body.append(cfg)
        body.append([1, 0])  // MSI vector 0 wired to an eventfd; INTx not wired
        w.u32(UInt32(body.bytes.count)); w.append(body.bytes)
        w.u64(MigrationStream.VFIOTag.endOfState.rawValue)
        try send(.device, w.bytes)
    }

    /// KVM's log OR every device's DMA log (or all mapped pages for an untracked device).
    private func harvest() throws -> [UInt64] {
        var bits = try vm.harvestDirtyPages()
        for (i, d) in devices.enumerated() {
            if d.logging {
                let w: [UInt64]
                do { w = try d.attached.client.dmaLoggingReport(iova: 0, length: vm.memory.size, pageSize: 4096) } catch {
                    throw MigrationError.device(i, "DMA_LOGGING_REPORT failed: \(error)")
                }
                for k in 0..<min(w.count, bits.count) { bits[k] |= w[k] }
            } else {
                for k in bits.indices { bits[k] = ~0 }
            }
        }
        return bits
    }

    // MARK: the migration

    /// Run the whole migration. Throws after rolling back on failure or cancel.
    public func run() throws {
        stats.update { stats.startNS = monotonicNanoseconds(); stats.totalBytes = vm.memory.size }
        stats.set(.setup)
        // Whatever happens, the channel closes: a destination waiting for more learns it is over.
        defer { _ = shutdown(socket.fd.rawValue, Int32(SHUT_RDWR)); socket.fd.close() }
        do {
            try migrate()
        } catch {
            rollback()
            let cancelled = (error as? MigrationError).map { if case .cancelled = $0 { return true }; return false } ?? false
            stats.update { stats.totalTimeMS = Double(monotonicNanoseconds() - stats.startNS) / 1e6 }
            stats.set(cancelled ? .cancelled : .failed, error: "\(error)")
            Log.warning("migration", "\(error); the VM runs on at the source")
            throw error
        }
    }

    private func migrate() throws {
        let pages = vm.memory.size / 4096
        sendStart = monotonicNanoseconds()
        do { try socket.send(MigrationStream.header(flags: 0)) } catch { throw MigrationError.channel("\(error)") }
        try send(.config, MigrationStream.configPayload(ramSize: vm.memory.size, vcpus: vm.vcpuCount, devices: devices.count))
        // Setup: dirty logging on (vCPUs and devices), devices to PRE_COPY.
        try vm.setDirtyLogging(true)
        _ = try vm.harvestDirtyPages()
        for (i, d) in devices.enumerated() {
            if d.logging {
                do { try d.attached.client.startDMALogging(pageSize: 4096, ranges: [(0, vm.memory.size)]) } catch {
                    throw MigrationError.device(i, "DMA_LOGGING_START failed: \(error)")
                }
            }
            var w = BEWriter(); w.u32(UInt32(i))
            w.u64(MigrationStream.VFIOTag.setupState.rawValue); w.u64(MigrationStream.VFIOTag.endOfState.rawValue)
            try send(.device, w.bytes)
            if d.migration.capabilities.contains(.preCopy) {
                do { try d.migration.transition(to: .preCopy) } catch { throw MigrationError.device(i, "\(error)") }
            }
        }
        stats.update { stats.setupNS = monotonicNanoseconds() - stats.startNS }
        stats.set(.active)
        // Iterations.
        var dirty = [UInt64](repeating: ~0, count: Int((pages + 63) / 64))
        if pages % 64 != 0 { dirty[dirty.count - 1] = (1 << (pages % 64)) - 1 }
        var throttle: UInt64 = 0
        var lastRemaining = UInt64.max
        var stalls = 0
        while true {
            try checkCancelled()
            let t0 = monotonicNanoseconds(), b0 = stats.transferredBytes
            let sentPages = try sendPages(dirty)
            for i in devices.indices where devices[i].migration.capabilities.contains(.preCopy) { try sendDeviceData(i, final: false) }
            dirty = try harvest()
            let dt = max(monotonicNanoseconds() - t0, 1)
            let bytes = stats.transferredBytes - b0
            let dirtyCount = UInt64(dirty.setBitCount)
            let deviceRemaining = devices.reduce(UInt64(0)) { $0 + ($1.migration.stopCopySize() ?? (1 << 20)) }
            let remaining = dirtyCount * 4096 + deviceRemaining
            // Bandwidth of this iteration (a floor of 1 MB/s keeps the estimate finite).
            let bw = max(Double(bytes) / (Double(dt) / 1e9), 1e6)
            let expected = Double(remaining) / bw * 1000
            stats.update {
                stats.iterations += 1
                stats.remainingBytes = remaining
                stats.bandwidth = bw
                stats.expectedDowntimeMS = UInt64(expected)
                stats.dirtyPagesRate = UInt64(Double(dirtyCount) / (Double(dt) / 1e9))
            }
            Log.debug("migration", "iteration \(stats.iterations): \(sentPages) pages, \(dirtyCount) dirtied meanwhile, expected downtime \(Int(expected)) ms")
            if expected <= Double(parameters.downtimeLimitMS) { break }
            if stats.iterations >= parameters.maxIterations {
                stats.update { stats.forcedSwitchover = true }
                Log.warning("migration", "not converging after \(stats.iterations) iterations (expected downtime \(Int(expected)) ms > \(parameters.downtimeLimitMS) ms): switching over anyway")
                break
            }
            // Auto-converge: throttle the vCPUs when the remainder stops shrinking.
            if remaining >= lastRemaining / 2 * 1 { stalls += 1 } else { stalls = 0 }
            lastRemaining = remaining
            if parameters.autoConverge && stalls >= 2 {
                throttle = throttle == 0 ? parameters.throttleInitial : min(throttle + parameters.throttleIncrement, parameters.throttleMax)
                vm.setThrottle(percent: throttle)
                stats.update { stats.throttlePercent = throttle }
                stalls = 0
            }
        }
        // Stop-and-copy.
        stats.set(.device)
        vm.setThrottle(percent: 0)  // first: the throttle thread must not resume after our pause
        let stopStart = monotonicNanoseconds()
        vm.pause()
        pausedByUs = true
        for (i, d) in devices.enumerated() {
            do { try d.migration.transition(to: .stopCopy) } catch { throw MigrationError.device(i, "\(error)") }
        }
        let final = try harvest()
        for k in dirty.indices { dirty[k] |= final[k] }
        try sendPages(dirty)
        for i in devices.indices { try sendDeviceData(i, final: true); try sendDeviceConfig(i) }
        let states: [VCPUState]
        do { states = try vm.saveVCPUs() } catch { throw MigrationError.channel("saving vCPU state: \(error)") }
        try send(.vcpus, MigrationStream.vcpusPayload(states.map { VCPUStateBytes(regs: $0.regs, sregs: $0.sregs, fpu: $0.fpu) }))
        var end = BEWriter(); end.u64(stats.normalPages + stats.zeroPages)
        try send(.end, end.bytes)
        // The destination has resumed when it says so.
        guard let verdict = Verdict.receive(socket) else {
            throw MigrationError.channel("the destination closed the connection before confirming")
        }
        guard verdict.ok else { throw MigrationError.destination(verdict.text) }
        let downtime = Double(monotonicNanoseconds() - stopStart) / 1e6
        // Done: off the downtime path, the source's devices end their sessions.
        for d in devices {
            _ = try? d.migration.transition(to: .stop)
            if d.logging { try? d.attached.client.stopDMALogging() }
        }
        try? vm.setDirtyLogging(false)
        stats.update {
            stats.downtimeMS = downtime
            stats.remainingBytes = 0
            stats.totalTimeMS = Double(monotonicNanoseconds() - stats.startNS) / 1e6
        }
        lastVerdict = verdict.text
        onCompleted?()
        stats.set(.completed)
    }

    /// Called after a successful migration, before the status says "completed".
    public var onCompleted: (() -> Void)?
    /// What the destination said on success (a JSON object).
    public private(set) var lastVerdict: String?

    /// Everything back as it was: devices RUNNING, logging off, vCPUs running.
    private func rollback() {
        vm.setThrottle(percent: 0)
        for (i, d) in devices.enumerated() {
            if (try? d.migration.state()) != .running {
                if (try? d.migration.transition(to: .running)) == nil {
                    Log.warning("migration", "device \(i) did not return to RUNNING; resetting it")
                    try? d.migration.reset()
                }
            }
            if d.logging { try? d.attached.client.stopDMALogging() }
        }
        try? vm.setDirtyLogging(false)
        if pausedByUs { vm.resume(); pausedByUs = false }
    }
}
