import CVFIOLive
import Glibc
import SystemCalls
import VFIO
import VFIOUser

/// `dma-engine`: a PCI device with the semantics of QEMU's educational device (edu) — an
/// identification register, a liveness check by inversion, a factorial unit and a DMA engine that
/// copies between guest memory and the device and raises MSI or INTx when done — plus
/// device-local memory of configurable size that every job changes, so that its migration state
/// is large and keeps evolving.
///
/// Regions: BAR0 registers (1 MiB, trapped), BAR2 device memory (trapped, so every write is
/// tracked for pre-copy), BAR4 a read-only mmap view of device memory (for fast verification),
/// config space (256 bytes). IRQs: INTx (index 0) and MSI (index 1, one vector).
public final class DMAEngine: VFIOUserDeviceModel, @unchecked Sendable {
    // BAR0 register offsets (edu's first, then vfio-live's).
    public enum Reg {
        public static let identification: UInt64 = 0x00
        public static let liveness: UInt64 = 0x04
        public static let factorial: UInt64 = 0x08
        public static let status: UInt64 = 0x20
        public static let irqStatus: UInt64 = 0x24
        public static let irqRaise: UInt64 = 0x60
        public static let irqAck: UInt64 = 0x64
        public static let dmaSource: UInt64 = 0x80
        public static let dmaDestination: UInt64 = 0x88
        public static let dmaCount: UInt64 = 0x90
        public static let dmaCommand: UInt64 = 0x98
        public static let jobsCompleted: UInt64 = 0x100
        public static let lastJobStatus: UInt64 = 0x108
        public static let memorySize: UInt64 = 0x110
        public static let dataWindowSize: UInt64 = 0x118
        public static let lastJobChecksum: UInt64 = 0x120
        public static let jobProgress: UInt64 = 0x128
        /// Throttle: microseconds the engine waits after each 64 KiB step (0 = full speed,
        /// at most 100 ms). Migrated with the other registers.
        public static let dmaStepDelay: UInt64 = 0x130
    }
    public static let identificationValue: UInt32 = 0x010000ed
    public static let dmaCommandStart: UInt64 = 0x1
    public static let dmaCommandToRAM: UInt64 = 0x2
    public static let dmaCommandIRQ: UInt64 = 0x4
    public static let irqFactorial: UInt32 = 0x1
    public static let irqDMA: UInt32 = 0x100
    /// Device addresses of device memory start here (edu's DMA buffer address).
    public static let deviceMemoryBase: UInt64 = 0x40000
    /// The top of device memory holds the job journal: 1024 records of 64 bytes.
    public static let journalSize: UInt64 = 64 * 1024
    public static let journalRecordSize: UInt64 = 64
    public static let journalMagic: UInt64 = 0x4c4e524a5f414d44  // "DMA_JRNL"
    public static let bar0Size: UInt64 = 1 << 20
    public static let chunkSize = 64 * 1024  // DMA step: a job can be interrupted between steps

    public let memorySize: UInt64
    public var dataWindowSize: UInt64 { memorySize - Self.journalSize }
    let memoryFD: FileDescriptor
    let readOnlyViewFD: FileDescriptor
    let memory: MappedRegion
    public let config: PCIConfigSpace
    private(set) weak var host: DeviceHost?
    private var hostStrong: DeviceHost?

