import CVFIOLive
import Glibc
import SystemCalls
import VFIO
import VFIOUser

/// A device attached to the VM, through the transport-neutral device interface: where the VMM
/// put its BARs, which interrupt it wired to `msi` (MSI-X, MSI or INTx vector 0; signals are
/// counted: a CPL3 guest takes no interrupts), and whether guest RAM is mapped for its DMA.
public final class AttachedDevice: @unchecked Sendable {
    public let device: any VFIODevice
    public let slot: Int
    /// The interrupt eventfd (named for MSI, the common case; it carries whichever was wired).
    public let msi: EventFD
    public private(set) var interrupts: UInt64 = 0
    /// What PCI attach found and set up; nil for a device adopted from a predecessor (live
    /// update), which keeps the layout that predecessor gave it (BAR0 trapped at its slot).
    public internal(set) var pci: PCIAttachment?
    public var bar0: UInt64 { pci?.bar(0)?.guestAddress ?? GuestLayout.deviceBAR0(slot) }
    /// The wired interrupt, as `interruptKind.irqIndex` (an adopted device: MSI, as before).
    public var interruptKind: PCIInterrupt { pci?.interrupt ?? .msi(capability: 0) }

    /// The vfio-user client behind the device. Compatibility for code written before the
    /// device interface (Migration, LiveUpdate, Control): new code uses `device`. Only a
    /// vfio-user device has one.
    public var client: VFIOUserClient {
        guard let c = device as? VFIOUserClient else {
            preconditionFailure("device \(slot) is a \(device.transportName) device (\(device.deviceName)), not vfio-user: use AttachedDevice.device")
        }
        return c
    }
    public var vfioUserClient: VFIOUserClient? { device as? VFIOUserClient }

    init(device: any VFIODevice, slot: Int, msi: EventFD? = nil) throws {
        self.device = device; self.slot = slot
        self.msi = try msi ?? EventFD(nonBlocking: true)
    }
    func drainInterrupts() {
        interrupts &+= (try? msi.consume()) ?? 0
        // INTx of an automasked device stays masked until unmasked (vfio-pci's rule).
        if case .intx(automasked: true)? = pci?.interrupt { try? device.unmaskIRQ(index: VFIOPCIIndex.intx, vector: 0) }
    }
    /// Continue a predecessor's count (live update); signals not yet read stay in the eventfd.
    public func continueCount(from n: UInt64) { interrupts = n }

    /// Wire the chosen interrupt to this VMM's eventfd again (a migration's destination, after
    /// config space was restored). An adopted device: MSI, as its predecessor wired it.
    public func rewireInterrupt() throws {
        guard let index = interruptKind.irqIndex else { return }
        try device.setIRQs(index: index, start: 0, eventfds: [msi])
    }

    /// The config-space bytes a migration carries to the destination device, for this
    /// device's layout: command, BARs, interrupt line, and the wired interrupt's capability
    /// (MSI: control, address, data; MSI-X: control). Replaces the dma-engine's fixed 0x40.
    public var configStateRanges: [Range<Int>] {
        var r: [Range<Int>] = [4..<6, 0x10..<0x28, 0x3c..<0x3d]
        switch interruptKind {
        case let .msi(cap): r.append(Int(cap) + 2..<Int(cap) + 14)
        case let .msix(cap): r.append(Int(cap) + 2..<Int(cap) + 4)
        case .intx, .none: break
        }
        return r
    }
}

/// A guest-physical range routed to a device region: trapped (REGION_READ/WRITE) or, for the
/// parts the device lets the VMM mmap, straight to the mapping.
struct MMIORoute {
    let base: UInt64, size: UInt64
    let device: AttachedDevice
    let region: UInt32
    let writable: Bool
    let mapping: VFIORegionMapping?
}

/// Saved vCPU state: the raw kernel structs (they are plain data) plus the software vCPU's own.
public struct VCPUState: Sendable {
    public var regs: [UInt8]
    public var sregs: [UInt8]
    public var fpu: [UInt8]
    public init(regs: [UInt8], sregs: [UInt8], fpu: [UInt8]) { self.regs = regs; self.sregs = sregs; self.fpu = fpu }
}

