import CVFIOLive
import Glibc
import SystemCalls

/// An iommufd (/dev/iommu) and its IO address spaces. Mappings made by file (MAP_FILE) do not
/// depend on this process's virtual addresses, so a live update only moves the pinned-page
/// accounting to the new process (CHANGE_PROCESS).
public final class IOMMUFD: @unchecked Sendable {
    public let fd: FileDescriptor

    public init() throws {
        let raw = open("/dev/iommu", O_RDWR | O_CLOEXEC)
        guard raw >= 0 else { throw KernelVFIOError.unavailable("cannot open /dev/iommu: \(Errno.current) (no IOMMUFD in this kernel?)") }
        fd = FileDescriptor(adopting: raw)
    }

    public init(adopting fd: FileDescriptor) { self.fd = fd }

    /// IOMMU_IOAS_ALLOC.
    public func allocateIOAS() throws -> UInt32 {
        var a = iommu_ioas_alloc(size: UInt32(MemoryLayout<iommu_ioas_alloc>.size), flags: 0, out_ioas_id: 0)
        _ = try check("IOMMU_IOAS_ALLOC") { try fd.ioctl(VL_IOMMU_IOAS_ALLOC, &a) }
        return a.out_ioas_id
    }

    public func destroy(_ id: UInt32) throws {
        var d = iommu_destroy(size: UInt32(MemoryLayout<iommu_destroy>.size), id: id)
        _ = try check("IOMMU_DESTROY(\(id))") { try fd.ioctl(VL_IOMMU_DESTROY, &d) }
    }

    /// Map by virtual address at a fixed IOVA (IOMMU_IOAS_MAP).
    public func map(ioas: UInt32, iova: UInt64, length: UInt64, vaddr: UnsafeMutableRawPointer, writable: Bool = true) throws {
        var m = iommu_ioas_map()
        m.size = UInt32(MemoryLayout<iommu_ioas_map>.size)
        m.flags = IOMMU_IOAS_MAP_FIXED_IOVA | IOMMU_IOAS_MAP_READABLE | (writable ? IOMMU_IOAS_MAP_WRITEABLE : 0)
        m.ioas_id = ioas; m.user_va = UInt64(UInt(bitPattern: vaddr)); m.length = length; m.iova = iova
        _ = try check("IOMMU_IOAS_MAP [\(hex(iova)), +\(hex(length)))") { try fd.ioctl(VL_IOMMU_IOAS_MAP, &m) }
    }

    /// Map a file range (a memfd) at a fixed IOVA (IOMMU_IOAS_MAP_FILE).
    public func mapFile(ioas: UInt32, iova: UInt64, length: UInt64, file: FileDescriptor, offset: UInt64 = 0, writable: Bool = true) throws {
        var m = iommu_ioas_map_file()
        m.size = UInt32(MemoryLayout<iommu_ioas_map_file>.size)
        m.flags = IOMMU_IOAS_MAP_FIXED_IOVA | IOMMU_IOAS_MAP_READABLE | (writable ? IOMMU_IOAS_MAP_WRITEABLE : 0)
        m.ioas_id = ioas; m.fd = file.rawValue; m.start = offset; m.length = length; m.iova = iova
        _ = try check("IOMMU_IOAS_MAP_FILE [\(hex(iova)), +\(hex(length)))") { try fd.ioctl(VL_IOMMU_IOAS_MAP_FILE, &m) }
    }

    public func unmap(ioas: UInt32, iova: UInt64, length: UInt64) throws {
        var u = iommu_ioas_unmap(size: UInt32(MemoryLayout<iommu_ioas_unmap>.size), ioas_id: ioas, iova: iova, length: length)
        _ = try check("IOMMU_IOAS_UNMAP") { try fd.ioctl(VL_IOMMU_IOAS_UNMAP, &u) }
    }

    /// IOMMU_IOAS_CHANGE_PROCESS: move the pinned-page accounting of every mapping to the
    /// calling process. A no-op (and the capability probe) when the process has not changed.
    public func changeProcess() throws {
        var c = iommu_ioas_change_process(size: UInt32(MemoryLayout<iommu_ioas_change_process>.size), __reserved: 0)
        _ = try check("IOMMU_IOAS_CHANGE_PROCESS") { try fd.ioctl(VL_IOMMU_IOAS_CHANGE_PROCESS, &c) }
    }

    /// Whether the IOMMU can track dirty pages for this device: allocate (and destroy) a HWPT
    /// with IOMMU_HWPT_ALLOC_DIRTY_TRACKING. QEMU 7.2's intel-iommu answers EOPNOTSUPP.
    public func supportsDirtyTracking(deviceID: UInt32, ioas: UInt32) -> Bool {
        var a = iommu_hwpt_alloc()
        a.size = UInt32(MemoryLayout<iommu_hwpt_alloc>.size)
        a.flags = IOMMU_HWPT_ALLOC_DIRTY_TRACKING
        a.dev_id = deviceID; a.pt_id = ioas
        guard (try? fd.ioctl(VL_IOMMU_HWPT_ALLOC, &a)) != nil else { return false }
        try? destroy(a.out_hwpt_id)
        return true
    }

    /// Nil when a live update can keep this iommufd; else the reason.
    public var liveUpdateBlocker: String? {
        do { try changeProcess(); return nil } catch { return "vfio iommufd backend does not support IOMMU_IOAS_CHANGE_PROCESS (\(error))" }
    }
}
