import Glibc
import Machine
import Migration
import SystemCalls
import VFIOUser

public enum LiveUpdateMode: String, Sendable {
    case transfer = "cpr-transfer", exec = "cpr-exec"
}

/// Something besides guest RAM and vfio-user devices that a live update carries over (kernel
/// VFIO containers and iommufd objects). The hooks run in the old VMM.
public protocol CPRParticipant: AnyObject {
    /// Why the update cannot proceed, checked before anything is touched (nil: it can).
    func cprBlocker() -> String?
    /// Save descriptors and records (guest still running).
    func cprSave(into state: inout CPRState) throws
    /// vCPUs paused, just before the main stream (e.g. VFIO_DMA_UNMAP_FLAG_VADDR).
    func cprFreeze() throws
    /// Undo `cprFreeze` after a failed handover (e.g. VFIO_DMA_MAP_FLAG_VADDR again).
    func cprThaw()
}

/// What a completed live update did, as both VMMs report it.
public struct LiveUpdateReport: Sendable {
    public var mode: LiveUpdateMode
    /// vCPUs paused in the old VMM → running in the new one (ns).
    public var blackoutNS: UInt64
    /// Of which: stopping the vCPUs in the old VMM.
    public var pauseNS: UInt64
    public var handedOver: [String]
    public var stateBytes: Int
    public var streamBytes: Int
    public var successorPID: Int32
    /// The new VMM serves QMP on the old one's listening socket (same path).
    public var qmpAdopted = false
    public init(mode: LiveUpdateMode, blackoutNS: UInt64 = 0, pauseNS: UInt64 = 0, handedOver: [String] = [], stateBytes: Int = 0,
                streamBytes: Int = 0, successorPID: Int32 = 0) {
        self.mode = mode; self.blackoutNS = blackoutNS; self.pauseNS = pauseNS; self.handedOver = handedOver
        self.stateBytes = stateBytes; self.streamBytes = streamBytes; self.successorPID = successorPID
    }

    public var json: String {
        let names = handedOver.map { "\"\($0)\"" }.joined(separator: ",")
        return "{\"mode\":\"\(mode.rawValue)\",\"blackout-ns\":\(blackoutNS),\"pause-ns\":\(pauseNS),\"state-bytes\":\(stateBytes)," +
            "\"stream-bytes\":\(streamBytes),\"pid\":\(successorPID),\"qmp-adopted\":\(qmpAdopted),\"handed-over\":[\(names)]}"
    }
}

/// The old VMM's side of a live update: blockers, the CPR state, the blackout, and rollback.
/// Nothing is sent to a device at any point: the devices never notice the handover.
public final class LiveUpdateSource {
    public let vm: MicroVM
    /// Devices that opt out (index → why): a blocker.
    public var optOut: [Int: String] = [:]
    public var participants: [CPRParticipant] = []
    /// Extra descriptors and records (the QMP listener) handed over with the VM.
    public var extraEntries: [CPRState.Entry] = []
    public var extraRecords: [(String, [UInt8])] = []
    /// How long to wait for each answer of the new VMM.
    public var timeoutMilliseconds: Int32 = 30_000
    /// Fault injection for tests: called at each named step; throwing fails the update there.
    public var beforeStep: ((String) throws -> Void)?
    /// Right before GO (the commit): the VMM stops accepting QMP clients, which the successor
    /// accepts from then on (cpr-transfer).
    public var willCommit: (() -> Void)?
    /// The VM was taken back after the pause (any failure from then on): undo `willCommit`.
    public var tookBack: (() -> Void)?

    public init(vm: MicroVM) { self.vm = vm }

    /// Everything that blocks a live update, each with its reason (empty: none).
    public func blockers() -> [String] {
        var out: [String] = []
        if let why = LiveUpdateSource.guestRAMBlocker(vm.memory.fd) { out.append(why) }
        for (i, why) in optOut.sorted(by: { $0.key < $1.key }) { out.append("device \(i) opts out of live update (\(why))") }
        for (i, d) in vm.devices.enumerated() {
            guard let t = DeviceCPR.transport(d) else {
                out.append("device \(i) (\(d.device.transportName) \(d.device.deviceName)) has no live-update support in its transport")
                continue
            }
            if let why = t.cprBlocker() { out.append("device \(i): \(why)") }
        }
        for p in participants { if let why = p.cprBlocker() { out.append(why) } }
        if vm.failure != nil { out.append("the VM has failed: \(vm.failure!)") }
        // The migration engine's own claim: a VM being migrated is not handed over meanwhile.
        if MigrationSource.inProgress(vm) { out.append("a migration of this VM is in progress") }
        return out
    }