/// The micro-VM host: memfd guest RAM in a KVM memslot, vCPU threads running the guest
/// workload, MMIO exits routed to device BARs (vfio-user REGION_READ/WRITE) and to a doorbell,
/// pause/resume with the latency measured, vCPU state save/restore, and dirty-log harvest.
/// Without /dev/kvm, `SoftwareVCPU` threads run the same workload (reported as such).
public final class MicroVM: @unchecked Sendable {
    public let memory: GuestMemory
    public let workload: WorkloadConfig
    public let vcpuCount: Int
    public private(set) var devices: [AttachedDevice] = []
    public let kvm: KVMSystem?
    public let vm: VirtualMachine?
    private var vcpus: [VCPU] = []
    private var software: [SoftwareVCPU] = []
    /// "KVM" or "software vCPU (reason)": every output says which.
    public let executionMode: String
    public var isSoftware: Bool { kvm == nil }
    public static let memorySlot: UInt32 = 0

    // Run control. Pausing is counted: the throttle, the verifier, a migration's stop-copy and
    // QMP stop each pause and resume on their own, and the vCPUs run only when none holds a
    // pause (a verifier's resume must never restart a VM that a migration has stopped).
    private let control = Condition()
    private var pauseDepth = 1  // created paused; the first resume() runs it
    private var pauseRequested: Bool { pauseDepth > 0 || stopRequested }
    private var parked = 0
    private var stopRequested = false
    private var threads: [OSThread] = []
    public private(set) var failure: String?
    public private(set) var doorbells: UInt64 = 0
    public private(set) var mmioExits: UInt64 = 0
    private var rateStart: (UInt64, UInt64) = (0, 0)  // (ns, pages)
    private var irqThread: OSThread?
    private let irqStop: EventFD
    private var routes: [MMIORoute] = []
    private var mmioAllocator = MMIOAllocator()
    private var nextDeviceSlot: UInt32 = 1
    public private(set) var dirtyLogging = false

    /// Build the VM. `devices` are connected VFIO devices of any transport; each is attached as
    /// a PCI device (`PCIAttach`): BARs placed and routed, guest RAM mapped for DMA at
    /// IOVA = GPA (by fd), an interrupt wired to its eventfd. The guest's DMA rounds go to the
    /// first edu-compatible device. With `configuredMSI` (a live update) the devices are
    /// already configured by a predecessor process: their DMA mappings and interrupt eventfds
    /// (given here) stay as they are and nothing is sent to them.
    public init(memorySize: UInt64, vcpus: Int = 1, workload: WorkloadConfig, devices: [any VFIODevice] = [],
                forceSoftware: Bool = false, adoptingMemory: GuestMemory? = nil, populateMemory: Bool = false,
                configuredMSI: [EventFD]? = nil, adoptedPCI: [PCIAttachment?]? = nil) throws {
        guard vcpus >= 1, vcpus <= GuestLayout.maxVCPUs else { throw KVMError.unavailable("--vcpus must be 1...\(GuestLayout.maxVCPUs)") }
        guard workload.workingSet >= 4096 * UInt64(vcpus), GuestLayout.workingSetBase + workload.workingSet <= memorySize else {
            throw KVMError.unavailable("working set of \(workload.workingSet) bytes does not fit in \(memorySize) bytes of guest RAM (it starts at 1 MiB)")
        }
        self.workload = workload
        vcpuCount = vcpus
        irqStop = try EventFD(nonBlocking: true)
        if let m = adoptingMemory {
            guard m.size == memorySize else { throw KVMError.unavailable("adopted guest RAM is \(m.size) bytes, not \(memorySize)") }
            memory = m
        }
        else { memory = try GuestMemory(size: memorySize, populate: populateMemory) }
        if forceSoftware || KVMSystem.unavailableReason != nil {
            kvm = nil; vm = nil
            executionMode = "software vCPU (\(forceSoftware ? "requested" : KVMSystem.unavailableReason!))"
        } else {
            let k = try KVMSystem()
            kvm = k
            vm = try k.createVM()
            executionMode = "KVM"
        }
        if let m = configuredMSI, m.count != devices.count {
            throw KVMError.unavailable("\(devices.count) configured devices but \(m.count) MSI eventfds")
        }
        for (i, c) in devices.enumerated() { self.devices.append(try AttachedDevice(device: c, slot: i, msi: configuredMSI?[i])) }
        if adoptingMemory == nil { try initialiseGuest() }
        if let vm {
            _ = vm.enableManualDirtyProtect()
            try vm.setMemorySlot(slot: Self.memorySlot, guestAddress: 0, size: memorySize, host: memory.base, logDirty: false)
            let cpuid = try kvm!.supportedCPUID()
            for i in 0..<vcpus {
                let v = try vm.createVCPU(id: UInt32(i))
                try v.setCPUID(cpuid)
                vcpus_append(v)
            }
            if adoptingMemory == nil { try resetVCPUs() }
        } else {
            for i in 0..<vcpus { software.append(SoftwareVCPU(vm: self, index: i)) }
        }
        if configuredMSI == nil { for d in self.devices { try connect(d) } }
        else { for (i, d) in self.devices.enumerated() { adoptRoutes(d, pci: adoptedPCI.flatMap { i < $0.count ? $0[i] : nil }) } }
        if adoptingMemory == nil { configureGuestDMA() }
        installKickHandler()
    }