    /// Registers and the job in flight: everything besides memory that migration must carry.
    struct Registers: Equatable {
        var liveness: UInt32 = 0
        var factorial: UInt32 = 0
        var status: UInt32 = 0
        var irqStatus: UInt32 = 0
        var dmaSource: UInt64 = 0
        var dmaDestination: UInt64 = 0
        var dmaCount: UInt64 = 0
        var dmaCommand: UInt64 = 0
        var jobsCompleted: UInt64 = 0
        var lastJobStatus: UInt64 = 0
        var lastJobChecksum: UInt64 = 0
        /// The job in flight: bytes already moved and the running checksum.
        var jobProgress: UInt64 = 0
        var jobChecksum: UInt64 = DMAEngine.checksumSeed
        var dmaStepDelay: UInt64 = 0
    }
    var regs = Registers()
    let lock = Condition()  // guards regs and run state; the worker waits on it
    /// DMA and interrupts are allowed only in RUNNING / PRE_COPY.
    var runAllowed = true
    private var workerBusy = false
    private var shuttingDown = false
    private var worker: OSThread?
    /// Pages of device memory written since the migration stream last read them.
    let memoryDirty: DirtyBitmap
    /// Migration stream state (DMAEngineState.swift).
    var save: SaveSession?
    var load: LoadSession?

    /// Whether the state streams this device saves carry a checksum per memory chunk (declared
    /// in the stream's header record; the destination checks what is declared). Off by default,
    /// as QEMU relies on the transport for device state; headers, lengths, offsets, the
    /// registers and the stream's completeness are always checked.
    public var stateChecksums = false
    /// Fault injection for tests: flip one byte of the next migration data written.
    public var corruptNextWriteForTesting = false
    /// Fault injection for tests: refuse this arc once (the device keeps its state).
    public var refuseArcForTesting: (MigrationState, MigrationState)?

    /// Metrics (Firecracker-style counters).
    public private(set) var bytesMoved: UInt64 = 0

    /// `stateSize`: device memory in bytes, a power of two from 128 KiB to 4 GiB.
    public init(stateSize: UInt64 = 16 << 20) throws {
        guard stateSize >= 128 * 1024, stateSize <= 1 << 32, stateSize & (stateSize - 1) == 0 else {
            throw DeviceError(.EINVAL, "--state-size must be a power of two from 128 KiB to 4 GiB (got \(stateSize))")
        }
        memorySize = stateSize
        memoryFD = try MemFD.create(name: "dma-engine-memory", size: stateSize)
        // Populated now: a device's memory is touched anyway, and bulk population is much cheaper
        // than first-touch faults during a DMA job or a migration.
        memory = try MappedRegion(fd: memoryFD, length: Int(stateSize), populate: true)
        // A second fd for the read-only view, sealed against any future writable mapping, so a
        // client can read device memory directly but every write still goes through BAR2.
        readOnlyViewFD = try FileDescriptor(adopting: memoryFD.duplicate().take())
        let rawMemoryFD = memoryFD.rawValue
        _ = try syscallRetryingEINTR { vl_seal_memfd_future_write(rawMemoryFD) }
        memoryDirty = DirtyBitmap(pageSize: 4096, length: stateSize)
        config = PCIConfigSpace(vendor: 0x1234, device: 0x11e8, revision: 0x10, classCode: 0x00ff00,
                                bars: [.init(index: 0, size: UInt32(Self.bar0Size)),
                                       .init(index: 2, size: UInt32(truncatingIfNeeded: min(stateSize, 1 << 31))),
                                       .init(index: 4, size: UInt32(truncatingIfNeeded: min(stateSize, 1 << 31)), prefetchable: true)])
        worker = try OSThread(name: "dma-engine") { [weak self] in self?.workerLoop() }
    }

    deinit { shutdown() }

    public func shutdown() {
        lock.mutex.withLock { shuttingDown = true; lock.broadcast() }
        worker?.join()
        worker = nil
    }

    public var deviceDescription: DeviceDescription {
        DeviceDescription(
            flags: DeviceInfo.flagPCI | DeviceInfo.flagReset,
            regions: [
                RegionDescription(index: 0, size: Self.bar0Size, flags: [.read, .write]),
                RegionDescription(index: 2, size: memorySize, flags: [.read, .write]),
                RegionDescription(index: 4, size: memorySize, flags: [.read, .mmap], mmapFD: readOnlyViewFD,
                                  sparseAreas: [SparseMMapArea(offset: 0, size: memorySize)]),
                RegionDescription(index: 7, size: UInt64(PCIConfigSpace.size), flags: [.read, .write]),
            ],
            irqs: [IRQDescription(index: 0, count: 1, flags: [.eventfd, .maskable]),
                   IRQDescription(index: 1, count: 1, flags: [.eventfd, .noresize])])
    }

