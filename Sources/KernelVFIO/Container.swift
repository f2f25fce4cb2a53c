import CVFIOLive
import Glibc
import SystemCalls
import VFIO

/// Errors of the kernel VFIO backend, each naming the object and what the kernel said.
public enum KernelVFIOError: Error, CustomStringConvertible {
    case unavailable(String)
    case ioctl(String, Errno)
    case invalid(String)

    public var description: String {
        switch self {
        case let .unavailable(why): return why
        case let .ioctl(what, e): return "\(what): \(e)"
        case let .invalid(why): return why
        }
    }
}

func unmapRequest(argsz: Int = MemoryLayout<vfio_iommu_type1_dma_unmap>.size, flags: UInt32, iova: UInt64, size: UInt64) -> vfio_iommu_type1_dma_unmap {
    var u = vfio_iommu_type1_dma_unmap()
    u.argsz = UInt32(argsz); u.flags = flags; u.iova = iova; u.size = size
    return u
}

func dirtyRequest(argsz: Int = MemoryLayout<vfio_iommu_type1_dirty_bitmap>.size, flags: UInt32) -> vfio_iommu_type1_dirty_bitmap {
    var d = vfio_iommu_type1_dirty_bitmap()
    d.argsz = UInt32(argsz); d.flags = flags
    return d
}

func check(_ what: @autoclosure () -> String, _ body: () throws -> Int32) throws -> Int32 {
    do { return try body() } catch let e as Errno { throw KernelVFIOError.ioctl(what(), e) }
}

/// A legacy VFIO container (/dev/vfio/vfio) with the type1 IOMMU: DMA mappings by virtual
/// address, dirty page tracking, and the VADDR update that live update needs.
public final class Container: @unchecked Sendable {
    public let fd: FileDescriptor
    /// The mappings made through this container (for VADDR restore and CPR records).
    public private(set) var mappings: [Mapping] = []
    public struct Mapping: Equatable, Sendable {
        public var iova: UInt64, size: UInt64, vaddr: UInt64, writable: Bool
        public init(iova: UInt64, size: UInt64, vaddr: UInt64, writable: Bool) { self.iova = iova; self.size = size; self.vaddr = vaddr; self.writable = writable }
    }

    public init() throws {
        let raw = open("/dev/vfio/vfio", O_RDWR | O_CLOEXEC)
        guard raw >= 0 else { throw KernelVFIOError.unavailable("cannot open /dev/vfio/vfio: \(Errno.current) (no VFIO in this kernel?)") }
        fd = FileDescriptor(adopting: raw)
        let v = try check("VFIO_GET_API_VERSION") { try fd.ioctl(VL_VFIO_GET_API_VERSION, value: 0) }
        guard v == VFIO_API_VERSION else { throw KernelVFIOError.unavailable("VFIO API version \(v), expected \(VFIO_API_VERSION)") }
    }

    /// Adopt a container a predecessor configured (live update): no SET_IOMMU.
    public init(adopting fd: FileDescriptor, mappings: [Mapping]) {
        self.fd = fd
        self.mappings = mappings
    }

    public func checkExtension(_ ext: Int32) -> Bool {
        ((try? fd.ioctl(VL_VFIO_CHECK_EXTENSION, value: UInt(ext))) ?? 0) > 0
    }

    /// Type1v2. Only after this do UPDATE_VADDR and UNMAP_ALL report their support.
    public func setIOMMU(_ type: Int32 = VFIO_TYPE1v2_IOMMU) throws {
        guard checkExtension(type) else { throw KernelVFIOError.unavailable("the container does not support IOMMU type \(type)") }
        _ = try check("VFIO_SET_IOMMU(\(type))") { try fd.ioctl(VL_VFIO_SET_IOMMU, value: UInt(type)) }
    }

    /// Whether the type1 info reports the dirty-page migration capability.
    public func supportsDirtyPageTracking() -> Bool {
        var buf = [UInt8](repeating: 0, count: 512)
        return buf.withUnsafeMutableBytes { b -> Bool in
            b.storeBytes(of: UInt32(b.count), toByteOffset: 0, as: UInt32.self)
            guard (try? fd.ioctl(VL_VFIO_IOMMU_GET_INFO, b.baseAddress)) != nil else { return false }
            let flags = b.load(fromByteOffset: 4, as: UInt32.self)
            guard flags & VFIO_IOMMU_INFO_CAPS != 0 else { return false }
            var off = Int(b.load(fromByteOffset: 16, as: UInt32.self))  // argsz, flags, iova_pgsizes, cap_offset
            while off > 0 && off + 8 <= b.count {
                let id = b.load(fromByteOffset: off, as: UInt16.self)
                if id == UInt16(VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION) { return true }
                off = Int(b.load(fromByteOffset: off + 4, as: UInt32.self))
            }
            return false
        }
    }