    private func vcpus_append(_ v: VCPU) { vcpus.append(v) }

    /// Page tables, workload code, control blocks.
    private func initialiseGuest() throws {
        memory.buildPageTables()
        _ = memory.loadWorkload()
        let perVCPU = (workload.workingSet / 4096) / UInt64(vcpuCount)
        for i in 0..<vcpuCount {
            let cb = GuestLayout.controlBlock(i)
            func set(_ off: Int, _ v: UInt64) { memory.store64(cb + UInt64(off), v) }
            set(GuestLayout.CB.magic, GuestLayout.CB.magicValue)
            set(GuestLayout.CB.wsBase, GuestLayout.workingSetBase + UInt64(i) * perVCPU * 4096)
            set(GuestLayout.CB.wsPages, perVCPU)
            set(GuestLayout.CB.batch, workload.batch)
            set(GuestLayout.CB.dmaEnabled, 0)  // configureGuestDMA() turns it on once devices are attached
            set(GuestLayout.CB.dmaBAR, GuestLayout.deviceBAR0(0))
            set(GuestLayout.CB.dmaSource, GuestLayout.dmaSource)
            set(GuestLayout.CB.dmaDestination, GuestLayout.dmaDestination)
            set(GuestLayout.CB.dmaLength, workload.dmaLength)
            set(GuestLayout.CB.dmaEvery, max(workload.dmaEvery, 1))
            set(GuestLayout.CB.doorbell, GuestLayout.doorbell)
        }
    }

    /// Long mode at CPL3 set directly (no guest boot code): CR0 PG|PE|ET, CR4 PAE, EFER LME|LMA,
    /// CR3 the PML4, a 64-bit DPL3 code segment and DPL3 data segments.
    private func resetVCPUs() throws {
        for (i, v) in vcpus.enumerated() {
            var s = try v.getSregs()
            var code = kvm_segment()
            code.base = 0; code.limit = 0xffff_ffff; code.selector = 0x33; code.type = 11; code.present = 1
            code.dpl = 3; code.db = 0; code.s = 1; code.l = 1; code.g = 1
            var data = code
            data.selector = 0x2b; data.type = 3; data.db = 1; data.l = 0
            s.cs = code; s.ds = data; s.es = data; s.fs = data; s.gs = data; s.ss = data
            s.cr0 = 0x8000_0011; s.cr4 = 0x20; s.efer = 0x500; s.cr3 = GuestLayout.pml4
            try v.setSregs(s)
            var r = kvm_regs()
            r.rip = GuestLayout.code; r.rflags = 0x2
            r.rdi = GuestLayout.controlBlock(i)
            r.rsp = 0x7_0000 - UInt64(i) * 0x1000
            try v.setRegs(r)
        }
    }

