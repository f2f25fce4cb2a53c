import SystemCalls

// The one device interface a VMM drives, whatever carries it (a vfio-user socket, a kernel
// VFIO device fd with its container or iommufd). The layouts are the kernel's (linux/vfio.h),
// which vfio-user reuses: the same region and IRQ indexes, flags and capability chains.

/// VFIO_DEVICE_GET_INFO.
public struct VFIODeviceInfo: Equatable, Sendable {
    public static let flagReset: UInt32 = 1 << 0
    public static let flagPCI: UInt32 = 1 << 1
    public var flags: UInt32
    public var regionCount: UInt32
    public var irqCount: UInt32
    public init(flags: UInt32, regionCount: UInt32, irqCount: UInt32) {
        self.flags = flags; self.regionCount = regionCount; self.irqCount = irqCount
    }
    public var isPCI: Bool { flags & Self.flagPCI != 0 }
    public var canReset: Bool { flags & Self.flagReset != 0 }
}

/// VFIO_DEVICE_GET_REGION_INFO with its capability chain decoded (sparse mmap areas, type).
public struct VFIORegionInfo: Equatable, Sendable {
    public struct Area: Equatable, Sendable {
        public var offset: UInt64, size: UInt64
        public init(offset: UInt64, size: UInt64) { self.offset = offset; self.size = size }
    }
    public var index: UInt32
    public var readable: Bool, writable: Bool, mappable: Bool
    public var size: UInt64
    /// Offset of the region in the device fd (kernel) or the region's mmap fd (vfio-user).
    public var offset: UInt64
    /// The sparse mmap capability: only these parts may be mmap'd; nil means all of it.
    public var sparseAreas: [Area]?
    public var type: (type: UInt32, subtype: UInt32)?

    public init(index: UInt32, readable: Bool, writable: Bool, mappable: Bool, size: UInt64, offset: UInt64 = 0,
                sparseAreas: [Area]? = nil, type: (UInt32, UInt32)? = nil) {
        self.index = index; self.readable = readable; self.writable = writable; self.mappable = mappable
        self.size = size; self.offset = offset; self.sparseAreas = sparseAreas; self.type = type
    }

    public static func == (a: Self, b: Self) -> Bool {
        a.index == b.index && a.readable == b.readable && a.writable == b.writable && a.mappable == b.mappable &&
            a.size == b.size && a.offset == b.offset && a.sparseAreas == b.sparseAreas &&
            a.type?.type == b.type?.type && a.type?.subtype == b.type?.subtype
    }

    /// The parts a VMM may mmap: the sparse areas, or the whole region when it has none.
    public var mappableAreas: [Area] {
        guard mappable else { return [] }
        return (sparseAreas ?? [Area(offset: 0, size: size)]).filter { $0.size > 0 && $0.offset <= size && $0.size <= size - $0.offset }
    }

    /// Decode the kernel-layout capability chain `caps` (the whole info buffer, offsets from its
    /// start): sparse mmap (id 1) and type (id 2); others are skipped. Bounded against loops.
    public static func decodeCapabilities(_ caps: [UInt8], first: UInt32) throws -> (areas: [Area]?, type: (UInt32, UInt32)?) {
        var areas: [Area]?
        var type: (UInt32, UInt32)?
        var off = Int(first)
        var hops = 0
        func u32(_ o: Int) -> UInt32 { (0..<4).reduce(UInt32(0)) { $0 | UInt32(caps[o + $1]) << (8 * UInt32($1)) } }
        func u64(_ o: Int) -> UInt64 { UInt64(u32(o)) | UInt64(u32(o + 4)) << 32 }
        while off != 0 {
            hops += 1
            guard hops <= 16 else { throw VFIODeviceError.malformed("region capability chain is too long or loops") }
            guard off >= 32, off <= caps.count - 8 else { throw VFIODeviceError.malformed("region capability at \(off) lies outside the \(caps.count)-byte info") }
            let id = UInt16(caps[off]) | UInt16(caps[off + 1]) << 8
            let next = Int(u32(off + 4))
            switch id {
            case 1:
                guard off + 16 <= caps.count else { throw VFIODeviceError.malformed("sparse mmap capability is truncated") }
                let n = Int(u32(off + 8))
                guard n <= 1024, n <= (caps.count - off - 16) / 16 else { throw VFIODeviceError.malformed("sparse mmap capability claims \(n) areas") }
                areas = (0..<n).map { Area(offset: u64(off + 16 + 16 * $0), size: u64(off + 24 + 16 * $0)) }
            case 2:
                guard off + 16 <= caps.count else { throw VFIODeviceError.malformed("type capability is truncated") }
                type = (u32(off + 8), u32(off + 12))
            default: break
            }
            guard next == 0 || next > off else { throw VFIODeviceError.malformed("region capability chain goes backwards") }
            off = next
        }
        return (areas, type)
    }
}