    public func mapDMA(iova: UInt64, size: UInt64, vaddr: UnsafeMutableRawPointer, writable: Bool = true) throws {
        var m = vfio_iommu_type1_dma_map(argsz: UInt32(MemoryLayout<vfio_iommu_type1_dma_map>.size),
                                         flags: VFIO_DMA_MAP_FLAG_READ | (writable ? VFIO_DMA_MAP_FLAG_WRITE : 0),
                                         vaddr: UInt64(UInt(bitPattern: vaddr)), iova: iova, size: size)
        _ = try check("VFIO_IOMMU_MAP_DMA [\(hex(iova)), +\(hex(size)))") { try fd.ioctl(VL_VFIO_IOMMU_MAP_DMA, &m) }
        mappings.append(Mapping(iova: iova, size: size, vaddr: m.vaddr, writable: writable))
    }

    public func unmapDMA(iova: UInt64, size: UInt64) throws {
        var u = unmapRequest(flags: 0, iova: iova, size: size)
        _ = try check("VFIO_IOMMU_UNMAP_DMA [\(hex(iova)), +\(hex(size)))") { try fd.ioctl(VL_VFIO_IOMMU_UNMAP_DMA, &u) }
        mappings.removeAll { $0.iova >= iova && $0.iova + $0.size <= iova + size }
    }

    /// Unmap and return the range's dirty bitmap (one bit per `pageSize`).
    public func unmapDMA(iova: UInt64, size: UInt64, dirtyPageSize ps: UInt64) throws -> [UInt64] {
        let pages = (size + ps - 1) / ps
        var words = [UInt64](repeating: 0, count: Int((pages + 63) / 64))
        let headerSize = MemoryLayout<vfio_iommu_type1_dma_unmap>.size
        var buf = [UInt8](repeating: 0, count: headerSize + MemoryLayout<vfio_bitmap>.size)
        try words.withUnsafeMutableBufferPointer { w in
            try buf.withUnsafeMutableBytes { b in
                b.storeBytes(of: unmapRequest(argsz: b.count, flags: VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP, iova: iova, size: size),
                             toByteOffset: 0, as: vfio_iommu_type1_dma_unmap.self)
                b.storeBytes(of: vfio_bitmap(pgsize: ps, size: UInt64(w.count * 8), data: w.baseAddress), toByteOffset: headerSize, as: vfio_bitmap.self)
                _ = try check("VFIO_IOMMU_UNMAP_DMA with dirty bitmap") { try fd.ioctl(VL_VFIO_IOMMU_UNMAP_DMA, b.baseAddress) }
            }
        }
        mappings.removeAll { $0.iova >= iova && $0.iova + $0.size <= iova + size }
        return words
    }

    // MARK: dirty pages (type1)

    private func dirtyPages(_ flags: UInt32) throws {
        var d = dirtyRequest(flags: flags)
        _ = try check("VFIO_IOMMU_DIRTY_PAGES(\(flags))") { try fd.ioctl(VL_VFIO_IOMMU_DIRTY_PAGES, &d) }
    }
    public func startDirtyTracking() throws { try dirtyPages(VFIO_IOMMU_DIRTY_PAGES_FLAG_START) }
    public func stopDirtyTracking() throws { try dirtyPages(VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP) }

    /// The pages of [iova, iova+size) written since tracking started or the last read (type1
    /// reports every pinned page of a device without its own tracking as dirty).
    public func dirtyBitmap(iova: UInt64, size: UInt64, pageSize ps: UInt64 = 4096) throws -> [UInt64] {
        let pages = (size + ps - 1) / ps
        var words = [UInt64](repeating: 0, count: Int((pages + 63) / 64))
        let head = MemoryLayout<vfio_iommu_type1_dirty_bitmap>.size
        var buf = [UInt8](repeating: 0, count: head + MemoryLayout<vfio_iommu_type1_dirty_bitmap_get>.size)
        try words.withUnsafeMutableBufferPointer { w in
            try buf.withUnsafeMutableBytes { b in
                b.storeBytes(of: dirtyRequest(argsz: b.count, flags: VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP), toByteOffset: 0,
                             as: vfio_iommu_type1_dirty_bitmap.self)
                b.storeBytes(of: vfio_iommu_type1_dirty_bitmap_get(iova: iova, size: size, bitmap: vfio_bitmap(pgsize: ps, size: UInt64(w.count * 8), data: w.baseAddress)),
                             toByteOffset: head, as: vfio_iommu_type1_dirty_bitmap_get.self)
                _ = try check("VFIO_IOMMU_DIRTY_PAGES get bitmap") { try fd.ioctl(VL_VFIO_IOMMU_DIRTY_PAGES, b.baseAddress) }
            }
        }
        return words
    }

    // MARK: live update (VADDR)

    /// Whether a live update can keep this container: UPDATE_VADDR and UNMAP_ALL (meaningful
    /// only after SET_IOMMU). Nil when it can; else the reason.
    public var liveUpdateBlocker: String? {
        if !checkExtension(VFIO_UPDATE_VADDR) { return "VFIO container does not support VFIO_UPDATE_VADDR" }
        if !checkExtension(VFIO_UNMAP_ALL) { return "VFIO container does not support VFIO_UNMAP_ALL" }
        return nil
    }