    /// PCI attach (PCIAttach.swift): discover, map guest RAM for DMA, wire an interrupt, turn
    /// decoding on, route the BARs. Only an edu-compatible device the guest will DMA through
    /// must accept DMA_MAP; any other device that refuses still attaches.
    private func connect(_ d: AttachedDevice) throws {
        let dev = d.device
        var a = try PCIAttach.discover(dev, slot: d.slot, allocator: &mmioAllocator)
        if let e = PCIAttach.eduDMA(dev, a) { a.eduBufferSize = e.buffer; a.eduStatusRegister = e.status }
        let guestWillDMA = a.eduBufferSize != nil && workload.dmaEvery > 0 && !devices.contains { $0.pci?.eduBufferSize != nil && $0.pci?.dmaMapped == true }
        do {
            try dev.addDMAMapping(VFIODMARegion(iova: 0, size: memory.size, host: memory.base, fd: memory.fd))
            a.dmaMapped = true
        } catch {
            if guestWillDMA { throw PCIAttachError.dmaRefused("\(dev.deviceName): \(error)") }
            a.dmaRefusal = "\(error)"
        }
        a.interrupt = PCIAttach.wireInterrupt(dev, a, irqCount: a.irqCount, eventfd: d.msi)
        do { try PCIAttach.enableDecoding(dev, a) } catch {
            Log.warning("vm", "device \(d.slot): cannot turn memory decoding and bus mastering on: \(error)")
        }
        for bar in a.bars {
            guard let gpa = bar.guestAddress else { continue }
            var mapping: VFIORegionMapping?
            if !bar.mappableAreas.isEmpty {
                do { mapping = try dev.mapRegionAreas(bar.index) } catch {
                    Log.warning("vm", "device \(d.slot): BAR\(bar.index) cannot be mmap'd (\(error)); it is trapped instead")
                }
                if let m = mapping { mapIntoGuest(m, at: gpa, device: d.slot) }
            }
            routes.append(MMIORoute(base: gpa, size: bar.size, device: d, region: bar.index, writable: bar.writable, mapping: mapping))
        }
        d.pci = a
        Log.info("vm", "device \(d.slot) (\(dev.transportName) \(dev.deviceName)): \(a)")
    }

    /// KVM maps the page-aligned parts of mmap'd areas straight into the guest (read-only
    /// when the device's mapping is: a store then exits and is trapped).
    private func mapIntoGuest(_ m: VFIORegionMapping, at gpa: UInt64, device: Int) {
        guard let vm else { return }
        for a in m.areas {
            let g = gpa + a.offset, size = a.size & ~4095
            guard g % 4096 == 0, size > 0 else { continue }
            do {
                try vm.setDeviceMemorySlot(slot: nextDeviceSlot, guestAddress: g, size: size, host: a.base, readOnly: !a.writable)
                nextDeviceSlot += 1
            } catch {
                Log.warning("vm", "device \(device): region \(m.index) area at \(hex(a.offset)) is trapped, KVM would not map it: \(error)")
            }
        }
    }

    /// A device adopted from a predecessor keeps the layout it was given. With the
    /// predecessor's attach result (a live update's CPR record): its BARs where it put them,
    /// mmap'd where the record still lists mappable areas (an mmap writes nothing to the
    /// device), its interrupt kind; nothing is probed or written. Without one: BAR0 trapped at
    /// its slot (what predecessors of the device interface did).
    private func adoptRoutes(_ d: AttachedDevice, pci: PCIAttachment? = nil) {
        guard let a = pci else {
            routes.append(MMIORoute(base: GuestLayout.deviceBAR0(d.slot), size: 1 << 20, device: d, region: 0, writable: true, mapping: nil))
            return
        }
        for bar in a.bars {
            guard let gpa = bar.guestAddress else { continue }
            var mapping: VFIORegionMapping?
            if !bar.mappableAreas.isEmpty {
                mapping = try? d.device.mapRegionAreas(bar.index)
                if let m = mapping { mapIntoGuest(m, at: gpa, device: d.slot) }
            }
            routes.append(MMIORoute(base: gpa, size: bar.size, device: d, region: bar.index, writable: bar.writable, mapping: mapping))
        }
        d.pci = a
    }

    /// Close the KVM descriptors: vCPUs, VM, /dev/kvm (a live update's old VMM, once the new
    /// one owns the guest; see VMM+LiveUpdate.swift for when). The vCPU threads are stopped
    /// first; the VM cannot run here again.
    public func closeKVM() {
        stop()
        // The kvm_run mapping holds the vCPU file (and so the VM) open as well.
        for v in vcpus { v.runMap.unmap(); v.fd.close() }
        vm?.fd.close()
        kvm?.fd.close()
    }

