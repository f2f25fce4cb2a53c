import Glibc
import SystemCalls
import VFIO

// PCI attach as QEMU's vfio-pci does it, with nothing assumed about the device: config space
// is read from the config region and its capability list walked, BARs are sized from region
// info, interrupts are chosen from what GET_IRQ_INFO and the capabilities offer (MSI-X, else
// MSI, else INTx, else none), and guest RAM is mapped for DMA. A device the VMM cannot give an
// interrupt, or that refuses DMA, still attaches unless the guest needs that from it.

public enum PCICapabilityID {
    public static let msi: UInt8 = 0x05
    public static let pcie: UInt8 = 0x10
    public static let msix: UInt8 = 0x11
}

public struct PCICapability: Equatable, Sendable, CustomStringConvertible {
    public var id: UInt8
    public var offset: UInt8
    public var description: String {
        let name = [PCICapabilityID.msi: "MSI", PCICapabilityID.msix: "MSI-X", PCICapabilityID.pcie: "PCIe"][id] ?? "cap \(hex(UInt64(id)))"
        return "\(name)@\(hex(UInt64(offset)))"
    }
}

/// One BAR: its size from region info, its kind from config space, where the VMM put it.
public struct PCIBAR: Sendable, CustomStringConvertible {
    public var index: UInt32
    public var size: UInt64
    public var isIO: Bool, is64Bit: Bool, prefetchable: Bool
    /// Region info's WRITE flag: a store to a read-only BAR is refused, never attempted.
    public var writable: Bool
    /// The parts the device lets the VMM mmap (sparse areas or all of it).
    public var mappableAreas: [VFIORegionInfo.Area]
    /// Guest-physical address, nil when not placed (an I/O BAR, or no room in the MMIO window).
    public var guestAddress: UInt64?
    public var description: String {
        "BAR\(index) \(formatSize(size))\(isIO ? " I/O" : "")\(is64Bit ? " 64-bit" : "")\(mappableAreas.isEmpty ? " trapped" : " mmap")" +
            (guestAddress.map { " at \(hex($0))" } ?? " (not placed)")
    }
}

public enum PCIInterrupt: Equatable, Sendable, CustomStringConvertible {
    case msix(capability: UInt8)
    case msi(capability: UInt8)
    case intx(automasked: Bool)
    /// No interrupt the VMM could wire; why.
    case none(String)

    public var irqIndex: UInt32? {
        switch self {
        case .msix: return VFIOPCIIndex.msix
        case .msi: return VFIOPCIIndex.msi
        case .intx: return VFIOPCIIndex.intx
        case .none: return nil
        }
    }
    public var description: String {
        switch self {
        case .msix: return "MSI-X"
        case .msi: return "MSI"
        case .intx: return "INTx"
        case let .none(why): return "none (\(why))"
        }
    }
}

/// What attaching found and set up, for routing, reports and the guest's DMA rounds.
public struct PCIAttachment: Sendable, CustomStringConvertible {
    public var vendorID: UInt16
    public var deviceID: UInt16
    public var configSize: UInt64
    /// IRQ indexes the device reports (DEVICE_GET_INFO num_irqs).
    public var irqCount: UInt32
    public var capabilities: [PCICapability]
    public var bars: [PCIBAR]
    public var interrupt: PCIInterrupt = .none("not wired")
    /// Guest RAM is mapped for the device's DMA (IOVA = GPA); else why not.
    public var dmaMapped = false
    public var dmaRefusal: String?
    /// For an edu-compatible device (vendor 1234 device 11e8): bytes its DMA buffer holds.
    public var eduBufferSize: UInt64?
    /// Its job-status register in BAR0, when it has one (the dma-engine's 0x108; edu: none).
    public var eduStatusRegister: UInt64?
    /// The longest DMA job the guest may ask of it: QEMU's edu treats a transfer that reaches
    /// the last byte of its buffer as a hardware error (Edu.dma), so plain edu stays below it.
    public var eduTransferLimit: UInt64? {
        guard let b = eduBufferSize else { return nil }
        return eduStatusRegister == nil ? b - 8 : b
    }

    public var isEduCompatible: Bool { vendorID == 0x1234 && deviceID == 0x11e8 }
    public func capability(_ id: UInt8) -> PCICapability? { capabilities.first { $0.id == id } }
    public func bar(_ index: UInt32) -> PCIBAR? { bars.first { $0.index == index } }

    public var description: String {
        "PCI \(String(vendorID, radix: 16)):\(String(deviceID, radix: 16)), capabilities [\(capabilities.map(\.description).joined(separator: ", "))], " +
            "\(bars.map(\.description).joined(separator: ", ")), interrupt \(interrupt), DMA " +
            (dmaMapped ? "mapped" : "not mapped (\(dmaRefusal ?? "not needed"))") + (eduBufferSize.map { ", edu DMA buffer \(formatSize($0))" } ?? "")
    }
}