    /// Guest RAM must be a memfd (or another shareable file) mapped shared: only then does the
    /// successor map the same pages. Anonymous or private memory would have to be copied.
    public static func guestRAMBlocker(_ fd: FileDescriptor) -> String? {
        var st = stat()
        guard fstat(fd.rawValue, &st) == 0 else { return "guest RAM has no file descriptor to pass (\(Errno.current))" }
        guard (st.st_mode & S_IFMT) == S_IFREG else { return "guest RAM is not backed by a memfd or shared file" }
        // A memfd (its /proc link reads "/memfd:NAME (deleted)") or a file with a name another
        // process can open; GuestMemory always maps it MAP_SHARED, never private.
        let target = readLink("/proc/self/fd/\(fd.rawValue)") ?? ""
        if !target.hasPrefix("/memfd:") && st.st_nlink == 0 { return "guest RAM is an unlinked file that is not a memfd (\(target))" }
        return nil
    }

    /// The CPR state: guest RAM; per device its interrupt eventfd, its attach result and
    /// its transport's descriptors and record (a vfio-user socket and handover record; a
    /// kernel device's container, group or iommufd and device fd); the records a successor
    /// needs to adopt them without reconfiguring anything.
    public func buildState() throws -> CPRState {
        var s = CPRState()
        s.save(CPRNames.guestRAM, vm.memory.fd)
        s.saveRecord(MachineRecord.name, MachineRecord(vm: vm).encode())
        for (i, d) in vm.devices.enumerated() {
            guard let t = DeviceCPR.transport(d) else { throw CPRError.blocked("device \(i) has no live-update support in its transport") }
            try t.cprSave(index: i, memory: vm.memory, into: &s)
            // QEMU preserves the MSI/INTx eventfds ("<dev>_interrupt", vector) so the kernel
            // (or the server) goes on signalling the same ones: no SET_IRQS in the new VMM.
            s.save(CPRNames.interrupt(i), id: 0, d.msi.fd)
            s.saveRecord(CPRNames.transport(i), Array(type(of: t).cprTransport.utf8))
            if let a = d.pci { s.saveRecord(CPRNames.attachment(i), a.encodeRecord()) }
        }
        for p in participants { try p.cprSave(into: &s) }
        s.entries += extraEntries
        for (n, b) in extraRecords { s.saveRecord(n, b) }
        return s
    }

    public static func describe(_ s: CPRState) -> [String] {
        s.entries.map { "\($0.name)/\($0.id)" }
    }

    // MARK: the blackout

    private var frozen = false
    /// Devices whose transport froze (thawed in reverse on a failure).
    private var frozenDevices: [CPRDeviceTransport] = []
    private var pausedAt: UInt64 = 0
    private var pauseNS: UInt64 = 0

    /// Pause the vCPUs, stop reading the MSI eventfds, let go of the device connections and
    /// freeze the participants; returns the main stream. Undone by `thaw()`.
    private func freeze() throws -> [UInt8] {
        pausedAt = monotonicNanoseconds()
        pauseNS = vm.pause()
        frozen = true
        vm.stopInterruptCounting()
        for d in vm.devices {
            guard let t = DeviceCPR.transport(d) else { continue }
            // Counted before the call: a legacy UNMAP_ALL may fail half-way, and recovery
            // must then restore the addresses it did drop.
            frozenDevices.append(t)
            try t.cprFreeze()
        }
        for p in participants { try p.cprFreeze() }
        if getenv(DMAInFlightProbe.variable) != nil { DMAInFlightProbe.start(vm) }
        let states = try vm.saveVCPUs()
        var e = MigrationStreamEncoder(flags: MigrationStream.flagLiveUpdate)
        e.section(.config, MigrationStream.configPayload(ramSize: vm.memory.size, vcpus: vm.vcpuCount, devices: vm.devices.count))
        e.section(.vcpus, MigrationStream.vcpusPayload(states.map { VCPUStateBytes(regs: $0.regs, sregs: $0.sregs, fpu: $0.fpu) }))
        var lu = BEWriter()
        lu.u64(pausedAt); lu.u32(UInt32(vm.devices.count))
        for d in vm.devices { lu.u64(d.interrupts) }
        e.section(.liveUpdate, lu.bytes)
        var end = BEWriter(); end.u64(0)
        e.section(.end, end.bytes)
        return e.bytes
    }