    /// Point vCPU 0's DMA rounds at the first edu-compatible device with guest RAM mapped, and
    /// size them to its buffer (edu: 4 KiB, less its last word). No such device: no DMA rounds.
    private func configureGuestDMA() {
        let cb = GuestLayout.controlBlock(0)
        guard workload.dmaEvery > 0,
              let d = devices.first(where: { $0.pci?.eduBufferSize != nil && $0.pci?.dmaMapped == true }), let limit = d.pci?.eduTransferLimit else {
            if workload.dmaEvery > 0 && !devices.isEmpty { Log.info("vm", "no edu-compatible device with DMA: the guest runs no DMA rounds") }
            return
        }
        let length = min(workload.dmaLength, limit) & ~7
        guard length > 0 else { return }
        memory.store64(cb + UInt64(GuestLayout.CB.dmaBAR), d.bar0)
        memory.store64(cb + UInt64(GuestLayout.CB.dmaStatus), d.pci?.eduStatusRegister ?? 0)
        memory.store64(cb + UInt64(GuestLayout.CB.dmaLength), length)
        memory.store64(cb + UInt64(GuestLayout.CB.dmaEnabled), 1)
    }

    /// The device the guest's DMA rounds go to (found from vCPU 0's control block, so an
    /// adopted VM finds it as well).
    var guestDMADevice: AttachedDevice? {
        let cb = GuestLayout.controlBlock(0)
        guard memory.load64(cb + UInt64(GuestLayout.CB.dmaEnabled)) != 0 else { return nil }
        let bar = memory.load64(cb + UInt64(GuestLayout.CB.dmaBAR))
        return devices.first { $0.bar0 == bar }
    }

    // MARK: run control

    /// Start the vCPU threads (paused until `resume()`), and the interrupt counter (a live
    /// update's successor starts counting only once the predecessor has stopped).
    /// Throws when a thread cannot be had; the vCPU threads started are stopped again.
    public func start(countingInterrupts: Bool = true) throws {
        guard threads.isEmpty else { return }  // started already (a retried migrate-incoming)
        do {
            for i in 0..<vcpuCount {
                threads.append(try OSThread(name: "vcpu\(i)") { [self] in vcpuLoop(i) })
            }
            if countingInterrupts { try startInterruptCounting() }
        } catch {
            unwindStart()
            throw error
        }
        _ = waitParked()
    }

    /// Undo a start that failed part-way: the threads started are stopped and joined, and the
    /// VM is as before `start` (paused, not stopping), so a later `start` can succeed.
    private func unwindStart() {
        stop()
        control.mutex.withLock {
            stopRequested = false
            parked = 0
        }
    }

    /// Whether this process reads the devices' interrupt eventfds now.
    public var readsInterrupts: Bool { irqThread != nil }

    /// Count MSIs from the devices' eventfds (a thread polling them).
    public func startInterruptCounting() throws {
        guard irqThread == nil else { return }
        _ = try? irqStop.consume()
        let watch = devices.map { $0.msi.fd.rawValue } + [irqStop.fd.rawValue]
        irqThread = try OSThread(name: "irq") { [self] in
            while true {
                guard let which = try? Poll.waitAnyReadable(watch, timeoutMilliseconds: -1) else { return }
                if which == watch.count - 1 { return }
                devices[which].drainInterrupts()
            }
        }
    }

    /// Stop reading the MSI eventfds: at a live update the successor reads them from here on,
    /// and a signal arriving meanwhile waits in the eventfd's counter.
    public func stopInterruptCounting() {
        try? irqStop.signal()
        irqThread?.join()
        irqThread = nil
    }

    /// Release one pause; the vCPUs run when no pause is held.
    public func resume() {
        control.mutex.withLock {
            guard pauseDepth > 0 else { return }
            pauseDepth -= 1
            guard pauseDepth == 0 else { return }
            rateStart = (monotonicNanoseconds(), totalPagesWrittenUnlocked())
            for v in vcpus { v.requestImmediateExit(false) }
            control.broadcast()
        }
    }

