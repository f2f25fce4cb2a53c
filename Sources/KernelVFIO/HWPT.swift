import CVFIOLive
import Glibc
import SystemCalls
import VFIO

/// What IOMMU_GET_HW_INFO says about the IOMMU behind a device bound to an iommufd.
public struct IOMMUHardwareInfo: Equatable, Sendable {
    /// enum iommu_hw_info_type (1: Intel VT-d, 2: ARM SMMUv3, ...).
    public var dataType: UInt32
    /// IOMMU_HW_CAP_* bits.
    public var capabilities: UInt64
    public var canTrackDirtyPages: Bool { capabilities & IOMMU_HW_CAP_DIRTY_TRACKING != 0 }
}

extension IOMMUFD {
    /// IOMMU_GET_HW_INFO without the driver-specific data (data_len 0): the type and capabilities.
    public func hardwareInfo(deviceID: UInt32) throws -> IOMMUHardwareInfo {
        var i = iommu_hw_info()
        i.size = UInt32(MemoryLayout<iommu_hw_info>.size)
        i.dev_id = deviceID
        _ = try check("IOMMU_GET_HW_INFO(device \(deviceID))") { try fd.ioctl(VL_IOMMU_GET_HW_INFO, &i) }
        return IOMMUHardwareInfo(dataType: i.out_data_type, capabilities: i.out_capabilities)
    }

    /// IOMMU_OPTION_HUGE_PAGES of an IOAS: whether its domains may map with pages larger than
    /// the CPU's. Only settable while no domain has a mapping.
    public func setHugePages(ioas: UInt32, _ enabled: Bool) throws {
        var o = iommu_option(size: UInt32(MemoryLayout<iommu_option>.size), option_id: IOMMU_OPTION_HUGE_PAGES,
                             op: UInt16(IOMMU_OPTION_OP_SET), __reserved: 0, object_id: ioas, val64: enabled ? 1 : 0)
        _ = try check("IOMMU_OPTION(HUGE_PAGES=\(enabled ? 1 : 0), IOAS \(ioas))") { try fd.ioctl(VL_IOMMU_OPTION, &o) }
    }
}

/// An iommufd hardware page table (IOMMU_HWPT_ALLOC): the IOMMU domain a device is attached to,
/// filled from an IOAS (every IOAS_MAP into that IOAS lands in it). Allocated with
/// IOMMU_HWPT_ALLOC_DIRTY_TRACKING, the IOMMU's dirty bit can be switched on and read.
/// It lives as long as the iommufd unless `destroy()`ed, which the kernel refuses (EBUSY)
/// while a device is attached.
public final class HWPT: @unchecked Sendable {
    public let iommufd: IOMMUFD
    public let id: UInt32
    /// The IOAS it is filled from.
    public let ioas: UInt32
    public let dirtyTrackingCapable: Bool

    /// IOMMU_HWPT_ALLOC of a paging HWPT for `deviceID`'s IOMMU on `ioas`. An IOMMU without a
    /// dirty bit refuses `dirtyTracking` (EOPNOTSUPP: QEMU 7.2's intel-iommu does).
    public init(iommufd: IOMMUFD, deviceID: UInt32, ioas: UInt32, dirtyTracking: Bool) throws {
        var a = iommu_hwpt_alloc()
        a.size = UInt32(MemoryLayout<iommu_hwpt_alloc>.size)
        a.flags = dirtyTracking ? IOMMU_HWPT_ALLOC_DIRTY_TRACKING : 0
        a.dev_id = deviceID
        a.pt_id = ioas
        _ = try check("IOMMU_HWPT_ALLOC(device \(deviceID), IOAS \(ioas)\(dirtyTracking ? ", DIRTY_TRACKING" : ""))") {
            try iommufd.fd.ioctl(VL_IOMMU_HWPT_ALLOC, &a)
        }
        self.iommufd = iommufd; self.id = a.out_hwpt_id; self.ioas = ioas; self.dirtyTrackingCapable = dirtyTracking
    }

    /// A HWPT another process allocated in this iommufd (a live update's predecessor): no ioctl.
    init(adopting id: UInt32, iommufd: IOMMUFD, ioas: UInt32, dirtyTrackingCapable: Bool) {
        self.iommufd = iommufd; self.id = id; self.ioas = ioas; self.dirtyTrackingCapable = dirtyTrackingCapable
    }