    /// Take the VM back: devices, interrupts, participants, vCPUs, in that order.
    private func thaw() {
        guard frozen else { return }
        frozen = false
        defer { tookBack?() }
        for p in participants.reversed() { p.cprThaw() }
        for t in frozenDevices.reversed() { t.cprThaw() }
        frozenDevices = []
        vm.readInterruptsAfterHandover()
        if getenv(DMAInFlightProbe.variable) != nil { DMAInFlightProbe.awaitCompletion(vm) }
        vm.resume()
    }

    // MARK: cpr-transfer

    /// Hand the VM to the VMM listening on `socket` (started with --incoming cpr:unix:PATH).
    /// Returns once the new VMM runs the guest; on any failure before its commit the VM runs
    /// on here, unchanged, and the error says what happened.
    public func transfer(over socket: UnixSocket) throws -> LiveUpdateReport {
        let b = blockers()
        guard b.isEmpty else { throw CPRError.blocked(b.joined(separator: "; ")) }
        let state = try buildState()
        var report = LiveUpdateReport(mode: .transfer, handedOver: Self.describe(state))
        do {
            try beforeStep?("send-state")
            do { report.stateBytes = try state.send(over: socket) } catch { throw CPRError.channel("sending the CPR state: \(error)") }
            _ = try CPRMessage.expect(.ready, from: socket, timeoutMilliseconds: timeoutMilliseconds)
            try beforeStep?("pause")
            let stream = try freeze()
            report.streamBytes = stream.count
            try beforeStep?("send-stream")
            do { try socket.send(stream) } catch { throw CPRError.channel("sending the main stream: \(error)") }
            _ = try CPRMessage.expect(.loaded, from: socket, timeoutMilliseconds: timeoutMilliseconds)
            try beforeStep?("commit")
            willCommit?()
            do { try CPRMessage.send(socket, .go) } catch { throw CPRError.channel("the new VMM went away before the commit: \(error)") }
        } catch {
            // Tell the new VMM (if it is still there) and close our end: without GO it aborts.
            try? CPRMessage.send(socket, .error, "\(error)")
            socket.shutdown()
            thaw()
            throw error
        }
        // Committed: the new VMM owns the VM. Its DONE carries the blackout it measured. An
        // ERROR instead means it gave up before it ran the guest (it had no GO in time): it
        // sends ERROR only on that path, so the VM is taken back. Silence or EOF is the one
        // ambiguous case (it may have died after resuming the guest): the VM is not touched.
        report.pauseNS = pauseNS
        let answer = Result { try CPRMessage.expect(.done, from: socket, timeoutMilliseconds: timeoutMilliseconds) }
        if case let .failure(CPRError.successor(why)) = answer {
            socket.shutdown()
            thaw()
            throw CPRError.successor("it gave the VM back after the commit: \(why)")
        }
        if case let .success(text) = answer {
            let j = try? JSONValue.parse(Array(text.utf8)[...])
            if let v = j?["blackout-ns"]?.uint64 { report.blackoutNS = v }
            if let v = j?["pid"]?.uint64 { report.successorPID = Int32(v) }
            report.qmpAdopted = j?["qmp-adopted"]?.boolValue ?? false
        }
        // QEMU closes its KVM fds (vCPUs, VM, /dev/kvm, the KVM-VFIO device) at
        // MIG_EVENT_PRECOPY_DONE: the source's part is complete and it never runs the guest
        // again; a new VMM's irqfd / irq-bypass registration for the same VFIO interrupts
        // would otherwise fail with EBUSY. The same point here is DONE (or the ambiguous
        // silence): until then a failed successor gives the VM back, which needs the vCPUs.
        vm.closeKVM()
        return report
    }

    // MARK: cpr-exec

    /// The environment variable naming the memfd that holds the CPR state across exec.
    public static let execStateVariable = "VFIO_LIVE_CPR_EXEC_STATE"