    /// Hold a pause: stop every vCPU and wait until all are parked; returns the latency in ns.
    /// Every pause() must be matched by one resume().
    @discardableResult
    public func pause() -> UInt64 {
        let t = monotonicNanoseconds()
        control.mutex.withLock {
            pauseDepth += 1
            for v in vcpus { v.requestImmediateExit(true) }
        }
        for th in threads { pthread_kill(th.pthread, SIGUSR1) }
        _ = waitParked()
        return monotonicNanoseconds() - t
    }

    public var isPaused: Bool { control.mutex.withLock { pauseRequested && parked == vcpuCount } }

    private func waitParked() -> Bool {
        if threads.isEmpty { return failure == nil }  // stopped (or never started): nothing runs
        return control.mutex.withLock {
            while parked < vcpuCount && failure == nil {
                if !control.wait(timeoutSeconds: 0.05) {
                    // A vCPU may be between KVM_RUNs: kick again.
                    for th in threads { pthread_kill(th.pthread, SIGUSR1) }
                }
            }
            return failure == nil
        }
    }

    public func stop() {
        if threads.isEmpty { return }
        control.mutex.withLock {
            stopRequested = true
            for v in vcpus { v.requestImmediateExit(true) }
            control.broadcast()
        }
        for th in threads { pthread_kill(th.pthread, SIGUSR1) }
        for th in threads { th.join() }
        threads = []
        stopInterruptCounting()
    }

    deinit { stop() }

    /// Park here when asked; returns false when the VM is stopping.
    func checkpoint() -> Bool {
        control.mutex.withLock {
            guard pauseRequested else { return !stopRequested }
            parked += 1
            control.broadcast()
            while pauseRequested && !stopRequested { control.wait() }
            parked -= 1
            return !stopRequested
        }
    }

    func fail(_ why: String) {
        control.mutex.withLock {
            if failure == nil { failure = why }
            pauseDepth += 1
            parked += 1
            control.broadcast()
        }
        Log.error("vm", why)
    }

    private func vcpuLoop(_ i: Int) {
        if isSoftware { software[i].run(); return }
        let v = vcpus[i]
        while checkpoint() {
            let ran: Bool
            do { ran = try v.runOnce() } catch { fail("vCPU \(i): \(error)"); return }
            guard ran else { continue }
            let run = v.run
            switch Int32(run.pointee.exit_reason) {
            case Int32(VL_KVM_EXIT_MMIO):
                handleMMIO(vcpu: i, run)
            case Int32(VL_KVM_EXIT_INTR):
                continue
            case Int32(VL_KVM_EXIT_HLT):
                fail("vCPU \(i) halted"); return
            case Int32(VL_KVM_EXIT_SHUTDOWN):
                let rip = (try? v.getRegs().rip) ?? 0
                fail("vCPU \(i) shut down (triple fault) at rip \(hex(rip))"); return
            case Int32(VL_KVM_EXIT_FAIL_ENTRY):
                fail("vCPU \(i) entry failed, reason \(hex(vl_run_fail_reason(run)))"); return
            case Int32(VL_KVM_EXIT_INTERNAL_ERROR):
                fail("vCPU \(i) KVM internal error, suberror \(vl_run_internal_suberror(run))"); return
            default:
                let rip = (try? v.getRegs().rip) ?? 0
                fail("vCPU \(i) unexpected exit \(run.pointee.exit_reason) at rip \(hex(rip))"); return
            }
        }
    }

    private func handleMMIO(vcpu i: Int, _ run: UnsafeMutablePointer<kvm_run>) {
        let addr = vl_run_mmio_addr(run), len = Int(vl_run_mmio_len(run)), write = vl_run_mmio_is_write(run) != 0
        let data = vl_run_mmio_data(run)!
        mmioExits &+= 1
        if addr == GuestLayout.doorbell && write {
            doorbell(vcpu: i)
            return
        }
        do {
            if try routeMMIO(addr, data, len, write: write) { return }
        } catch {
            // A device that refuses (e.g. while migrating) reads as all ones, as on a bus.
            if !write { memset(data, 0xff, len) }
            Log.debug("vm", "MMIO \(write ? "write" : "read") at \(hex(addr)) refused: \(error)")
            return
        }
        fail("vCPU \(i): \(write ? "store to" : "load from") unmapped MMIO address \(hex(addr))")
    }

