import CVFIOLive
import Glibc
import SystemCalls
import VFIO

/// Where a kernel device's DMA is mapped: its legacy type1 container, or an iommufd IOAS.
public enum KernelDMASpace: @unchecked Sendable {
    case container(Container)
    case iommufd(IOMMUFD, ioas: UInt32)
}

/// The type1 container's VFIO_IOMMU_DIRTY_PAGES, as the transport-neutral tracker.
extension Container: VFIOIOMMUDirtyTracker {}

/// A kernel VFIO device together with the address space its DMA goes through: the
/// transport-neutral `VFIODevice` a VMM drives. The device fd alone cannot map DMA (the
/// container or IOAS does), hence the pair.
public final class AssignedKernelDevice: VFIODevice, @unchecked Sendable {
    public let device: KernelDevice
    public let dmaSpace: KernelDMASpace
    private var regions: [UInt32: KernelDevice.RegionInfo] = [:]
    private var mappings: [UInt32: VFIORegionMapping] = [:]
    private let lock = Mutex()
    /// What must stay open while the device is used (its group).
    private let keepAlive: [AnyObject]
    /// iommufd: the page table the device is on, and its HWPT dirty tracker or why it has none.
    public let iommufdAttachment: IOMMUFDAttachment?

    public init(device: KernelDevice, dmaSpace: KernelDMASpace, keepAlive: [AnyObject] = [], iommufdAttachment: IOMMUFDAttachment? = nil) {
        self.device = device; self.dmaSpace = dmaSpace; self.keepAlive = keepAlive; self.iommufdAttachment = iommufdAttachment
    }

    public enum Backend: String, Sendable { case legacy, iommufd }

    /// Open a PCI device bound to vfio-pci by its address, as QEMU's
    /// `-device vfio-pci,host=0000:00:04.0[,iommufd=...]`.
    public static func open(pciAddress: String, backend: Backend) throws -> AssignedKernelDevice {
        try open(sysfsPath: "/sys/bus/pci/devices/\(pciAddress)", backend: backend)
    }

    /// Open a VFIO device by its sysfs path (a PCI device or an mdev, as QEMU's `sysfsdev=`):
    /// legacy: its IOMMU group in a new type1 container; iommufd: its cdev bound to a new
    /// iommufd and attached to a new IOAS. Nothing is mapped yet.
    public static func open(sysfsPath: String, backend: Backend) throws -> AssignedKernelDevice {
        guard let name = sysfsPath.split(separator: "/").last.map(String.init), access(sysfsPath, F_OK) == 0 else {
            throw KernelVFIOError.unavailable("no device at \(sysfsPath)")
        }
        switch backend {
        case .legacy:
            guard let g = PCIDevice.linkName("\(sysfsPath)/iommu_group").flatMap({ Int($0) }) else {
                throw KernelVFIOError.unavailable("\(name) has no IOMMU group (is an IOMMU enabled, and the device bound to vfio-pci?)")
            }
            let container = try Container()
            let group = try Group(id: g)
            try group.setContainer(container)
            try container.setIOMMU()
            return AssignedKernelDevice(device: try group.device(name), dmaSpace: .container(container), keepAlive: [group])
        case .iommufd:
            guard let dir = opendir("\(sysfsPath)/vfio-dev") else {
                throw KernelVFIOError.unavailable("\(name) has no VFIO device cdev (\(sysfsPath)/vfio-dev): VFIO_DEVICE_CDEV missing, or not bound to a VFIO driver")
            }
            var cdev: String?
            while let e = readdir(dir) {
                let n = withUnsafeBytes(of: e.pointee.d_name) { String(cString: $0.bindMemory(to: CChar.self).baseAddress!) }
                if n.hasPrefix("vfio") { cdev = "/dev/vfio/devices/\(n)" }
            }
            closedir(dir)
            guard let path = cdev else { throw KernelVFIOError.unavailable("\(name): \(sysfsPath)/vfio-dev lists no cdev") }
            let raw = Glibc.open(path, O_RDWR | O_CLOEXEC)
            guard raw >= 0 else { throw KernelVFIOError.unavailable("cannot open \(path): \(Errno.current)") }
            let device = KernelDevice(name: name, fd: FileDescriptor(adopting: raw))
            let iommufd = try IOMMUFD()
            let devid = try device.bind(iommufd)
            let ioas = try iommufd.allocateIOAS()
            // On a dirty-tracking HWPT when the IOMMU has a dirty bit, else on the IOAS (HWPT.swift).
            let a = try IOMMUFDAttachment.attach(deviceID: devid, name: name, iommufd: iommufd, ioas: ioas) { try device.attach(pageTable: $0) }
            return AssignedKernelDevice(device: device, dmaSpace: .iommufd(iommufd, ioas: ioas), iommufdAttachment: a)
        }
    }

    public var transportName: String { "kernel VFIO" }
    public var deviceName: String { device.name }

    /// Region info never changes for an open device: one ioctl per region, then cached.
    private func region(_ index: UInt32) throws -> KernelDevice.RegionInfo {
        if let r = lock.withLock({ regions[index] }) { return r }
        let r = try device.regionInfo(index).0
        lock.withLock { regions[index] = r }
        return r
    }

