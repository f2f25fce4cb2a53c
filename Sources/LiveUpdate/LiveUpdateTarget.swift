import Glibc
import Machine
import Migration
import SystemCalls
import KernelVFIO
import VFIO
import VFIOUser

/// The new VMM's side of a live update. It builds the VM around the descriptors it was given
/// (guest RAM mapped again, lazily; device connections and MSI eventfds adopted as they are,
/// with nothing sent to any device), applies the main stream (vCPUs, the VMM's own device
/// state), and runs the guest only after the old VMM has committed.
public final class LiveUpdateTarget: MigrationSink {
    public let vm: MicroVM
    public let machine: MachineRecord
    public let state: CPRState
    public let mode: LiveUpdateMode
    public var report: LiveUpdateReport
    private var pausedAt: UInt64 = 0
    private var interrupts: [UInt64]?
    private var sawVCPUs = false
    private var ended = false
    /// Fault injection for tests: called at each named step ("after-state", "load", "commit").
    public var beforeStep: ((String) throws -> Void)?
    /// How long to wait for the old VMM's GO after LOADED: it sends GO at once, so a longer
    /// silence means it hangs or died, and this VMM gives up without running the guest.
    public var goTimeoutMilliseconds: Int32 = 30_000
    /// Per kernel device: attach this process to its DMA mappings (legacy MAP with VADDR,
    /// iommufd CHANGE_PROCESS), run once the main stream is in, as QEMU's post_load hooks.
    private var finishAdoption: [() throws -> Void] = []

    /// Build the VM from `state`. On any error every descriptor received is closed (adopted
    /// device connections are released without being shut down: they are still the old VMM's).
    public init(state: CPRState, mode: LiveUpdateMode) throws {
        self.state = state
        self.mode = mode
        var clients: [VFIOUserClient] = []
        var finish: [() throws -> Void] = []
        do {
            guard let rec = state.record(MachineRecord.name) else { throw CPRError.malformed("no machine record") }
            machine = try MachineRecord(decoding: rec)
            guard let ram = state.find(CPRNames.guestRAM) else { throw CPRError.malformed("no guest RAM descriptor (\(CPRNames.guestRAM))") }
            let size = try ram.fileSize()
            guard size >= machine.memorySize else {
                throw CPRError.malformed("the guest RAM memfd holds \(size) bytes, the machine \(machine.memorySize)")
            }
            let memory = try GuestMemory(adopting: ram, size: machine.memorySize)
            var msis: [EventFD] = []
            var devices: [any VFIODevice] = []
            var attachments: [PCIAttachment?] = []
            for i in 0..<machine.devices {
                guard let msi = state.find(CPRNames.interrupt(i), id: 0) else { throw CPRError.malformed("device \(i): its interrupt eventfd is missing") }
                // No record: a predecessor from before kernel devices (vfio-user only).
                let transport = state.record(CPRNames.transport(i)).map { String(decoding: $0, as: UTF8.self) } ?? VFIOUserClient.cprTransport
                var pci: PCIAttachment?
                if let b = state.record(CPRNames.attachment(i)) {
                    do { pci = try PCIAttachment(decodingRecord: b) } catch { throw CPRError.malformed("device \(i): \(error)") }
                }
                if transport == AssignedKernelDevice.cprTransport {
                    let (d, f) = try AssignedKernelDevice.cprAdopt(state, index: i, memory: memory)
                    devices.append(d); finish.append(f); msis.append(EventFD(adopting: msi))
                    attachments.append(pci)
                    continue
                }
                guard transport == VFIOUserClient.cprTransport else { throw CPRError.malformed("device \(i): unknown transport '\(transport)'") }
                guard let sock = state.find(CPRNames.device(i)), let rec = state.record(CPRNames.device(i)) else {
                    throw CPRError.malformed("device \(i): its socket or record is missing")
                }
                let h: VFIOUserClient.HandoverState
                do { h = try .init(decoding: rec[...]) } catch { throw CPRError.malformed("device \(i): \(error)") }
                let twin = state.find(CPRNames.twinSocket(i)).map { UnixSocket(adopting: $0) }
                let c = try VFIOUserClient(adopting: UnixSocket(adopting: sock), twin: twin, state: h) { m in
                    guard let off = m.fdOffset, off < memory.size, m.size <= memory.size - off else {
                        throw CPRError.malformed("device \(i): DMA mapping at IOVA \(hex(m.iova)) is not inside guest RAM")
                    }
                    return memory.base + Int(off)
                }
                clients.append(c)
                devices.append(c)
                msis.append(EventFD(adopting: msi))
                // Its BARs stay where they were, trapped: mmap'ing a vfio-user region would ask
                // the server for its fds.
                attachments.append(pci?.allBARsTrapped)
            }
            vm = try MicroVM(memorySize: machine.memorySize, vcpus: machine.vcpus, workload: machine.workload, devices: devices,
                             forceSoftware: machine.softwareVCPUs, adoptingMemory: memory, configuredMSI: msis, adoptedPCI: attachments)
        } catch {
            for c in clients { c.releaseForHandover() }
            state.closeAll()
            throw error
        }
        finishAdoption = finish
        report = LiveUpdateReport(mode: mode, handedOver: LiveUpdateSource.describe(state), successorPID: getpid())
        do { try vm.start(countingInterrupts: false) } catch {
            // No vCPU threads here: the old VMM keeps the VM, as for any failure before the commit.
            abandon()
            throw error
        }
    }