/// VFIO_DEVICE_GET_IRQ_INFO.
public struct VFIOIRQInfo: Equatable, Sendable {
    public var index: UInt32
    public var count: UInt32
    public var eventfd: Bool, maskable: Bool, automasked: Bool, noresize: Bool
    public init(index: UInt32, count: UInt32, eventfd: Bool = true, maskable: Bool = false, automasked: Bool = false, noresize: Bool = false) {
        self.index = index; self.count = count; self.eventfd = eventfd; self.maskable = maskable
        self.automasked = automasked; self.noresize = noresize
    }
}

/// The fixed region and IRQ indexes of a vfio-pci device (VFIO_PCI_*_INDEX).
public enum VFIOPCIIndex {
    public static let bar0: UInt32 = 0
    public static let rom: UInt32 = 6
    public static let config: UInt32 = 7
    public static let vga: UInt32 = 8
    public static let intx: UInt32 = 0
    public static let msi: UInt32 = 1
    public static let msix: UInt32 = 2
    public static let err: UInt32 = 3
    public static let req: UInt32 = 4
}

/// A region's mmap'd areas; the owners keep the mappings alive.
public final class VFIORegionMapping: @unchecked Sendable {
    public struct Area: @unchecked Sendable {
        public var offset: UInt64, size: UInt64, base: UnsafeMutableRawPointer, writable: Bool
        public init(offset: UInt64, size: UInt64, base: UnsafeMutableRawPointer, writable: Bool) {
            self.offset = offset; self.size = size; self.base = base; self.writable = writable
        }
    }
    public let index: UInt32
    public let areas: [Area]
    private let owners: [AnyObject]
    public init(index: UInt32, areas: [Area], owners: [AnyObject]) { self.index = index; self.areas = areas; self.owners = owners }

    /// A pointer to [offset, offset+count) when it lies inside one area.
    public func pointer(offset: UInt64, count: Int, write: Bool) -> UnsafeMutableRawPointer? {
        for a in areas where offset >= a.offset && offset - a.offset <= a.size && UInt64(count) <= a.size - (offset - a.offset) {
            if write && !a.writable { return nil }
            return a.base + Int(offset - a.offset)
        }
        return nil
    }
}

/// Guest memory given to a device for DMA: IOVA → this process's mapping, and the fd behind it
/// when there is one (vfio-user passes it to the server; iommufd maps it by file).
public struct VFIODMARegion: @unchecked Sendable {
    public var iova: UInt64, size: UInt64
    public var host: UnsafeMutableRawPointer
    public var fd: FileDescriptor?
    public var fdOffset: UInt64
    public var writable: Bool
    public init(iova: UInt64, size: UInt64, host: UnsafeMutableRawPointer, fd: FileDescriptor?, fdOffset: UInt64 = 0, writable: Bool = true) {
        self.iova = iova; self.size = size; self.host = host; self.fd = fd; self.fdOffset = fdOffset; self.writable = writable
    }
}

/// Dirty tracking done by the IOMMU rather than the device (a type1 container's
/// VFIO_IOMMU_DIRTY_PAGES, an iommufd HWPT with a dirty bit). Shared by every device behind it.
public protocol VFIOIOMMUDirtyTracker: AnyObject {
    func startDirtyTracking() throws
    func stopDirtyTracking() throws
    /// Pages of [iova, iova+size) written since the start or the last harvest (read-and-clear).
    func dirtyBitmap(iova: UInt64, size: UInt64, pageSize: UInt64) throws -> [UInt64]
}