    /// One guest access to a device BAR: straight to an mmap'd area, else trapped to the
    /// device. False when no BAR is there.
    private func routeMMIO(_ addr: UInt64, _ data: UnsafeMutableRawPointer, _ len: Int, write: Bool) throws -> Bool {
        guard let r = routes.first(where: { addr >= $0.base && addr - $0.base < $0.size }) else { return false }
        let off = addr - r.base
        guard UInt64(len) <= r.size - off else { throw VFIODeviceError.unsupported("access at \(hex(addr)) crosses the end of BAR\(r.region)") }
        if let p = r.mapping?.pointer(offset: off, count: len, write: write) {
            if write { p.copyMemory(from: data, byteCount: len) } else { data.copyMemory(from: p, byteCount: len) }
        } else if write {
            // Never handed to the transport: a client may write through its own read-only mmap.
            guard r.writable else { throw VFIODeviceError.unsupported("BAR\(r.region) of device \(r.device.slot) is read-only") }
            try r.device.device.regionWrite(r.region, offset: off, from: UnsafeRawBufferPointer(start: data, count: len))
        } else {
            try r.device.device.regionRead(r.region, offset: off, into: UnsafeMutableRawBufferPointer(start: data, count: len))
        }
        return true
    }

    /// What a guest load of `count` bytes at `gpa` in the MMIO window returns (for checks,
    /// tests and tools: it takes exactly the guest's route).
    public func mmioRead(_ gpa: UInt64, count: Int) throws -> [UInt8] {
        guard count > 0, count <= 8 else { throw VFIODeviceError.unsupported("an MMIO access is 1 to 8 bytes, not \(count)") }
        var b = [UInt8](repeating: 0, count: count)
        let routed = try b.withUnsafeMutableBytes { try routeMMIO(gpa, $0.baseAddress!, count, write: false) }
        guard routed else { throw VFIODeviceError.unsupported("no device BAR at \(hex(gpa))") }
        return b
    }

    /// A guest store at `gpa` in the MMIO window, routed as the guest's would be.
    public func mmioWrite(_ gpa: UInt64, _ bytes: [UInt8]) throws {
        guard bytes.count > 0, bytes.count <= 8 else { throw VFIODeviceError.unsupported("an MMIO access is 1 to 8 bytes, not \(bytes.count)") }
        var b = bytes
        let routed = try b.withUnsafeMutableBytes { try routeMMIO(gpa, $0.baseAddress!, bytes.count, write: true) }
        guard routed else { throw VFIODeviceError.unsupported("no device BAR at \(hex(gpa))") }
    }

    /// Doorbell: count, and throttle to the requested dirty rate.
    func doorbell(vcpu i: Int) {
        doorbells &+= 1
        guard workload.dirtyRate > 0 else { return }
        let (t0, p0) = control.mutex.withLock { rateStart }
        let done = totalPagesWrittenUnlocked() &- p0
        let due = t0 + done * 1_000_000_000 / workload.dirtyRate
        let now = monotonicNanoseconds()
        if due > now { usleep(UInt32(min(due - now, 200_000_000) / 1000)) }
    }

    // MARK: throttle (auto-converge)

    // MARK: observation

    private func totalPagesWrittenUnlocked() -> UInt64 {
        (0..<vcpuCount).reduce(0) { $0 + memory.load64(GuestLayout.controlBlock($1) + UInt64(GuestLayout.CB.pagesWritten)) }
    }
    public var pagesWritten: UInt64 { totalPagesWrittenUnlocked() }
    public var dmaRoundsOK: UInt64 {
        (0..<vcpuCount).reduce(0) { $0 + memory.load64(GuestLayout.controlBlock($1) + UInt64(GuestLayout.CB.dmaOK)) }
    }
    public var interruptsCounted: [UInt64] { devices.map(\.interrupts) }