    /// Give up after a failure before the commit: the VM never ran here, and the devices and
    /// memory stay the old VMM's (nothing is shut down, nothing sent).
    public func abandon() {
        for d in vm.devices { d.vfioUserClient?.releaseForHandover() }
        vm.stop()
    }

    /// After the main stream: attach this process to the kernel devices' DMA mappings. Before
    /// it the old VMM has dropped its addresses (legacy) and no longer runs the guest.
    private func adoptMappings() throws {
        try beforeStep?("adopt-mappings")
        for f in finishAdoption { try f() }
    }

    // MARK: cpr-transfer

    /// Set by a VMM that starts its successor itself: its pid. The successor then waits for it
    /// only while it lives, and at most `timeoutMilliseconds`.
    public static let parentVariable = "VFIO_LIVE_CPR_PARENT"

    /// Wait for the old VMM to connect on `listener`. A successor the old VMM started (see
    /// `parentVariable`) gives up when that VMM exits before connecting (it was killed, say,
    /// right after spawning it) or after `timeoutMilliseconds`, with an error that says which;
    /// one started by hand waits as long as it takes, like QEMU's -incoming. `cancel` (e.g. a
    /// SIGTERM eventfd) ends the wait too. Every later read and write on the connection is
    /// bounded by `peerTimeoutMilliseconds`.
    public static func awaitPredecessor(on listener: UnixListener, timeoutMilliseconds: Int32 = 30_000,
                                        peerTimeoutMilliseconds: Int32 = 30_000, cancel: FileDescriptor? = nil) throws -> UnixSocket {
        var parent: pid_t?
        if let v = getenv(parentVariable) {
            parent = pid_t(String(cString: v))
            unsetenv(parentVariable)
        }
        let deadline = monotonicNanoseconds() + UInt64(max(timeoutMilliseconds, 0)) * 1_000_000
        while true {
            let sliceMS: Int32 = parent == nil ? 1000 : 50
            if let s = try listener.accept(timeoutMilliseconds: sliceMS, cancel: cancel) {
                setSocketTimeouts(s.fd, milliseconds: peerTimeoutMilliseconds)
                return s
            }
            if let c = cancel, (try? Poll.waitReadable(c, timeoutMilliseconds: 0)) == true {
                throw CPRError.channel("stopped while waiting for the old VMM to connect on \(listener.path)")
            }
            guard let p = parent else { continue }
            if getppid() != p {
                throw CPRError.channel("the old VMM (pid \(p)) exited before it handed the VM over; there is nothing to take over")
            }
            if monotonicNanoseconds() > deadline {
                throw CPRError.channel("the old VMM (pid \(p)) did not connect on \(listener.path) within \(timeoutMilliseconds) ms")
            }
        }
    }

    /// Receive the state on `socket` and build the VM (cpr-transfer, step one).
    public static func accept(on socket: UnixSocket) throws -> LiveUpdateTarget {
        let state = try CPRState.receive(from: socket)
        do { return try LiveUpdateTarget(state: state, mode: .transfer) } catch {
            try? CPRMessage.send(socket, .error, "\(error)")
            throw error
        }
    }