    public func describeDevice() throws -> VFIODeviceInfo {
        let i = try device.info()
        return VFIODeviceInfo(flags: i.flags, regionCount: i.regions, irqCount: i.irqs)
    }

    public func describeRegion(_ index: UInt32) throws -> VFIORegionInfo {
        let (r, buf) = try device.regionInfo(index)
        var areas: [VFIORegionInfo.Area]?
        var type: (UInt32, UInt32)?
        if r.flags & VFIO_REGION_INFO_FLAG_CAPS != 0, r.capsOffset != 0 {
            (areas, type) = try VFIORegionInfo.decodeCapabilities(buf, first: r.capsOffset)
        }
        return VFIORegionInfo(index: index, readable: r.flags & VFIO_REGION_INFO_FLAG_READ != 0,
                              writable: r.flags & VFIO_REGION_INFO_FLAG_WRITE != 0, mappable: r.canMmap,
                              size: r.size, offset: r.offset, sparseAreas: areas, type: type)
    }

    public func describeIRQ(_ index: UInt32) throws -> VFIOIRQInfo {
        var i = vfio_irq_info(argsz: UInt32(MemoryLayout<vfio_irq_info>.size), flags: 0, index: index, count: 0)
        _ = try check("\(device.name): VFIO_DEVICE_GET_IRQ_INFO(\(index))") { try device.fd.ioctl(VL_VFIO_DEVICE_GET_IRQ_INFO, &i) }
        return VFIOIRQInfo(index: index, count: i.count, eventfd: i.flags & VFIO_IRQ_INFO_EVENTFD != 0,
                           maskable: i.flags & VFIO_IRQ_INFO_MASKABLE != 0, automasked: i.flags & VFIO_IRQ_INFO_AUTOMASKED != 0,
                           noresize: i.flags & VFIO_IRQ_INFO_NORESIZE != 0)
    }