    public func destroy() throws { try iommufd.destroy(id) }

    /// IOMMU_HWPT_SET_DIRTY_TRACKING. Enabling clears what the IOMMU had recorded before.
    public func setDirtyTracking(_ enabled: Bool) throws {
        guard dirtyTrackingCapable else {
            throw KernelVFIOError.invalid("HWPT \(id) was allocated without IOMMU_HWPT_ALLOC_DIRTY_TRACKING")
        }
        var s = iommu_hwpt_set_dirty_tracking(size: UInt32(MemoryLayout<iommu_hwpt_set_dirty_tracking>.size),
                                              flags: enabled ? IOMMU_HWPT_DIRTY_TRACKING_ENABLE : 0, hwpt_id: id, __reserved: 0)
        _ = try check("IOMMU_HWPT_SET_DIRTY_TRACKING(HWPT \(id), \(enabled ? "on" : "off"))") {
            try iommufd.fd.ioctl(VL_IOMMU_HWPT_SET_DIRTY_TRACKING, &s)
        }
    }

    /// The largest bitmap one harvest asks for: 2^28 pages (1 TiB at 4 KiB, a 32 MiB bitmap).
    public static let maxBitmapPages: UInt64 = 1 << 28

    /// Check a harvest range before any allocation or ioctl; returns the page count. The
    /// kernel wants iova and length aligned to the page size (and to the IOAS's IO page size,
    /// which it checks itself); the page size must be a power of two (the bitmap code shifts).
    public static func bitmapPages(iova: UInt64, size: UInt64, pageSize: UInt64) throws -> UInt64 {
        guard pageSize > 0, pageSize & (pageSize - 1) == 0 else {
            throw KernelVFIOError.invalid("dirty bitmap page size \(pageSize) is not a power of two")
        }
        guard size > 0 else { throw KernelVFIOError.invalid("dirty bitmap of an empty range at \(hex(iova))") }
        guard iova & (pageSize - 1) == 0, size & (pageSize - 1) == 0 else {
            throw KernelVFIOError.invalid("dirty bitmap range [\(hex(iova)), +\(hex(size))) is not aligned to its \(pageSize)-byte pages")
        }
        guard size - 1 <= UInt64.max - iova else {
            throw KernelVFIOError.invalid("dirty bitmap range [\(hex(iova)), +\(hex(size))) wraps past the end of the IOVA space")
        }
        let pages = size / pageSize
        guard pages <= maxBitmapPages else {
            throw KernelVFIOError.invalid("dirty bitmap of \(pages) pages is larger than the \(maxBitmapPages) one harvest may ask for")
        }
        return pages
    }

    /// IOMMU_HWPT_GET_DIRTY_BITMAP: one bit per `pageSize` page of [iova, iova+size), bit i of
    /// word i/64 for page i. The kernel clears what it reports (`clear`), unless asked for
    /// IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR: then the same bits come again next time.
    public func dirtyBitmap(iova: UInt64, size: UInt64, pageSize: UInt64, clear: Bool = true) throws -> [UInt64] {
        let pages = try Self.bitmapPages(iova: iova, size: size, pageSize: pageSize)
        // The kernel only sets bits: the bitmap starts zeroed.
        var words = [UInt64](repeating: 0, count: Int((pages + 63) / 64))
        try words.withUnsafeMutableBufferPointer { w in
            var g = iommu_hwpt_get_dirty_bitmap()
            g.size = UInt32(MemoryLayout<iommu_hwpt_get_dirty_bitmap>.size)
            g.hwpt_id = id
            g.flags = clear ? 0 : IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR
            g.iova = iova; g.length = size; g.page_size = pageSize
            g.data = UInt64(UInt(bitPattern: w.baseAddress))
            _ = try check("IOMMU_HWPT_GET_DIRTY_BITMAP(HWPT \(id), [\(hex(iova)), +\(hex(size))), \(pageSize))") {
                try iommufd.fd.ioctl(VL_IOMMU_HWPT_GET_DIRTY_BITMAP, &g)
            }
        }
        return words
    }
}

