import Glibc
import SystemCalls
import VFIO

/// The guest workload executed by a host thread when /dev/kvm is missing: the same page
/// invariant, the same control block, the same DMA round trip, the same doorbell. Writes go
/// through an accessor that logs them in a dirty bitmap, which is what KVM's dirty log gives
/// for real vCPUs. Every output names this mode.
final class SoftwareVCPU: @unchecked Sendable {
    unowned let vm: MicroVM
    let index: Int
    // The workload's "registers" (what %r10, %r11, %r12, %r14 hold in guest/workload.S).
    var i: UInt64 = 0, s: UInt64 = 1, p: UInt64 = 0, untilDMA: UInt64 = 0
    private var started = false
    private var dirty: DirtyBitmap?
    private let dirtyLock = Mutex()

    init(vm: MicroVM, index: Int) { self.vm = vm; self.index = index }

    private var cb: UInt64 { GuestLayout.controlBlock(index) }
    private func cbLoad(_ off: Int) -> UInt64 { vm.memory.load64(cb + UInt64(off)) }

    func setLogging(_ on: Bool, pages: UInt64) {
        dirtyLock.withLock { dirty = on ? DirtyBitmap(pageSize: 4096, length: pages * 4096) : nil }
    }
    func takeDirty() -> [UInt64] { dirtyLock.withLock { dirty?.takeWords() ?? [] } }

    @inline(__always) private func store(_ gpa: UInt64, _ v: UInt64) {
        vm.memory.store64(gpa, v)
        dirtyLock.withLock { dirty?.mark(offset: gpa, length: 8) }
    }

    func run() {
        if !started { untilDMA = cbLoad(GuestLayout.CB.dmaEvery); started = true }
        let base = cbLoad(GuestLayout.CB.wsBase), n = cbLoad(GuestLayout.CB.wsPages)
        while vm.checkpoint() {
            for _ in 0..<cbLoad(GuestLayout.CB.batch) {
                let a = base + i * 4096
                for (off, v) in WorkloadVerifier.expectedWords(index: i, sequence: s) { store(a + UInt64(off), v) }
                p += 1
                store(cb + UInt64(GuestLayout.CB.pagesWritten), p)
                i += 1
                if i == n { i = 0; s += 1 }
            }
            if cbLoad(GuestLayout.CB.dmaEnabled) != 0 {
                untilDMA -= 1
                if untilDMA == 0 { untilDMA = cbLoad(GuestLayout.CB.dmaEvery); dmaRound() }
            }
            vm.doorbell(vcpu: index)
        }
    }

    /// The DMA round trip of the workload, through the device's BAR0 as the guest does it.
    private func dmaRound() {
        guard let d = vm.guestDMADevice?.device else { return }
        let src = cbLoad(GuestLayout.CB.dmaSource), dst = cbLoad(GuestLayout.CB.dmaDestination), len = cbLoad(GuestLayout.CB.dmaLength)
        store(cb + UInt64(GuestLayout.CB.dmaPhase), 1)
        store(cb + UInt64(GuestLayout.CB.dmaKey), p)
        for k in 0..<(len / 8) { store(src + k * 8, p ^ k ^ GuestLayout.dmaPattern) }
        func job(_ from: UInt64, _ to: UInt64, _ cmd: UInt64) -> Bool {
            do {
                try d.regionStore(0, 0x80, from); try d.regionStore(0, 0x88, to); try d.regionStore(0, 0x90, len); try d.regionStore(0, 0x98, cmd)
                while try d.regionLoad(0, 0x98, as: UInt64.self) & 1 != 0 { usleep(20) }
                let status = cbLoad(GuestLayout.CB.dmaStatus)
                return try status == 0 || d.regionLoad(0, status, as: UInt64.self) == 0
            } catch { return false }
        }
        var ok = job(src, 0x40000, 5) && job(0x40000, dst, 7)
        if ok { for k in 0..<(len / 8) where vm.memory.load64(src + k * 8) != vm.memory.load64(dst + k * 8) { ok = false; break } }
        // The device wrote dst by DMA: the device's own dirty log covers it, as for real vCPUs.
        let counter = ok ? GuestLayout.CB.dmaOK : GuestLayout.CB.dmaErrors
        store(cb + UInt64(counter), cbLoad(counter) + 1)
        store(cb + UInt64(GuestLayout.CB.dmaPhase), 0)
    }

    func saveState() -> VCPUState {
        var w = [UInt8]()
        for v in [i, s, p, untilDMA, started ? 1 : 0] { withUnsafeBytes(of: v.littleEndian) { w.append(contentsOf: $0) } }
        return VCPUState(regs: w, sregs: [], fpu: [])
    }

    func restoreState(_ st: VCPUState) throws {
        guard st.regs.count == 40, st.sregs.isEmpty else { throw KVMError.unavailable("state is not from a software vCPU") }
        let v = (0..<5).map { k in st.regs[(k * 8)..<(k * 8 + 8)].enumerated().reduce(UInt64(0)) { $0 | UInt64($1.element) << (8 * UInt64($1.offset)) } }
        i = v[0]; s = v[1]; p = v[2]; untilDMA = v[3]; started = v[4] != 0
    }
}