    public func regionRead(_ index: UInt32, offset: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws {
        try device.read(region: region(index), offset: offset, into: buffer)
    }

    public func regionWrite(_ index: UInt32, offset: UInt64, from data: UnsafeRawBufferPointer) throws {
        try device.write(region: region(index), offset: offset, data)
    }

    public func regionRead(_ index: UInt32, offset: UInt64, count: Int) throws -> [UInt8] {
        var b = [UInt8](repeating: 0, count: count)
        try b.withUnsafeMutableBytes { try regionRead(index, offset: offset, into: $0) }
        return b
    }

    public func regionWrite(_ index: UInt32, offset: UInt64, _ data: [UInt8]) throws {
        try data.withUnsafeBytes { try regionWrite(index, offset: offset, from: $0) }
    }

    /// mmap each mappable area of the region at its offset in the device fd (cached).
    public func mapRegionAreas(_ index: UInt32) throws -> VFIORegionMapping? {
        if let m = lock.withLock({ mappings[index] }) { return m }
        let info = try describeRegion(index)
        let areas = info.mappableAreas
        guard !areas.isEmpty else { return nil }
        var owners: [MappedRegion] = []
        var out: [VFIORegionMapping.Area] = []
        for a in areas {
            guard a.size <= UInt64(Int.max), info.offset <= UInt64.max - a.offset else { throw VFIODeviceError.malformed("region \(index) area is out of range") }
            let m = try MappedRegion(fd: device.fd, offset: info.offset + a.offset, length: Int(a.size), writable: info.writable)
            owners.append(m)
            out.append(.init(offset: a.offset, size: a.size, base: m.base, writable: info.writable))
        }
        let m = VFIORegionMapping(index: index, areas: out, owners: owners)
        lock.withLock { mappings[index] = m }
        return m
    }

    public func setIRQs(index: UInt32, start: UInt32, eventfds: [EventFD]) throws { try device.setIRQs(index: index, start: start, eventfds: eventfds) }
    public func disableIRQs(index: UInt32) throws { try device.disableIRQs(index: index) }

    public func unmaskIRQ(index: UInt32, vector: UInt32) throws {
        var s = irqSet(argsz: MemoryLayout<vfio_irq_set>.size, flags: VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_UNMASK,
                       index: index, start: vector, count: 1)
        _ = try check("\(device.name): VFIO_DEVICE_SET_IRQS(\(index), unmask)") { try device.fd.ioctl(VL_VFIO_DEVICE_SET_IRQS, &s) }
    }

    /// Legacy: by virtual address. iommufd: by file when there is one (a live update then
    /// needs only CHANGE_PROCESS), else by address.
    public func addDMAMapping(_ r: VFIODMARegion) throws {
        switch dmaSpace {
        case let .container(c): try c.mapDMA(iova: r.iova, size: r.size, vaddr: r.host, writable: r.writable)
        case let .iommufd(i, ioas):
            if let fd = r.fd { try i.mapFile(ioas: ioas, iova: r.iova, length: r.size, file: fd, offset: r.fdOffset, writable: r.writable) }
            else { try i.map(ioas: ioas, iova: r.iova, length: r.size, vaddr: r.host, writable: r.writable) }
        }
    }

    public func removeDMAMapping(iova: UInt64, size: UInt64) throws {
        switch dmaSpace {
        case let .container(c): try c.unmapDMA(iova: iova, size: size)
        case let .iommufd(i, ioas): try i.unmap(ioas: ioas, iova: iova, length: size)
        }
    }

    public var supportsDMALogging: Bool { device.supportsDMALogging }

    /// VFIO_DEVICE_FEATURE DMA_LOGGING_START: the kernel reads the ranges through a pointer.
    public func startDMALogging(pageSize: UInt64, ranges: [(iova: UInt64, length: UInt64)]) throws {
        var flat: [UInt64] = ranges.flatMap { [$0.iova, $0.length] }
        try flat.withUnsafeMutableBufferPointer { r in
            var d = [UInt8](repeating: 0, count: 24)
            d.withUnsafeMutableBytes { b in
                b.storeBytes(of: pageSize, toByteOffset: 0, as: UInt64.self)
                b.storeBytes(of: UInt32(ranges.count), toByteOffset: 8, as: UInt32.self)
                b.storeBytes(of: UInt64(UInt(bitPattern: r.baseAddress)), toByteOffset: 16, as: UInt64.self)
            }
            _ = try check("\(device.name): DMA_LOGGING_START") {
                try device.feature(UInt32(VFIO_DEVICE_FEATURE_DMA_LOGGING_START), flags: VFIO_DEVICE_FEATURE_SET, data: &d)
            }
        }
    }

    public func stopDMALogging() throws {
        var d: [UInt8] = []
        _ = try check("\(device.name): DMA_LOGGING_STOP") {
            try device.feature(UInt32(VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP), flags: VFIO_DEVICE_FEATURE_SET, data: &d)
        }
    }

    /// DMA_LOGGING_REPORT into a bitmap the kernel writes through a pointer (read-and-clear).
    public func dmaLoggingReport(iova: UInt64, length: UInt64, pageSize: UInt64) throws -> [UInt64] {
        guard pageSize > 0, pageSize & (pageSize - 1) == 0, length > 0, length <= UInt64.max - (pageSize - 1) else {
            throw VFIODeviceError.unsupported("\(device.name): DMA_LOGGING_REPORT of \(length) bytes in \(pageSize)-byte pages")
        }
        let pages = (length + pageSize - 1) / pageSize
        guard pages <= 1 << 32 else { throw VFIODeviceError.unsupported("\(device.name): DMA_LOGGING_REPORT of \(pages) pages") }
        var words = [UInt64](repeating: 0, count: Int((pages + 63) / 64))
        try words.withUnsafeMutableBufferPointer { w in
            var d = [UInt8](repeating: 0, count: 32)
            d.withUnsafeMutableBytes { b in
                b.storeBytes(of: iova, toByteOffset: 0, as: UInt64.self)
                b.storeBytes(of: length, toByteOffset: 8, as: UInt64.self)
                b.storeBytes(of: pageSize, toByteOffset: 16, as: UInt64.self)
                b.storeBytes(of: UInt64(UInt(bitPattern: w.baseAddress)), toByteOffset: 24, as: UInt64.self)
            }
            _ = try check("\(device.name): DMA_LOGGING_REPORT") {
                try device.feature(UInt32(VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT), flags: VFIO_DEVICE_FEATURE_GET, data: &d)
            }
        }
        return words
    }

    /// The container's type1 dirty tracking, or the iommufd HWPT's when the device is on one.
    public var iommuDirtyTracker: VFIOIOMMUDirtyTracker? {
        switch dmaSpace {
        case let .container(c): return c.supportsDirtyPageTracking() ? c : nil
        case .iommufd: return iommufdAttachment?.tracker
        }
    }

    /// Why `iommuDirtyTracker` is nil (nil when there is one).
    public var iommuDirtyTrackerUnavailable: String? {
        switch dmaSpace {
        case let .container(c): return c.supportsDirtyPageTracking() ? nil : "the type1 container reports no dirty-page migration capability"
        case .iommufd:
            guard let a = iommufdAttachment else { return "device \(device.name) was not attached through IOMMUFDAttachment (adopted from a predecessor?)" }
            return a.trackerUnavailable
        }
    }

    // MARK: MigrationDeviceHandle (the kernel device's own)

    public func findRegion(type: UInt32, subtype: UInt32) throws -> (index: UInt32, size: UInt64)? { try device.findRegion(type: type, subtype: subtype) }
    public func migrationCapabilities() throws -> MigrationCapabilities? { try device.migrationCapabilities() }
    public func migrationState() throws -> MigrationState { try device.migrationState() }
    public func setMigrationState(_ s: MigrationState) throws { try device.setMigrationState(s) }
    public func readMigrationData(max: Int) throws -> [UInt8] { try device.readMigrationData(max: max) }
    public func writeMigrationData(_ data: UnsafeRawBufferPointer) throws { try device.writeMigrationData(data) }
    public func migrationDataSize() throws -> UInt64 { try device.migrationDataSize() }
    public func resetDevice() throws { try device.reset() }
}