    /// Drop the virtual addresses of every mapping; the IOVA→page translations and pins stay,
    /// so device DMA goes on (VFIO_DMA_UNMAP_FLAG_VADDR | ALL).
    public func invalidateVirtualAddresses() throws {
        var u = unmapRequest(flags: VFIO_DMA_UNMAP_FLAG_VADDR | VFIO_DMA_UNMAP_FLAG_ALL, iova: 0, size: 0)
        _ = try check("VFIO_IOMMU_UNMAP_DMA(VADDR|ALL)") { try fd.ioctl(VL_VFIO_IOMMU_UNMAP_DMA, &u) }
    }

    /// Give each mapping its (new) virtual address: `vaddr(mapping)`; sizes must match the
    /// kernel's. Returns the mappings that failed (none on success). Used by the new process
    /// after a handover, and by the old one to recover (also after a partial UNMAP_ALL, where
    /// mappings that kept their address answer EEXIST and count as restored).
    ///
    /// With `takingBack` (the old process of a failed live update) a mapping whose address is
    /// valid already is invalidated and mapped again with this process's address: a successor
    /// may have attached its own address (and taken the pinned-page accounting, which MAP with
    /// VADDR moves to the caller's mm) before it died. The kernel answers EINVAL to MAP with
    /// VADDR on a mapping whose address is valid.
    @discardableResult
    public func restoreVirtualAddresses(takingBack: Bool = false, _ vaddr: (Mapping) -> UnsafeMutableRawPointer) -> [(Mapping, Errno)] {
        var failed: [(Mapping, Errno)] = []
        for (i, m) in mappings.enumerated() {
            let va = UInt64(UInt(bitPattern: vaddr(m)))
            func mapVaddr() throws {
                var req = vfio_iommu_type1_dma_map(argsz: UInt32(MemoryLayout<vfio_iommu_type1_dma_map>.size), flags: VFIO_DMA_MAP_FLAG_VADDR,
                                                   vaddr: va, iova: m.iova, size: m.size)
                _ = try fd.ioctl(VL_VFIO_IOMMU_MAP_DMA, &req)
            }
            do { try mapVaddr(); mappings[i].vaddr = va } catch let e as Errno {
                guard e == .EEXIST || e == .EINVAL else { failed.append((m, e)); continue }
                guard takingBack else { continue }  // valid already: counts as restored
                var u = unmapRequest(flags: VFIO_DMA_UNMAP_FLAG_VADDR, iova: m.iova, size: m.size)
                do {
                    _ = try fd.ioctl(VL_VFIO_IOMMU_UNMAP_DMA, &u)
                    try mapVaddr()
                    mappings[i].vaddr = va
                } catch let e2 as Errno { failed.append((m, e2)) } catch {}
            } catch {}
        }
        return failed
    }
}

/// A VFIO group (/dev/vfio/N): viability, its container, its devices.
public final class Group: @unchecked Sendable {
    public let id: Int
    public let fd: FileDescriptor

    public init(id: Int) throws {
        self.id = id
        let raw = open("/dev/vfio/\(id)", O_RDWR | O_CLOEXEC)
        guard raw >= 0 else { throw KernelVFIOError.unavailable("cannot open /dev/vfio/\(id): \(Errno.current) (is the device bound to vfio-pci?)") }
        fd = FileDescriptor(adopting: raw)
    }

    public init(id: Int, adopting fd: FileDescriptor) { self.id = id; self.fd = fd }

    public var isViable: Bool {
        var st = vfio_group_status(argsz: UInt32(MemoryLayout<vfio_group_status>.size), flags: 0)
        guard (try? fd.ioctl(VL_VFIO_GROUP_GET_STATUS, &st)) != nil else { return false }
        return st.flags & VFIO_GROUP_FLAGS_VIABLE != 0
    }

    public func setContainer(_ c: Container) throws {
        guard isViable else { throw KernelVFIOError.unavailable("VFIO group \(id) is not viable: bind every device in it to vfio-pci") }
        var raw = c.fd.rawValue
        _ = try check("VFIO_GROUP_SET_CONTAINER (group \(id))") { try fd.ioctl(VL_VFIO_GROUP_SET_CONTAINER, &raw) }
    }

    /// The device's fd, by its name in the group (a PCI address: 0000:00:03.0).
    public func device(_ name: String) throws -> KernelDevice {
        let raw = try check("VFIO_GROUP_GET_DEVICE_FD(\(name))") {
            try name.withCString { try fd.ioctl(VL_VFIO_GROUP_GET_DEVICE_FD, UnsafeMutableRawPointer(mutating: $0)) }
        }
        return KernelDevice(name: name, fd: FileDescriptor(adopting: raw))
    }
}
