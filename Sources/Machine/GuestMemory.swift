import CVFIOLive
import Glibc
import SystemCalls

/// Where things live in guest-physical memory. Guest RAM is identity-mapped (GVA = GPA) with
/// 2 MiB pages; everything outside RAM that the page tables map is an MMIO window, where a store
/// exits to the VMM (kvm-on-project-machines.md).
public enum GuestLayout {
    public static let pml4: UInt64 = 0x1000
    public static let pdpt: UInt64 = 0x2000
    public static let pdBase: UInt64 = 0x3000         // one page directory per GiB of RAM
    public static let maxRAM: UInt64 = 16 << 30
    public static let mmioPD: UInt64 = pdBase + 16 * 0x1000
    public static let code: UInt64 = 0x20000
    public static let controlBlocks: UInt64 = 0x30000  // one 4 KiB control block per vCPU
    public static let maxVCPUs = 8
    public static let dmaSource: UInt64 = 0x40000      // 64 KiB
    public static let dmaDestination: UInt64 = 0x50000 // 64 KiB
    public static let workingSetBase: UInt64 = 0x10_0000
    /// MMIO window at 64 GiB: device k's BAR0 at mmioBase + k MiB, the doorbell at +256 MiB.
    public static let mmioBase: UInt64 = 64 << 30
    public static let mmioSize: UInt64 = 512 << 20
    public static let doorbell: UInt64 = mmioBase + (256 << 20)
    public static func deviceBAR0(_ k: Int) -> UInt64 { mmioBase + UInt64(k) << 20 }
    public static func controlBlock(_ vcpu: Int) -> UInt64 { controlBlocks + UInt64(vcpu) * 0x1000 }

    /// Control-block offsets, mirrored from guest/workload.S.
    public enum CB {
        public static let magic = 0x00, wsBase = 0x08, wsPages = 0x10, batch = 0x18, dmaEnabled = 0x20, dmaBAR = 0x28
        public static let dmaSource = 0x30, dmaDestination = 0x38, dmaLength = 0x40, dmaEvery = 0x48, doorbell = 0x50
        /// BAR0 offset of the device's job-status register (nonzero = the job failed); 0: none.
        public static let dmaStatus = 0x58
        public static let pagesWritten = 0x80, dmaOK = 0x98, dmaErrors = 0xa0, dmaPhase = 0xb8, dmaKey = 0xc0
        public static let magicValue: UInt64 = 0x4b57_4c56  // "VLWK"
    }
    /// Page-invariant constants, mirrored from guest/workload.S.
    public static let pageMagic: UInt64 = 0x564c_5041_4745_0000
    public static let pageK: UInt64 = 0x9e37_79b9_7f4a_7c15
    public static let pageCheck: UInt64 = 0x5a5a_5a5a_5a5a_5a5a
    public static let dmaPattern: UInt64 = 0x3c3c_3c3c_3c3c_3c3c
}

/// Guest RAM: one memfd mapped MAP_SHARED. The same fd is what KVM's memslot, the device
/// servers (DMA_MAP) and a live-update successor (CPR) all map; nobody else copies it.
public final class GuestMemory: @unchecked Sendable {
    public let fd: FileDescriptor
    public let size: UInt64
    public let map: MappedRegion
    public var base: UnsafeMutableRawPointer { map.base }

    /// `populate`: fault all of it in now (an incoming migration writes every page, and bulk
    /// population is far cheaper than first-touch faults on shadow-paging hosts).
    public init(size: UInt64, populate: Bool = false) throws {
        guard size >= 4 << 20, size % (2 << 20) == 0, size <= GuestLayout.maxRAM else {
            throw KVMError.unavailable("guest memory must be a multiple of 2 MiB from 4 MiB to 16 GiB (got \(size))")
        }
        self.size = size
        fd = try MemFD.create(name: "vfio-live-guest-ram", size: size)
        map = try MappedRegion(fd: fd, length: Int(size), populate: populate)
    }

    /// Adopt guest RAM handed over by another process (live update): map it, lazily.
    public init(adopting fd: FileDescriptor, size: UInt64) throws {
        self.fd = fd
        self.size = size
        map = try MappedRegion(fd: fd, length: Int(size))
    }

    /// The byte ranges of the memfd that hold data; everything else is a hole (never written,
    /// reads as zero). Found with SEEK_DATA/SEEK_HOLE, without touching a page: reading a hole
    /// through the mapping would fault a page in (~20 µs each on shadow-paging hosts).
    public func dataExtents() -> [Range<UInt64>] {
        var out: [Range<UInt64>] = []
        var at: off_t = 0
        let end = off_t(size)
        while at < end {
            let data = lseek(fd.rawValue, at, 3 /* SEEK_DATA */)
            if data < 0 { break }  // ENXIO: no data past `at`
            var hole = lseek(fd.rawValue, data, 4 /* SEEK_HOLE */)
            if hole < 0 { hole = end }
            out.append(UInt64(data)..<UInt64(min(hole, end)))
            at = hole
        }
        return out
    }

    /// Start loading the first cache line of the page at `p`. The zero-page test of a page with
    /// data reads one line and stops, so testing RAM page by page waits a memory latency per
    /// page (the hardware prefetcher does not cross pages): asking for pages ahead overlaps them.
    @inline(__always) public static func prefetchPage(_ p: UnsafeRawPointer) { vl_prefetch(p) }

    /// Whether the 4 KiB page at `p` holds only zero bytes (most data pages differ within
    /// their first bytes, so a data page costs one cache line).
    public static func isZeroPage(_ p: UnsafeRawPointer) -> Bool {
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

    @inline(__always) public func load64(_ gpa: UInt64) -> UInt64 { base.load(fromByteOffset: Int(gpa), as: UInt64.self) }
    @inline(__always) public func store64(_ gpa: UInt64, _ v: UInt64) { base.storeBytes(of: v, toByteOffset: Int(gpa), as: UInt64.self) }

    /// Identity map RAM and the MMIO window with 2 MiB pages, user-accessible (the workload runs
    /// at CPL3).
    public func buildPageTables() {
        let present: UInt64 = 1, writable: UInt64 = 2, user: UInt64 = 4, large: UInt64 = 0x80
        let table = present | writable | user
        store64(GuestLayout.pml4, GuestLayout.pdpt | table)
        let gib = (size + (1 << 30) - 1) >> 30
        for g in 0..<gib {
            let pd = GuestLayout.pdBase + g * 0x1000
            store64(GuestLayout.pdpt + g * 8, pd | table)
            for e in 0..<UInt64(512) {
                let addr = (g << 30) + (e << 21)
                guard addr < size else { break }
                store64(pd + e * 8, addr | table | large)
            }
        }
        let mmioIndex = GuestLayout.mmioBase >> 30
        store64(GuestLayout.pdpt + mmioIndex * 8, GuestLayout.mmioPD | table)
        for e in 0..<(GuestLayout.mmioSize >> 21) {
            store64(GuestLayout.mmioPD + e * 8, (GuestLayout.mmioBase + (e << 21)) | table | large)
        }
    }

    /// Copy the workload (assembled into this binary) to its guest address.
    public func loadWorkload() -> Int {
        let start = vl_guest_workload_start_ptr()!
        let end = vl_guest_workload_end_ptr()!
        let n = end - start
        memcpy(base + Int(GuestLayout.code), start, n)
        return n
    }
}