    /// Say READY, load the main stream, wait for the commit, run the guest, report. On any
    /// error before GO the old VMM takes the VM back; this one never ran it.
    public func complete(over socket: UnixSocket) throws {
        do {
            try beforeStep?("ready")
            try CPRMessage.send(socket, .ready)
            try beforeStep?("load")
            let decoder = MigrationStreamDecoder(source: ChannelSource(socket), sink: self)
            try decoder.run()
            report.streamBytes = Int(decoder.offset)
            try checkComplete(decoder)
            try adoptMappings()
            try beforeStep?("commit")
            try CPRMessage.send(socket, .loaded)
            // From here the old VMM may commit at any moment: the one window in which this
            // process dying loses the VM is between LOADED and the resume below (one message).
            _ = try CPRMessage.expect(.go, from: socket, timeoutMilliseconds: goTimeoutMilliseconds)
        } catch {
            try? CPRMessage.send(socket, .error, "\(error)")
            abandon()
            throw error
        }
        run()
        try? CPRMessage.send(socket, .done, report.json)
    }

    // MARK: cpr-exec

    /// After exec: the main stream came in the state memfd; there is no one to roll back to.
    public func complete(stream: [UInt8]) throws {
        let decoder = MigrationStreamDecoder(source: MemorySource(stream), sink: self)
        do {
            try beforeStep?("load")
            try decoder.run()
            try checkComplete(decoder)
            try adoptMappings()
        } catch {
            abandon()
            throw error
        }
        report.streamBytes = stream.count
        run()
    }

    private func checkComplete(_ d: MigrationStreamDecoder) throws {
        guard d.flags & MigrationStream.flagLiveUpdate != 0 else { throw CPRError.malformed("the main stream is not a live-update stream") }
        guard ended, sawVCPUs, interrupts != nil else { throw CPRError.malformed("the main stream lacks VCPUS, LIVE_UPDATE or END") }
    }

    private func run() {
        for (d, n) in zip(vm.devices, interrupts ?? []) { d.continueCount(from: n) }
        vm.readInterruptsAfterHandover()
        if getenv(DMAInFlightProbe.variable) != nil { DMAInFlightProbe.awaitCompletion(vm) }
        vm.resume()
        let now = monotonicNanoseconds()
        report.blackoutNS = now > pausedAt ? now - pausedAt : 0
    }

    // MARK: MigrationSink

    public func config(ramSize: UInt64, vcpus: UInt32, devices: UInt32) throws {
        guard ramSize == vm.memory.size, vcpus == UInt32(vm.vcpuCount), devices == UInt32(vm.devices.count) else {
            throw StreamError.configMismatch("the main stream describes \(ramSize) bytes, \(vcpus) vCPUs, \(devices) devices; the CPR state \(vm.memory.size), \(vm.vcpuCount), \(vm.devices.count)")
        }
    }
    public func ramDestination(gpa: UInt64, pages: UInt32) throws -> UnsafeMutableRawBufferPointer {
        throw StreamError.malformed(.ram, id: 0, "no RAM in a live update")
    }
    public func ramZero(gpa: UInt64, pages: UInt32) throws { throw StreamError.malformed(.ram, id: 0, "no RAM in a live update") }
    public func deviceSetup(device: UInt32) throws { throw StreamError.malformed(.device, id: 0, "no device state in a live update") }
    public func deviceData(device: UInt32, _ data: UnsafeRawBufferPointer) throws { try deviceSetup(device: device) }
    public func deviceConfig(device: UInt32, _ data: ArraySlice<UInt8>) throws { try deviceSetup(device: device) }
    public func deviceInitialDataSent(device: UInt32) throws { try deviceSetup(device: device) }
    public func vcpus(_ states: [VCPUStateBytes]) throws {
        do { try vm.restoreVCPUs(states.map { VCPUState(regs: $0.regs, sregs: $0.sregs, fpu: $0.fpu) }) } catch {
            throw StreamError.configMismatch("vCPU state: \(error)")
        }
        sawVCPUs = true
    }
    public func liveUpdate(pausedAt: UInt64, interrupts: [UInt64]) throws {
        self.pausedAt = pausedAt
        self.interrupts = interrupts
    }
    public func end(pagesSent: UInt64) throws {
        guard pagesSent == 0 else { throw StreamError.malformed(.end, id: 0, "a live update sends no pages, END says \(pagesSent)") }
        ended = true
    }
}

/// The main stream from the state memfd (cpr-exec).
final class MemorySource: ByteSource {
    let bytes: [UInt8]
    var at = 0
    init(_ b: [UInt8]) { bytes = b }
    func readExactly(_ buffer: UnsafeMutableRawBufferPointer) throws {
        guard bytes.count - at >= buffer.count else { throw Errno.EPROTO }
        bytes.withUnsafeBytes { buffer.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[at..<(at + buffer.count)])) }
        at += buffer.count
    }
}