    /// Re-execute `binary` with `argv` in this process, keeping the VM's descriptors open across
    /// exec (close-on-exec is cleared only now). Returns only by throwing, after a failed exec,
    /// with the VM running on here.
    public func exec(binary: String, argv: [String]) throws -> Never {
        let b = blockers()
        guard b.isEmpty else { throw CPRError.blocked(b.joined(separator: "; ")) }
        guard access(binary, X_OK) == 0 else { throw CPRError.exec("\(binary) is not executable (\(Errno.current)); the VM runs on here") }
        let state = try buildState()
        var memfd: FileDescriptor?
        do {
            try beforeStep?("pause")
            let stream = try freeze()
            let fd = try state.writeForExec(trailer: stream)
            memfd = fd
            try beforeStep?("exec")
            try state.setCloseOnExec(false)
            try fd.setCloseOnExec(false)
            setenv(Self.execStateVariable, "\(fd.rawValue)", 1)
            // The KVM fds are close-on-exec (/dev/kvm is opened O_CLOEXEC, KVM_CREATE_VM and
            // KVM_CREATE_VCPU return O_CLOEXEC fds) and the kvm_run mappings go with the old
            // mm: exec closes them here, where QEMU's cpr.c closes them for cpr-exec too
            // (precopy done, just before exec).
            let e = ChildProcess.replaceImage(binary, argv)
            throw CPRError.exec("execv \(binary): \(e); the VM runs on here")
        } catch {
            unsetenv(Self.execStateVariable)
            try? state.setCloseOnExec(true)
            memfd?.close()
            thaw()
            throw error
        }
    }
}

/// Lab fixture (VFIO_LIVE_CPR_TEST_DMA_IN_FLIGHT=1 in the old VMM's environment): once the
/// vCPUs are paused and the device frozen (legacy: no process holds a valid address), start one
/// edu DMA job from the device's buffer into guest RAM at `target`, and copy what the buffer
/// holds (the last round's source, which the paused guest has not touched since) to `expected`
/// with the CPU. The job runs while the VM is handed over (QEMU's edu completes a DMA 100 ms
/// after the command; in the TCG lab that is within the blackout, so it lands while neither
/// VMM drives the device, and with a legacy container while no process has a valid address);
/// the new VMM says whether it was still running when it took the device, and a test compares
/// the two ranges of the guest RAM memfd afterwards.
public enum DMAInFlightProbe {
    public static let variable = "VFIO_LIVE_CPR_TEST_DMA_IN_FLIGHT"
    public static let target: UInt64 = 0x58000, expected: UInt64 = 0x48000

    static func start(_ vm: MicroVM) {
        guard let d = vm.devices.first(where: { $0.pci?.isEduCompatible == true && $0.pci?.dmaMapped == true }),
              let limit = d.pci?.eduTransferLimit else { Log.warning("cpr", "\(variable): no edu device with DMA"); return }
        let len = min(vm.workload.dmaLength, limit) & ~7
        guard len > 0, len <= 0x8000 else { return }
        for k in stride(from: UInt64(0), to: len, by: 8) {
            vm.memory.store64(target + k, 0)
            vm.memory.store64(expected + k, vm.memory.load64(GuestLayout.dmaSource + k))
        }
        do {
            let dev = d.device
            try dev.regionStore(0, 0x80, UInt64(0x40000)); try dev.regionStore(0, 0x88, target)
            try dev.regionStore(0, 0x90, len); try dev.regionStore(0, 0x98, UInt64(3))
            Log.info("cpr", "\(variable): edu DMA job of \(len) bytes to \(hex(target)) started in the blackout")
        } catch { Log.warning("cpr", "\(variable): \(error)") }
    }

    /// The new VMM, before it resumes the guest (whose next round would reprogram the engine):
    /// say whether the job was still running when this VMM took the device, and wait for it.
    static func awaitCompletion(_ vm: MicroVM) {
        guard let d = vm.devices.first(where: { $0.pci?.isEduCompatible == true }) else { return }
        let t0 = monotonicNanoseconds()
        let busy = ((try? d.device.regionLoad(0, 0x98, as: UInt64.self)) ?? 0) & 1 != 0
        while ((try? d.device.regionLoad(0, 0x98, as: UInt64.self)) ?? 0) & 1 != 0, monotonicNanoseconds() - t0 < 10_000_000_000 { usleep(200) }
        let ms = Double(monotonicNanoseconds() - t0) / 1e6
        print("cpr-probe: edu DMA job \(busy ? "still running when this VMM took the device over; it completed \(formatFixed(ms, 1)) ms later" : "had completed before this VMM took the device over")")
        fflush(stdout)
    }
}

extension MicroVM {
    /// The interrupt reader again, in whichever VMM keeps the VM (the successor at its commit,
    /// the old VMM at a thaw). Without a thread the guest runs on; its devices' interrupts wait,
    /// uncounted, in the eventfds' counters (and an automasked INTx stays masked) until the
    /// VMM's periodic check starts the reader again.
    func readInterruptsAfterHandover() {
        do { try startInterruptCounting() } catch {
            Log.error("live-update", "the devices' interrupts are not read: \(error)")
        }
    }
}