public enum PCIAttachError: Error, CustomStringConvertible {
    case notPCI(String)
    case malformedConfig(String)
    case dmaRefused(String)

    public var description: String {
        switch self {
        case let .notPCI(s): return "not a PCI device: \(s)"
        case let .malformedConfig(s): return "malformed PCI config space: \(s)"
        case let .dmaRefused(s): return "the device refused DMA_MAP of guest RAM, and the guest workload needs its DMA: \(s)"
        }
    }
}

func formatSize(_ v: UInt64) -> String {
    if v >= 1 << 30 && v % (1 << 30) == 0 { return "\(v >> 30) GiB" }
    if v >= 1 << 20 && v % (1 << 20) == 0 { return "\(v >> 20) MiB" }
    if v >= 1 << 10 && v % (1 << 10) == 0 { return "\(v >> 10) KiB" }
    return "\(v) B"
}

/// Places BARs in the guest's MMIO window: BAR0 of device k at its fixed 1 MiB slot (where the
/// guest workload looks for it), everything else above the doorbell, naturally aligned.
struct MMIOAllocator {
    static let start = GuestLayout.doorbell + (1 << 20)
    static let end = GuestLayout.mmioBase + GuestLayout.mmioSize
    private var next = MMIOAllocator.start

    mutating func place(slot: Int, bar: UInt32, size: UInt64) -> UInt64? {
        guard size > 0 else { return nil }
        if bar == 0, size <= 1 << 20, slot < 256 { return GuestLayout.deviceBAR0(slot) }
        var align: UInt64 = 4096
        while align < size { guard align < 1 << 40 else { return nil }; align <<= 1 }
        let at = (next + align - 1) & ~(align - 1)
        guard at >= next, at <= Self.end, align <= Self.end - at else { return nil }
        next = at + align
        return at
    }
}

enum PCIAttach {
    /// Read config space and region info: identity, capabilities, BARs. Nothing is written.
    static func discover(_ d: any VFIODevice, slot: Int, allocator: inout MMIOAllocator) throws -> PCIAttachment {
        let info = try d.describeDevice()
        guard info.regionCount > VFIOPCIIndex.config else {
            throw PCIAttachError.notPCI("\(d.deviceName) reports \(info.regionCount) regions, so no config space region (index 7)")
        }
        let cfgInfo = try d.describeRegion(VFIOPCIIndex.config)
        guard cfgInfo.size >= 64, cfgInfo.readable else {
            throw PCIAttachError.notPCI("\(d.deviceName): config region is \(cfgInfo.size) bytes\(cfgInfo.readable ? "" : ", not readable")")
        }
        let n = Int(min(cfgInfo.size, 256))
        var cfg = [UInt8](repeating: 0, count: n)
        try cfg.withUnsafeMutableBytes { try d.regionRead(VFIOPCIIndex.config, offset: 0, into: $0) }
        func u16(_ o: Int) -> UInt16 { UInt16(cfg[o]) | UInt16(cfg[o + 1]) << 8 }
        func u32(_ o: Int) -> UInt32 { UInt32(u16(o)) | UInt32(u16(o + 2)) << 16 }
        let vendor = u16(0)
        guard vendor != 0xffff, vendor != 0 else { throw PCIAttachError.malformedConfig("vendor ID \(hex(UInt64(vendor)))") }

        // The capability list (status bit 4): bounded, aligned, inside the standard header's end.
        var caps: [PCICapability] = []
        if u16(6) & 0x10 != 0 {
            var at = Int(cfg[0x34]) & ~3
            var seen = Set<Int>()
            while at != 0 {
                guard at >= 0x40, at + 2 <= n else { throw PCIAttachError.malformedConfig("capability pointer \(hex(UInt64(at))) is outside config space") }
                guard seen.insert(at).inserted, seen.count <= 48 else { throw PCIAttachError.malformedConfig("the capability list loops") }
                caps.append(PCICapability(id: cfg[at], offset: UInt8(at)))
                at = Int(cfg[at + 1]) & ~3
            }
        }

        // BARs: size from region info, kind from the BAR register. A 64-bit BAR takes two slots.
        var bars: [PCIBAR] = []
        var i: UInt32 = 0
        while i < 6 && i < info.regionCount {
            let raw = u32(0x10 + 4 * Int(i))
            let isIO = raw & 1 != 0
            let is64 = !isIO && (raw >> 1) & 3 == 2
            defer { i += is64 ? 2 : 1 }
            guard let r = try? d.describeRegion(i), r.size > 0 else { continue }
            var bar = PCIBAR(index: i, size: r.size, isIO: isIO, is64Bit: is64, prefetchable: !isIO && raw & 8 != 0,
                             writable: r.writable, mappableAreas: r.mappableAreas, guestAddress: nil)
            if !isIO { bar.guestAddress = allocator.place(slot: slot, bar: i, size: r.size) }
            bars.append(bar)
        }
        return PCIAttachment(vendorID: vendor, deviceID: u16(2), configSize: cfgInfo.size, irqCount: info.irqCount, capabilities: caps, bars: bars)
    }