/// The IOMMU's dirty tracking through an iommufd HWPT, as the transport-neutral tracker: the
/// pages every device attached to the HWPT wrote. Harvests read and clear, as the type1
/// container's DIRTY_PAGES does; a harvest outside start…stop is refused here, before the
/// ioctl (the kernel's answer there is the driver's).
public final class HWPTDirtyTracker: VFIOIOMMUDirtyTracker, @unchecked Sendable {
    public let hwpt: HWPT
    private let lock = Mutex()
    private var tracking = false

    public init(hwpt: HWPT) throws {
        guard hwpt.dirtyTrackingCapable else {
            throw KernelVFIOError.invalid("HWPT \(hwpt.id) was allocated without IOMMU_HWPT_ALLOC_DIRTY_TRACKING: it cannot track dirty pages")
        }
        self.hwpt = hwpt
    }

    public var isTracking: Bool { lock.withLock { tracking } }

    public func startDirtyTracking() throws {
        try lock.withLock {
            try hwpt.setDirtyTracking(true)
            tracking = true
        }
    }

    public func stopDirtyTracking() throws {
        try lock.withLock {
            try hwpt.setDirtyTracking(false)
            tracking = false
        }
    }

    public func dirtyBitmap(iova: UInt64, size: UInt64, pageSize: UInt64) throws -> [UInt64] {
        try harvest(iova: iova, size: size, pageSize: pageSize, clear: true)
    }

    /// `clear: false` looks without consuming (IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR).
    public func harvest(iova: UInt64, size: UInt64, pageSize: UInt64, clear: Bool) throws -> [UInt64] {
        _ = try HWPT.bitmapPages(iova: iova, size: size, pageSize: pageSize)
        return try lock.withLock {
            guard tracking else { throw KernelVFIOError.invalid("HWPT \(hwpt.id): dirty tracking is not started") }
            return try hwpt.dirtyBitmap(iova: iova, size: size, pageSize: pageSize, clear: clear)
        }
    }
}

/// How a device bound to an iommufd was attached: to a dirty-tracking HWPT when its IOMMU has
/// a dirty bit, as QEMU's iommufd backend does (IOMMU_GET_HW_INFO's IOMMU_HW_CAP_DIRTY_TRACKING,
/// then IOMMU_HWPT_ALLOC with DIRTY_TRACKING), else to the IOAS itself (the kernel's automatic
/// domain), with the reason it has no IOMMU dirty tracking.
public struct IOMMUFDAttachment: @unchecked Sendable {
    public let deviceID: UInt32
    public let ioas: UInt32
    /// The page table the kernel attached (the HWPT's id, or the automatic domain's).
    public let pageTableID: UInt32
    public let tracker: HWPTDirtyTracker?
    /// Why `tracker` is nil.
    public let trackerUnavailable: String?

    /// `attach(ptID)` attaches the device to a page table and returns the one the kernel
    /// chose (VFIO_DEVICE_ATTACH_IOMMUFD_PT for a cdev). A failed HWPT path falls back to the
    /// IOAS; only a failed attach to the IOAS is an error.
    public static func attach(deviceID: UInt32, name: String, iommufd: IOMMUFD, ioas: UInt32,
                              _ attach: (UInt32) throws -> UInt32) throws -> IOMMUFDAttachment {
        var why: String
        do {
            let info = try iommufd.hardwareInfo(deviceID: deviceID)
            if info.canTrackDirtyPages {
                let hwpt = try HWPT(iommufd: iommufd, deviceID: deviceID, ioas: ioas, dirtyTracking: true)
                do {
                    let pt = try attach(hwpt.id)
                    return IOMMUFDAttachment(deviceID: deviceID, ioas: ioas, pageTableID: pt, tracker: try HWPTDirtyTracker(hwpt: hwpt), trackerUnavailable: nil)
                } catch {
                    try? hwpt.destroy()
                    throw error
                }
            }
            why = "the IOMMU behind \(name) has no dirty bit (IOMMU_GET_HW_INFO reports no IOMMU_HW_CAP_DIRTY_TRACKING)"
        } catch {
            why = "the IOMMU behind \(name) cannot track dirty pages: \(error)"
        }
        let pt = try attach(ioas)
        return IOMMUFDAttachment(deviceID: deviceID, ioas: ioas, pageTableID: pt, tracker: nil, trackerUnavailable: why)
    }
}