public enum VFIODeviceError: Error, CustomStringConvertible, Equatable {
    case malformed(String)
    case unsupported(String)
    public var description: String {
        switch self {
        case let .malformed(s): return "device reported malformed information: \(s)"
        case let .unsupported(s): return s
        }
    }
}

/// What a VMM needs from a VFIO device, whatever the transport: device, region and IRQ info;
/// region access and mmap; interrupt eventfds; reset; DMA into the device's address space;
/// migration (`MigrationDeviceHandle`); and the device's own DMA dirty logging, or the IOMMU's.
public protocol VFIODevice: MigrationDeviceHandle {
    /// "vfio-user" or "kernel VFIO" (errors and reports say which).
    var transportName: String { get }
    /// How the user named it: a socket path, a PCI address, an mdev path.
    var deviceName: String { get }

    func describeDevice() throws -> VFIODeviceInfo
    func describeRegion(_ index: UInt32) throws -> VFIORegionInfo
    func describeIRQ(_ index: UInt32) throws -> VFIOIRQInfo

    func regionRead(_ index: UInt32, offset: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws
    func regionWrite(_ index: UInt32, offset: UInt64, from data: UnsafeRawBufferPointer) throws
    /// mmap the region's mappable areas (sparse areas or all of it); nil when it has none.
    func mapRegionAreas(_ index: UInt32) throws -> VFIORegionMapping?

    /// Trigger eventfds for vectors [start, start+count) of IRQ `index`.
    func setIRQs(index: UInt32, start: UInt32, eventfds: [EventFD]) throws
    func disableIRQs(index: UInt32) throws
    /// ACTION_UNMASK of one vector (INTx of an automasked device after each interrupt).
    func unmaskIRQ(index: UInt32, vector: UInt32) throws

    /// Let the device DMA to `region` at its IOVA.
    func addDMAMapping(_ region: VFIODMARegion) throws
    func removeDMAMapping(iova: UInt64, size: UInt64) throws

    /// Whether the device logs its own DMA writes (DMA_LOGGING_* features).
    var supportsDMALogging: Bool { get }
    func startDMALogging(pageSize: UInt64, ranges: [(iova: UInt64, length: UInt64)]) throws
    func stopDMALogging() throws
    func dmaLoggingReport(iova: UInt64, length: UInt64, pageSize: UInt64) throws -> [UInt64]
    /// The IOMMU's dirty tracking behind this device, when it has one (vfio-user: none).
    var iommuDirtyTracker: VFIOIOMMUDirtyTracker? { get }

    /// A descriptor whose hang-up means the device is gone (a vfio-user server's socket); nil
    /// when there is none to watch (a kernel device lives as long as its fd).
    var lossWatchFD: Int32? { get }
    /// Handed to a successor VMM by a live update: this process must not touch it any more.
    var isHandedOver: Bool { get }
    /// The longest one call on the device waits for its other end before it gives up (a
    /// vfio-user server's reply); 0 where calls have no timeout of their own (kernel ioctls).
    var callTimeoutMilliseconds: UInt64 { get }
}

extension VFIODevice {
    public var lossWatchFD: Int32? { nil }
    public var isHandedOver: Bool { false }
    public var callTimeoutMilliseconds: UInt64 { 0 }
}

extension VFIODevice {
    /// One little-endian register of any width.
    public func regionLoad<T: FixedWidthInteger>(_ index: UInt32, _ offset: UInt64, as _: T.Type = T.self) throws -> T {
        var v = T.zero
        try withUnsafeMutableBytes(of: &v) { try regionRead(index, offset: offset, into: $0) }
        return T(littleEndian: v)
    }
    public func regionStore<T: FixedWidthInteger>(_ index: UInt32, _ offset: UInt64, _ value: T) throws {
        var v = value.littleEndian
        try withUnsafeBytes(of: &v) { try regionWrite(index, offset: offset, from: $0) }
    }
}