    /// Verify every page and the last DMA round, holding a pause for the check.
    public func verify() -> VerifierReport {
        pause()
        defer { resume() }
        var r = VerifierReport()
        for i in 0..<vcpuCount { WorkloadVerifier.verify(memory: memory, controlBlock: GuestLayout.controlBlock(i), into: &r) }
        if let f = failure { r.violations.insert("the VM failed: \(f)", at: 0) }
        return r
    }

    // MARK: dirty tracking

    /// Turn KVM dirty logging of guest RAM on or off (software vCPUs log through their accessor).
    public func setDirtyLogging(_ on: Bool) throws {
        dirtyLogging = on
        if let vm { try vm.setMemorySlot(slot: Self.memorySlot, guestAddress: 0, size: memory.size, host: memory.base, logDirty: on) }
        for s in software { s.setLogging(on, pages: memory.size / 4096) }
    }

    /// The pages the vCPUs wrote since the last harvest (one bit per 4 KiB page of guest RAM).
    public func harvestDirtyPages() throws -> [UInt64] {
        let pages = memory.size / 4096
        if let vm { return try vm.dirtyLog(slot: Self.memorySlot, pages: pages) }
        var out = [UInt64](repeating: 0, count: Int((pages + 63) / 64))
        for s in software { for (i, w) in s.takeDirty().enumerated() where i < out.count { out[i] |= w } }
        return out
    }

    // MARK: state

    public func saveVCPUs() throws -> [VCPUState] {
        if !vcpus.isEmpty {
            return try vcpus.map { v in
                var r = try v.getRegs(), s = try v.getSregs(), f = try v.getFPU()
                return VCPUState(regs: withUnsafeBytes(of: &r) { Array($0) }, sregs: withUnsafeBytes(of: &s) { Array($0) },
                                 fpu: withUnsafeBytes(of: &f) { Array($0) })
            }
        }
        return software.map { $0.saveState() }
    }

    public func restoreVCPUs(_ states: [VCPUState]) throws {
        guard states.count == vcpuCount else { throw KVMError.unavailable("state has \(states.count) vCPUs, this VM \(vcpuCount)") }
        if !vcpus.isEmpty {
            for (v, st) in zip(vcpus, states) {
                guard st.regs.count == MemoryLayout<kvm_regs>.size, st.sregs.count == MemoryLayout<kvm_sregs>.size,
                      st.fpu.count == MemoryLayout<kvm_fpu>.size else { throw KVMError.unavailable("vCPU state has the wrong size for this KVM") }
                var r = kvm_regs(), s = kvm_sregs(), f = kvm_fpu()
                withUnsafeMutableBytes(of: &r) { d in st.regs.withUnsafeBytes { d.copyMemory(from: $0) } }
                withUnsafeMutableBytes(of: &s) { d in st.sregs.withUnsafeBytes { d.copyMemory(from: $0) } }
                withUnsafeMutableBytes(of: &f) { d in st.fpu.withUnsafeBytes { d.copyMemory(from: $0) } }
                try v.setSregs(s); try v.setRegs(r); try v.setFPU(f)
            }
        } else {
            for (sw, st) in zip(software, states) { try sw.restoreState(st) }
        }
    }

    /// Attach a device after construction (the destination of a migration, a live update).
    /// Without `mapDMA` it is taken as configured already (adopted: nothing is sent).
    /// Only before `start()`: the vCPU threads read the routes without a lock.
    public func attach(_ device: any VFIODevice, mapDMA: Bool = true) throws -> AttachedDevice {
        guard threads.isEmpty else { throw KVMError.unavailable("devices are attached before the VM starts") }
        let d = try AttachedDevice(device: device, slot: devices.count)
        devices.append(d)
        if mapDMA { try connect(d) } else { adoptRoutes(d) }
        return d
    }
}

/// SIGUSR1 kicks a vCPU thread out of KVM_RUN (EINTR); the handler itself does nothing.
private func installKickHandler() {
    struct Once { nonisolated(unsafe) static var done = false }
    guard !Once.done else { return }
    Once.done = true
    var sa = sigaction()
    sa.__sigaction_handler.sa_handler = { _ in }
    sigemptyset(&sa.sa_mask)
    sa.sa_flags = 0  // no SA_RESTART: KVM_RUN must return
    sigaction(SIGUSR1, &sa, nil)
}