    /// For an edu-compatible device: its DMA buffer, and its job-status register if any. edu's
    /// buffer is 4 KiB and it has no status register; the dma-engine reports its data window
    /// at BAR0+0x118 and job status at 0x108 (edu reads all ones at both).
    static func eduDMA(_ d: any VFIODevice, _ a: PCIAttachment) -> (buffer: UInt64, status: UInt64?)? {
        guard a.isEduCompatible, let bar0 = a.bar(0), !bar0.isIO, bar0.size >= 0x120 else { return nil }
        if let w: UInt64 = try? d.regionLoad(0, 0x118), w >= 4096, w <= 1 << 32 { return (w, 0x108) }
        return (4096, nil)
    }

    /// Wire one interrupt vector to `eventfd`: MSI-X, else MSI, else INTx, each only when the
    /// device has both the IRQ index (GET_IRQ_INFO count > 0) and, for MSI/MSI-X, the
    /// capability the guest would enable. A refused choice falls through to the next.
    static func wireInterrupt(_ d: any VFIODevice, _ a: PCIAttachment, irqCount: UInt32, eventfd: EventFD) -> PCIInterrupt {
        func irq(_ index: UInt32) -> VFIOIRQInfo? {
            guard index < irqCount, let i = try? d.describeIRQ(index), i.count > 0, i.eventfd else { return nil }
            return i
        }
        var refused: [String] = []
        /// Wire `eventfd` to `index` and enable it in the capability's message control word
        /// (`keep` masks the bits left as they are, `set` those turned on).
        func wireMessage(_ name: String, _ index: UInt32, _ cap: PCICapability, keep: UInt16, set: UInt16) -> Bool {
            do {
                try d.setIRQs(index: index, start: 0, eventfds: [eventfd])
                let mc: UInt16 = try d.regionLoad(VFIOPCIIndex.config, UInt64(cap.offset) + 2)
                try d.regionStore(VFIOPCIIndex.config, UInt64(cap.offset) + 2, (mc & keep) | set)
                return true
            } catch {
                refused.append("\(name): \(error)")
                try? d.disableIRQs(index: index)
                return false
            }
        }
        // MSI-X message control: enable (bit 15), function mask (bit 14) off.
        if let cap = a.capability(PCICapabilityID.msix), irq(VFIOPCIIndex.msix) != nil,
           wireMessage("MSI-X", VFIOPCIIndex.msix, cap, keep: ~0x4000, set: 0x8000) { return .msix(capability: cap.offset) }
        // MSI message control: enable (bit 0), one vector (multiple message enable 0).
        if let cap = a.capability(PCICapabilityID.msi), irq(VFIOPCIIndex.msi) != nil,
           wireMessage("MSI", VFIOPCIIndex.msi, cap, keep: ~0x70, set: 1) { return .msi(capability: cap.offset) }
        if let i = irq(VFIOPCIIndex.intx) {
            do {
                let pin: UInt8 = try d.regionLoad(VFIOPCIIndex.config, 0x3d)
                guard pin != 0 else { throw VFIODeviceError.unsupported("interrupt pin is 0") }
                try d.setIRQs(index: VFIOPCIIndex.intx, start: 0, eventfds: [eventfd])
                let cmd: UInt16 = try d.regionLoad(VFIOPCIIndex.config, 4)
                if cmd & 0x400 != 0 { try d.regionStore(VFIOPCIIndex.config, 4, cmd & ~0x400) }
                return .intx(automasked: i.automasked)
            } catch {
                refused.append("INTx: \(error)")
                try? d.disableIRQs(index: VFIOPCIIndex.intx)
            }
        }
        return .none(refused.isEmpty ? "the device offers no MSI-X, MSI or INTx the VMM can wire" : refused.joined(separator: "; "))
    }

    /// Memory decoding and bus mastering on, as the guest's firmware and driver would.
    static func enableDecoding(_ d: any VFIODevice, _ a: PCIAttachment) throws {
        let cmd: UInt16 = try d.regionLoad(VFIOPCIIndex.config, 4)
        let want = cmd | 0x6 | (a.bars.contains { $0.isIO } ? 0x1 : 0)
        if want != cmd { try d.regionStore(VFIOPCIIndex.config, 4, want) }
    }
}
