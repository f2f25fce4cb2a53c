import SystemCalls
import VFIO

/// A device's attach result as a live update carries it (QEMU's "vfio-cpr-pci" state plays
/// this part): the new VMM takes the BAR placement, the interrupt kind and the identity from
/// it instead of probing the device again, which would read config space and write the
/// interrupt capability and the command register of a device that is running.
///
///     version u8 | vendor u16 | device u16 | config size u64 | irq count u32
///     capabilities u8 × {id u8, offset u8}
///     bars u8 × {index u32, size u64, flags u8 (io, 64-bit, prefetchable, writable, placed),
///                guest address u64, areas u16 × {offset u64, size u64}}
///     interrupt {kind u8 (0 none, 1 INTx, 2 MSI, 3 MSI-X), capability or automasked u8}
///     dma mapped u8 | edu buffer u64 (0: none) | edu status register u64 (~0: none)
///
/// Little-endian; every count is bounded before anything is allocated.
extension PCIAttachment {
    public static let recordVersion: UInt8 = 1

    public func encodeRecord() -> [UInt8] {
        var b: [UInt8] = []
        func u8(_ v: UInt8) { b.append(v) }
        func u16(_ v: UInt16) { withUnsafeBytes(of: v.littleEndian) { b += $0 } }
        func u32(_ v: UInt32) { withUnsafeBytes(of: v.littleEndian) { b += $0 } }
        func u64(_ v: UInt64) { withUnsafeBytes(of: v.littleEndian) { b += $0 } }
        u8(Self.recordVersion); u16(vendorID); u16(deviceID); u64(configSize); u32(irqCount)
        u8(UInt8(min(capabilities.count, 48)))
        for c in capabilities.prefix(48) { u8(c.id); u8(c.offset) }
        u8(UInt8(min(bars.count, 6)))
        for bar in bars.prefix(6) {
            u32(bar.index); u64(bar.size)
            u8((bar.isIO ? 1 : 0) | (bar.is64Bit ? 2 : 0) | (bar.prefetchable ? 4 : 0) | (bar.writable ? 8 : 0) | (bar.guestAddress != nil ? 16 : 0))
            u64(bar.guestAddress ?? 0)
            u16(UInt16(min(bar.mappableAreas.count, 64)))
            for a in bar.mappableAreas.prefix(64) { u64(a.offset); u64(a.size) }
        }
        switch interrupt {
        case .none: u8(0); u8(0)
        case let .intx(automasked): u8(1); u8(automasked ? 1 : 0)
        case let .msi(cap): u8(2); u8(cap)
        case let .msix(cap): u8(3); u8(cap)
        }
        u8(dmaMapped ? 1 : 0); u64(eduBufferSize ?? 0); u64(eduStatusRegister ?? ~0)
        return b
    }

    public init(decodingRecord b: [UInt8]) throws {
        var at = 0
        func bad(_ why: String) -> VFIODeviceError { .malformed("PCI attach record: \(why)") }
        func take(_ n: Int) throws -> ArraySlice<UInt8> {
            guard n <= b.count - at else { throw bad("truncated") }
            defer { at += n }
            return b[at..<(at + n)]
        }
        func uint<T: FixedWidthInteger>(_: T.Type) throws -> T {
            try take(MemoryLayout<T>.size).reversed().reduce(T.zero) { $0 << 8 | T($1) }
        }
        guard try uint(UInt8.self) == Self.recordVersion else { throw bad("unknown version") }
        let vendor = try uint(UInt16.self), device = try uint(UInt16.self), cfg = try uint(UInt64.self), irqs = try uint(UInt32.self)
        let nc = Int(try uint(UInt8.self))
        guard nc <= 48 else { throw bad("\(nc) capabilities") }
        var caps: [PCICapability] = []
        for _ in 0..<nc { caps.append(PCICapability(id: try uint(UInt8.self), offset: try uint(UInt8.self))) }
        let nb = Int(try uint(UInt8.self))
        guard nb <= 6 else { throw bad("\(nb) BARs") }
        var bars: [PCIBAR] = []
        for _ in 0..<nb {
            let index = try uint(UInt32.self), size = try uint(UInt64.self), flags = try uint(UInt8.self), gpa = try uint(UInt64.self)
            guard index < 6, size > 0 else { throw bad("BAR \(index) of \(size) bytes") }
            if flags & 16 != 0 {
                guard gpa &+ size > gpa, gpa >= GuestLayout.mmioBase, gpa + size <= GuestLayout.mmioBase + GuestLayout.mmioSize else {
                    throw bad("BAR\(index) at \(hex(gpa)) (+\(hex(size))) lies outside the MMIO window")
                }
            }
            let na = Int(try uint(UInt16.self))
            guard na <= 64 else { throw bad("BAR\(index) has \(na) mappable areas") }
            var areas: [VFIORegionInfo.Area] = []
            for _ in 0..<na {
                let off = try uint(UInt64.self), sz = try uint(UInt64.self)
                guard sz > 0, off <= size, sz <= size - off else { throw bad("BAR\(index) area [\(hex(off)), +\(hex(sz))) is outside it") }
                areas.append(.init(offset: off, size: sz))
            }
            bars.append(PCIBAR(index: index, size: size, isIO: flags & 1 != 0, is64Bit: flags & 2 != 0, prefetchable: flags & 4 != 0,
                               writable: flags & 8 != 0, mappableAreas: areas, guestAddress: flags & 16 != 0 ? gpa : nil))
        }
        let kind = try uint(UInt8.self), arg = try uint(UInt8.self)
        let interrupt: PCIInterrupt
        switch kind {
        case 0: interrupt = .none("none wired by the predecessor")
        case 1: interrupt = .intx(automasked: arg != 0)
        case 2: interrupt = .msi(capability: arg)
        case 3: interrupt = .msix(capability: arg)
        default: throw bad("interrupt kind \(kind)")
        }
        let dma = try uint(UInt8.self) != 0, edu = try uint(UInt64.self), status = try uint(UInt64.self)
        guard at == b.count else { throw bad("\(b.count - at) trailing bytes") }
        self.init(vendorID: vendor, deviceID: device, configSize: cfg, irqCount: irqs, capabilities: caps, bars: bars)
        self.interrupt = interrupt
        dmaMapped = dma
        eduBufferSize = edu == 0 ? nil : edu
        eduStatusRegister = status == ~0 ? nil : status
    }

    /// The same attachment with every BAR trapped (a transport whose mmap would have to ask
    /// the device for its fds, as vfio-user's does).
    public var allBARsTrapped: PCIAttachment {
        var a = self
        for i in a.bars.indices { a.bars[i].mappableAreas = [] }
        return a
    }
}