    public func attach(host: DeviceHost) { hostStrong = host; self.host = host }

    // MARK: region access

    public func regionRead(index: UInt32, offset: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws {
        switch index {
        case 0:
            // 32-bit registers below 0x80, 64-bit ones from 0x80: serve any sub-range of one.
            let wideBase = offset & ~7
            let (word, base): (UInt64, UInt64) = lock.mutex.withLock {
                isWide(wideBase) ? (readRegister64(wideBase), wideBase) : (readRegister(offset & ~3), offset & ~3)
            }
            let shift = (offset - base) * 8
            for i in 0..<buffer.count { buffer[i] = UInt8(truncatingIfNeeded: word >> (shift + UInt64(i) * 8)) }
        case 2, 4:
            guard offset + UInt64(buffer.count) <= memorySize else { throw DeviceError(.EINVAL, "device memory access out of range") }
            memcpy(buffer.baseAddress!, memory.base + Int(offset), buffer.count)
        case 7:
            config.read(offset: Int(offset), into: buffer)
        default:
            throw DeviceError(.EINVAL, "region \(index) has no backing")
        }
    }

    public func regionWrite(index: UInt32, offset: UInt64, from buffer: UnsafeRawBufferPointer) throws {
        switch index {
        case 0:
            var v: UInt64 = 0
            for i in 0..<min(buffer.count, 8) { v |= UInt64(buffer[i]) << (8 * UInt64(i)) }
            try lock.mutex.withLock { try writeRegister(offset, v, width: buffer.count) }
        case 2:
            guard offset + UInt64(buffer.count) <= memorySize else { throw DeviceError(.EINVAL, "device memory access out of range") }
            memcpy(memory.base + Int(offset), buffer.baseAddress!, buffer.count)
            memoryDirty.mark(offset: offset, length: UInt64(buffer.count))
        case 7:
            config.write(offset: Int(offset), from: buffer)
        default:
            throw DeviceError(.EINVAL, "region \(index) is read-only")
        }
    }

    private func isWide(_ off: UInt64) -> Bool { off >= 0x80 && off <= Reg.dmaStepDelay && off != Reg.lastJobStatus }

    private func readRegister64(_ off: UInt64) -> UInt64 {
        switch off {
        case Reg.dmaSource: return regs.dmaSource
        case Reg.dmaDestination: return regs.dmaDestination
        case Reg.dmaCount: return regs.dmaCount
        case Reg.dmaCommand: return regs.dmaCommand
        case Reg.jobsCompleted: return regs.jobsCompleted
        case Reg.memorySize: return memorySize
        case Reg.dataWindowSize: return dataWindowSize
        case Reg.lastJobChecksum: return regs.lastJobChecksum
        case Reg.jobProgress: return regs.jobProgress
        case Reg.dmaStepDelay: return regs.dmaStepDelay
        default: return 0
        }
    }

    private func readRegister(_ off: UInt64) -> UInt64 {
        switch off {
        case Reg.identification: return UInt64(Self.identificationValue)
        case Reg.liveness: return UInt64(~regs.liveness)
        case Reg.factorial: return UInt64(regs.factorial)
        case Reg.status: return UInt64(regs.status)
        case Reg.irqStatus: return UInt64(regs.irqStatus)
        case Reg.lastJobStatus: return regs.lastJobStatus
        default: return 0
        }
    }

    private func writeRegister(_ off: UInt64, _ v: UInt64, width: Int) throws {
        switch off {
        case Reg.liveness: regs.liveness = UInt32(truncatingIfNeeded: v)
        case Reg.factorial:
            // edu: computing is reported in status bit 0 until done; ours completes at once.
            var f: UInt32 = 1
            var n = UInt32(truncatingIfNeeded: v)
            while n > 1 { f = f &* n; n -= 1 }
            regs.factorial = f
            if regs.status & 0x80 != 0 { raise(Self.irqFactorial) }
        case Reg.status: regs.status = (regs.status & 0x1) | (UInt32(truncatingIfNeeded: v) & 0x80)
        case Reg.irqRaise: raise(UInt32(truncatingIfNeeded: v))
        case Reg.irqAck: regs.irqStatus &= ~UInt32(truncatingIfNeeded: v)
        case Reg.dmaSource: regs.dmaSource = width >= 8 ? v : (regs.dmaSource & ~0xffff_ffff) | (v & 0xffff_ffff)
        case Reg.dmaSource + 4: regs.dmaSource = (regs.dmaSource & 0xffff_ffff) | (v << 32)
        case Reg.dmaDestination: regs.dmaDestination = width >= 8 ? v : (regs.dmaDestination & ~0xffff_ffff) | (v & 0xffff_ffff)
        case Reg.dmaDestination + 4: regs.dmaDestination = (regs.dmaDestination & 0xffff_ffff) | (v << 32)
        case Reg.dmaCount: regs.dmaCount = width >= 8 ? v : (regs.dmaCount & ~0xffff_ffff) | (v & 0xffff_ffff)
        case Reg.dmaCount + 4: regs.dmaCount = (regs.dmaCount & 0xffff_ffff) | (v << 32)
        case Reg.dmaStepDelay: regs.dmaStepDelay = min(v, 100_000)
        case Reg.dmaCommand:
            guard regs.dmaCommand & Self.dmaCommandStart == 0 else {
                throw DeviceError(.EBUSY, "a DMA job is already running")
            }
            regs.dmaCommand = v & 0x7
            if v & Self.dmaCommandStart != 0 {
                regs.jobProgress = 0
                regs.jobChecksum = Self.checksumSeed
                lock.broadcast()
            }
        default: break  // writes to read-only or unknown registers are ignored, as on hardware
        }
    }

    /// Set interrupt status bits and signal MSI (if the client set an MSI eventfd) or INTx.
    /// Called with `lock` held. A stopped device raises nothing; the status bits stay set.
    private func raise(_ bits: UInt32) {
        regs.irqStatus |= bits
        guard runAllowed else { return }
        signalInterrupt()
    }

    /// MSI when the VMM enabled it in config space, else INTx (unless INTx is disabled).
    func signalInterrupt() {
        guard let host else { return }
        if config.msiEnabled { host.raiseIRQ(index: 1, vector: 0) }
        else if !config.intxDisabled { host.raiseIRQ(index: 0, vector: 0) }
    }

    public func reset() throws {
        lock.mutex.withLock {
            regs = Registers()
            runAllowed = true
            save = nil
            load?.abandon()  // a load into device memory is undone: its zeros come back
            load = nil
            lock.broadcast()
        }
        while lock.mutex.withLock({ workerBusy }) { usleep(100) }
    }

    public var migration: MigratableDevice? { self }

    // MARK: DMA worker

    /// A job's checksum is `Checksum.update` chained over its 64 KiB steps, so the device can
    /// carry it across an interruption (and a migration) between steps.
    public static let checksumSeed: UInt64 = Checksum.seed
    public static func checksum(_ h: UInt64, _ p: UnsafeRawBufferPointer) -> UInt64 { Checksum.update(h, p) }

    /// What the device reports for a job that moved `data`: verifiers compute it from guest RAM.
    public static func jobChecksum(of data: UnsafeRawBufferPointer) -> UInt64 {
        var h = checksumSeed
        var at = 0
        repeat {
            let n = min(chunkSize, data.count - at)
            h = checksum(h, UnsafeRawBufferPointer(rebasing: data[at..<at + n]))
            at += n
        } while at < data.count
        return h
    }

    private func workerLoop() {
        while true {
            // Wait for a job that may run.
            let job: Registers? = lock.mutex.withLock {
                while !shuttingDown && !(regs.dmaCommand & Self.dmaCommandStart != 0 && runAllowed) { lock.wait(timeoutSeconds: 0.5) }
                if shuttingDown { return nil }
                workerBusy = true
                return regs
            }
            guard let j = job else { return }
            if j.dmaStepDelay > 0 {
                // Throttled: wait before the step, so a job started just now moves its data
                // later (a job in flight across a migration or live update). A device stopped
                // or reset meanwhile must not touch memory: check again.
                usleep(UInt32(j.dmaStepDelay))
                let still = lock.mutex.withLock {
                    runAllowed && !shuttingDown && regs.dmaCommand & Self.dmaCommandStart != 0 && regs.jobProgress == j.jobProgress &&
                        regs.dmaSource == j.dmaSource && regs.dmaDestination == j.dmaDestination
                }
                if !still { lock.mutex.withLock { workerBusy = false; lock.broadcast() }; continue }
            }
            let outcome = step(j)
            lock.mutex.withLock {
                workerBusy = false
                // The job may have been reset or restored under us: apply only if it is still ours.
                guard regs.dmaCommand & Self.dmaCommandStart != 0, regs.jobProgress == j.jobProgress,
                      regs.dmaSource == j.dmaSource, regs.dmaDestination == j.dmaDestination else { lock.broadcast(); return }
                switch outcome {
                case let .progressed(n, checksum):
                    regs.jobProgress += UInt64(n)
                    regs.jobChecksum = checksum
                    if regs.jobProgress >= regs.dmaCount { finishJob(status: 0) }
                case let .failed(errno):
                    finishJob(status: UInt64(errno.rawValue))
                }
                lock.broadcast()
            }
        }
    }

    private enum StepOutcome { case progressed(Int, UInt64), failed(Errno) }

    /// Move one chunk of the job (no lock held while copying: DMA can take time).
    private func step(_ j: Registers) -> StepOutcome {
        let toRAM = j.dmaCommand & Self.dmaCommandToRAM != 0
        let devAddr = toRAM ? j.dmaSource : j.dmaDestination
        let ramAddr = (toRAM ? j.dmaDestination : j.dmaSource) &+ j.jobProgress
        guard devAddr >= Self.deviceMemoryBase, j.dmaCount <= dataWindowSize,
              devAddr - Self.deviceMemoryBase <= dataWindowSize - j.dmaCount else {
            return .failed(.EINVAL)
        }
        let devOff = Int(devAddr - Self.deviceMemoryBase + j.jobProgress)
        let n = Int(min(UInt64(Self.chunkSize), j.dmaCount - j.jobProgress))
        guard n > 0 else { return .progressed(0, j.jobChecksum) }
        guard let host else { return .failed(.EIO) }
        do {
            // Fast path: guest RAM mapped by fd, one fused copy+checksum pass.
            var h = j.jobChecksum
            var at = 0
            do {
                try host.dma.withGuestMemory(address: ramAddr, count: n, write: toRAM) { piece in
                    // A step split across two mappings would chain the checksum differently:
                    // take the copying path for it.
                    guard piece.count == n else { throw DeviceError(.ENOTSUP, "step spans mappings") }
                    let dev = memory.base + devOff + at
                    if toRAM { h = Checksum.copy(h, from: UnsafeRawBufferPointer(start: dev, count: piece.count), to: piece.baseAddress!) }
                    else { h = Checksum.copy(h, from: UnsafeRawBufferPointer(piece), to: dev) }
                    at += piece.count
                }
                if !toRAM { memoryDirty.mark(offset: UInt64(devOff), length: UInt64(n)) }
                bytesMoved &+= UInt64(n)
                return .progressed(n, h)
            } catch let e as DeviceError where e.errno == .ENOTSUP && at == 0 {
                // Message-based mapping: fall through to the copying path.
            }
            if toRAM {
                let src = UnsafeRawBufferPointer(start: memory.base + devOff, count: n)
                try host.dma.write(address: ramAddr, from: src)
                bytesMoved &+= UInt64(n)
                return .progressed(n, Self.checksum(j.jobChecksum, src))
            } else {
                // Straight into device memory: one copy, as a DMA engine writes its own RAM.
                let dst = UnsafeMutableRawBufferPointer(start: memory.base + devOff, count: n)
                defer { memoryDirty.mark(offset: UInt64(devOff), length: UInt64(n)) }
                try host.dma.read(address: ramAddr, into: dst)
                bytesMoved &+= UInt64(n)
                return .progressed(n, Self.checksum(j.jobChecksum, UnsafeRawBufferPointer(dst)))
            }
        } catch let e as DeviceError {
            Log.warning("dma-engine", "DMA job failed: \(e)")
            return .failed(e.errno)
        } catch {
            return .failed(.EIO)
        }
    }

    /// Complete the job: journal record in device memory, counters, interrupt. Lock held.
    private func finishJob(status: UInt64) {
        let seq = regs.jobsCompleted + 1
        let slot = (seq - 1) % (Self.journalSize / Self.journalRecordSize)
        let at = Int(dataWindowSize + slot * Self.journalRecordSize)
        let record: [UInt64] = [seq, regs.dmaCommand, regs.dmaSource, regs.dmaDestination, regs.dmaCount,
                                regs.jobChecksum, status, Self.journalMagic]
        _ = record.withUnsafeBytes { memcpy(memory.base + at, $0.baseAddress!, $0.count) }
        memoryDirty.mark(offset: UInt64(at), length: Self.journalRecordSize)
        regs.jobsCompleted = seq
        regs.lastJobStatus = status
        regs.lastJobChecksum = regs.jobChecksum
        let wantIRQ = regs.dmaCommand & Self.dmaCommandIRQ != 0
        regs.dmaCommand &= ~Self.dmaCommandStart
        if wantIRQ { raise(Self.irqDMA) }
    }

    /// Stop the worker between chunks and wait until it is not copying (a STOP arc).
    func quiesce() {
        lock.mutex.withLock { runAllowed = false; lock.broadcast() }
        while lock.mutex.withLock({ workerBusy }) { usleep(50) }
    }

    func resumeRunning() {
        lock.mutex.withLock {
            runAllowed = true
            // Interrupts raised while stopped are delivered now (their status bits stayed set).
            if regs.irqStatus != 0 { signalInterrupt() }
            lock.broadcast()
        }
    }

    /// Digest of the device: memory and registers (tests compare source and destination).
    /// A DMA job has been started and has not completed.
    public var dmaJobInFlight: Bool { lock.mutex.withLock { regs.dmaCommand & Self.dmaCommandStart != 0 } }
    public var dmaJobsCompleted: UInt64 { lock.mutex.withLock { regs.jobsCompleted } }

    public func stateDigest() -> UInt64 {
        quiesceForDigest {
            var h = Self.checksum(Self.checksumSeed, UnsafeRawBufferPointer(start: memory.base, count: Int(memorySize)))
            let r = regs
            for v in [UInt64(r.liveness), UInt64(r.factorial), UInt64(r.status), UInt64(r.irqStatus), r.dmaSource, r.dmaDestination,
                      r.dmaCount, r.dmaCommand, r.jobsCompleted, r.lastJobStatus, r.lastJobChecksum, r.jobProgress, r.jobChecksum,
                      r.dmaStepDelay] {
                h = withUnsafeBytes(of: v) { Self.checksum(h, $0) }
            }
            return h
        }
    }

    private func quiesceForDigest<T>(_ body: () -> T) -> T {
        let wasRunning = lock.mutex.withLock { runAllowed }
        if wasRunning { quiesce() }
        defer { if wasRunning { resumeRunning() } }
        return lock.mutex.withLock { body() }
    }
}
