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

    /// The legacy IOMMU group the device came from (a live update hands its fd over).
    public var group: Group? { keepAlive.first { $0 is Group } as? Group }
    /// iommufd: the device's id in the iommufd and the page table it is attached to (a live
    /// update's CPR record, as QEMU's CprVFIODevice {devid, hwpt_id}).
    public var iommufdIDs: (device: UInt32, hwpt: UInt32)?
    /// Set while a live update hands the device to a successor (and for good once it has):
    /// this process then leaves the device alone.
    public var handedOverForCPR = false
    public var isHandedOver: Bool { handedOverForCPR }

    public enum Backend: String, Sendable { case legacy, iommufd }

    /// How the device was opened, for reports: "legacy type1 container, VFIO group 12" or
    /// "iommufd, cdev /dev/vfio/devices/vfio0, IOAS 2".
    public internal(set) var openedThrough = ""

    /// Open a PCI device bound to vfio-pci by its address, as QEMU's
    /// `-device vfio-pci,host=0000:00:04.0[,iommufd=...]`.
    public static func open(pciAddress: String, backend: Backend) throws -> AssignedKernelDevice {
        try open(sysfsPath: "/sys/bus/pci/devices/\(pciAddress)", backend: backend)
    }

    /// Open a VFIO device by its sysfs path (a PCI device or an mdev, as QEMU's `sysfsdev=`):
    /// legacy: its IOMMU group in a new type1 container; iommufd: its cdev bound to a new
    /// iommufd and attached to a new IOAS. Nothing is mapped yet. Every refusal names its
    /// cause and the fix (`KernelDeviceDiagnosis`): the host's state is checked first, so
    /// the kernel's bare errno is only the last resort.
    public static func open(sysfsPath: String, backend: Backend) throws -> AssignedKernelDevice {
        let d = try KernelDeviceDiagnosis(sysfsPath: sysfsPath, backend: backend)
        switch backend {
        case .legacy:
            let group = d.group!
            try d.checkOpenable("/dev/vfio/vfio", what: "the VFIO container device")
            try d.checkOpenable("/dev/vfio/\(group)", what: "VFIO group \(group) (\(d.name)'s)")
            let container = try Container()
            // Opened here rather than by Group(id:): its errno (EBUSY: another process has the
            // group) is the message.
            let graw = Glibc.open("/dev/vfio/\(group)", O_RDWR | O_CLOEXEC)
            guard graw >= 0 else { throw d.explain(Errno.current, doing: "opening /dev/vfio/\(group)") }
            let g = Group(id: group, adopting: FileDescriptor(adopting: graw))
            guard g.isViable else { throw KernelVFIOError.unavailable(d.notViable()) }
            do { try g.setContainer(container) } catch { throw d.explain(error, doing: "joining VFIO group \(group) to a container") }
            try container.setIOMMU()
            let device: KernelDevice
            do { device = try g.device(d.name) } catch { throw d.explain(error, doing: "getting the device fd from VFIO group \(group)") }
            let a = AssignedKernelDevice(device: device, dmaSpace: .container(container), keepAlive: [g])
            a.openedThrough = "legacy type1 container, VFIO group \(group)"
            return a
        case .iommufd:
            let path = try d.cdev()
            try d.checkOpenable(path, what: "\(d.name)'s VFIO device cdev")
            try d.checkOpenable("/dev/iommu", what: "the iommufd device")
            let raw = Glibc.open(path, O_RDWR | O_CLOEXEC)
            guard raw >= 0 else { throw d.explain(KernelVFIOError.unavailable("cannot open \(path): \(Errno.current)"), doing: "opening \(path)") }
            let device = KernelDevice(name: d.name, fd: FileDescriptor(adopting: raw))
            let iommufd = try IOMMUFD()
            let devid: UInt32
            do { devid = try device.bind(iommufd) } catch { throw d.explain(error, doing: "binding \(path) to an iommufd") }
            let ioas = try iommufd.allocateIOAS()
            // On a dirty-tracking HWPT when the IOMMU has a dirty bit, else on the IOAS (HWPT.swift).
            let att = try IOMMUFDAttachment.attach(deviceID: devid, name: d.name, iommufd: iommufd, ioas: ioas) { try device.attach(pageTable: $0) }
            let a = AssignedKernelDevice(device: device, dmaSpace: .iommufd(iommufd, ioas: ioas), iommufdAttachment: att)
            a.openedThrough = "iommufd, cdev \(path), IOAS \(ioas)"
            a.iommufdIDs = (devid, att.pageTableID)
            return a
        }
    }

    /// A live update's successor: the device as its predecessor attached it, with the
    /// attachment rebuilt from the CPR record's ids (`IOMMUFDAttachment.adopted`), so its HWPT
    /// dirty tracker comes along and the VM can migrate later with IOMMU dirty tracking.
    public static func adopted(device: KernelDevice, iommufd: IOMMUFD, deviceID: UInt32, ioas: UInt32, pageTableID: UInt32) -> AssignedKernelDevice {
        let att = IOMMUFDAttachment.adopted(deviceID: deviceID, name: device.name, iommufd: iommufd, ioas: ioas, pageTableID: pageTableID)
        let a = AssignedKernelDevice(device: device, dmaSpace: .iommufd(iommufd, ioas: ioas), iommufdAttachment: att)
        a.iommufdIDs = (deviceID, pageTableID)
        return a
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
            guard let a = iommufdAttachment else { return "device \(device.name) was not attached through IOMMUFDAttachment" }
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
    public func preCopyInfo() throws -> (initialBytes: UInt64, dirtyBytes: UInt64)? { try device.preCopyInfo() }
    public func resetDevice() throws { try device.reset() }
}

/// What the host says about a device before VFIO is asked, so that a refusal names its cause
/// and the fix (a bad address, no VFIO or IOMMUFD in the kernel, no IOMMU, the wrong driver, a
/// group that is not viable, no permission, a device another process holds) rather than a
/// bare errno from an ioctl.
struct KernelDeviceDiagnosis {
    let path: String, name: String
    let backend: AssignedKernelDevice.Backend
    /// "pci" or "mdev" (the device's sysfs subsystem).
    let subsystem: String?
    let group: Int?
    var isPCI: Bool { subsystem == "pci" }
    var kind: String { subsystem == "mdev" ? "mediated device" : (isPCI ? "PCI device" : "device") }

    init(sysfsPath: String, backend: AssignedKernelDevice.Backend) throws {
        var p = sysfsPath
        while p.count > 1 && p.hasSuffix("/") { p.removeLast() }
        path = p
        name = p.split(separator: "/").last.map(String.init) ?? p
        self.backend = backend
        guard !name.isEmpty, access(p, F_OK) == 0 else {
            if p.hasPrefix("/sys/bus/pci/devices/") {
                throw KernelVFIOError.unavailable("no PCI device \(name) on this host (\(p) does not exist): `lspci -D` lists the addresses (DDDD:BB:DD.F)")
            }
            if p.hasPrefix("/sys/bus/mdev/devices/") {
                throw KernelVFIOError.unavailable("no mediated device \(name) (\(p) does not exist): create one by writing a UUID to /sys/class/mdev_bus/PARENT/mdev_supported_types/TYPE/create (ls /sys/class/mdev_bus lists the parents)")
            }
            throw KernelVFIOError.unavailable("no device at \(p): sysfsdev= takes a device's sysfs directory (/sys/bus/pci/devices/DDDD:BB:DD.F or /sys/bus/mdev/devices/UUID)")
        }
        subsystem = PCIDevice.linkName("\(p)/subsystem")
        guard let sub = subsystem, sub == "pci" || sub == "mdev" else {
            throw KernelVFIOError.unavailable("\(p) is not a PCI or mediated device's sysfs directory (its subsystem is \(subsystem ?? "none")): sysfsdev= takes /sys/bus/pci/devices/DDDD:BB:DD.F or /sys/bus/mdev/devices/UUID")
        }
        switch backend {
        case .legacy:
            guard access("/dev/vfio/vfio", F_OK) == 0 else {
                throw KernelVFIOError.unavailable("no /dev/vfio/vfio: this kernel has no VFIO loaded (modprobe vfio-pci; CONFIG_VFIO), or /dev is not devtmpfs")
            }
        case .iommufd:
            guard access("/dev/iommu", F_OK) == 0 else {
                throw KernelVFIOError.unavailable("no /dev/iommu: this kernel has no IOMMUFD (modprobe iommufd; CONFIG_IOMMUFD): use the legacy container instead (iommufd=off)")
            }
        }
        group = PCIDevice.linkName("\(p)/iommu_group").flatMap { Int($0) }
        if group == nil {
            if sub == "mdev" { throw KernelVFIOError.unavailable("mediated device \(name) has no IOMMU group: its parent driver did not register it with VFIO") }
            throw KernelVFIOError.unavailable("\(name) has no IOMMU group: this host runs without an IOMMU (turn VT-d / AMD-Vi on in the firmware and boot with intel_iommu=on or amd_iommu=on), so VFIO cannot assign it")
        }
        if sub == "pci" {
            let driver = PCIDevice.linkName("\(p)/driver")
            if !Self.isVFIODriver(driver) { throw KernelVFIOError.unavailable(Self.notBound(name, path: p, driver: driver)) }
        }
    }

    /// vfio-pci, or a vendor's variant driver built on it (mlx5_vfio_pci, hisi_acc_vfio_pci, ...).
    static func isVFIODriver(_ d: String?) -> Bool { d.map { $0 == "vfio-pci" || $0.hasSuffix("vfio_pci") || $0.hasSuffix("vfio-pci") } ?? false }

    static func notBound(_ name: String, path: String, driver: String?) -> String {
        var s = "\(name) is bound to \(driver.map { "the \($0) driver" } ?? "no driver"), not to vfio-pci: hand it to vfio-pci (as root) with\n"
        s += "    echo vfio-pci > \(path)/driver_override\n"
        if driver != nil { s += "    echo \(name) > \(path)/driver/unbind\n" }
        s += "    echo \(name) > /sys/bus/pci/drivers_probe"
        return s
    }

    /// Not there, or not ours to open (a root-only node, a device cgroup).
    func checkOpenable(_ node: String, what: String) throws {
        if access(node, F_OK) != 0 {
            throw KernelVFIOError.unavailable("no \(node) (\(what)) although \(name) is in IOMMU group \(group ?? -1): is it bound to a VFIO driver, and /dev a devtmpfs?")
        }
        if access(node, R_OK | W_OK) != 0 { throw KernelVFIOError.unavailable(permission(node, what: what, Errno.current)) }
    }

    func permission(_ node: String, what: String, _ e: Errno) -> String {
        "permission denied opening \(node) (\(what)): \(e): run as root, or give this user the node (chown USER \(node)) and let it lock guest RAM in memory (ulimit -l), as QEMU needs for VFIO too"
    }

    /// The devices of the group that keep it from being viable: bound to a driver other than
    /// a VFIO one (pcieport and pci-stub are allowed by the kernel).
    func blockingDevices() -> [(String, String)] {
        guard let g = group, let members = directoryEntryNames("/sys/kernel/iommu_groups/\(g)/devices") else { return [] }
        var out: [(String, String)] = []
        for n in members {
            guard n != name else { continue }
            guard let d = PCIDevice.linkName("/sys/kernel/iommu_groups/\(g)/devices/\(n)/driver"),
                  !Self.isVFIODriver(d), d != "pcieport", d != "pci-stub" else { continue }
            out.append((n, d))
        }
        return out.sorted { $0.0 < $1.0 }
    }

    func notViable() -> String {
        let g = group ?? -1
        let others = blockingDevices()
        guard !others.isEmpty else {
            return "VFIO group \(g) is not viable: a device in it is bound to a driver other than vfio-pci (ls /sys/kernel/iommu_groups/\(g)/devices)"
        }
        return "VFIO group \(g) is not viable: every device in it must be bound to vfio-pci (or to no driver), and "
            + others.map { "\($0.0) is bound to \($0.1)" }.joined(separator: ", ")
            + ": hand each to vfio-pci with driver_override as for \(name), or unbind it (echo ADDR > /sys/bus/pci/devices/ADDR/driver/unbind)"
    }

    /// A kernel refusal, explained by its errno.
    func explain(_ error: Error, doing: String) -> Error {
        let e: Errno?
        switch error {
        case let KernelVFIOError.ioctl(_, x): e = x
        case let x as Errno: e = x
        default: e = nil
        }
        switch e {
        case .EBUSY?:
            return KernelVFIOError.unavailable("\(doing): \(name) is in use (EBUSY): another process (another VMM) holds it or a device of its IOMMU group")
        case .EPERM?, .EACCES?:
            return KernelVFIOError.unavailable("\(doing): \(permission(doing, what: name, e!))")
        case .EINVAL? where doing.contains("container"):
            return KernelVFIOError.unavailable("\(doing): EINVAL: \(notViable())")
        default:
            return KernelVFIOError.unavailable("\(doing) for \(name): \(error)")
        }
    }

    /// The VFIO device cdev (/dev/vfio/devices/vfioN) of a device bound to a VFIO driver.
    func cdev() throws -> String {
        guard let entries = directoryEntryNames("\(path)/vfio-dev") else {
            throw KernelVFIOError.unavailable("\(name) has no VFIO device cdev (\(path)/vfio-dev): this kernel lacks CONFIG_VFIO_DEVICE_CDEV: use the legacy container (iommufd=off)")
        }
        if let n = entries.first(where: { $0.hasPrefix("vfio") }) { return "/dev/vfio/devices/\(n)" }
        throw KernelVFIOError.unavailable("\(name): \(path)/vfio-dev lists no cdev")
    }
}

extension IOMMUFDAttachment {
    /// The attachment a live update's predecessor made, from the ids its CPR record carries,
    /// with no BIND, ATTACH or HWPT_ALLOC (the kernel keeps the device on that page table).
    /// A device on the IOAS itself (an emulated one: mdev) has no HWPT of its own. Otherwise
    /// the page table is a HWPT, either the dirty-tracking one the predecessor allocated or the
    /// kernel's automatic domain; IOMMU_HWPT_SET_DIRTY_TRACKING(off) tells them apart without
    /// changing anything (no migration runs across a live update, so tracking is off; only
    /// enabling clears the IOMMU's bits), as the kernel refuses it on a domain without a dirty bit.
    public static func adopted(deviceID: UInt32, name: String, iommufd: IOMMUFD, ioas: UInt32, pageTableID: UInt32) -> IOMMUFDAttachment {
        guard pageTableID != ioas else {
            return IOMMUFDAttachment(deviceID: deviceID, ioas: ioas, pageTableID: pageTableID, tracker: nil,
                                     trackerUnavailable: "\(name) is attached to IOAS \(ioas) itself (no HWPT of its own, as its predecessor attached it): no IOMMU dirty tracking")
        }
        let hwpt = HWPT(adopting: pageTableID, iommufd: iommufd, ioas: ioas, dirtyTrackingCapable: true)
        do {
            try hwpt.setDirtyTracking(false)
            return IOMMUFDAttachment(deviceID: deviceID, ioas: ioas, pageTableID: pageTableID, tracker: try HWPTDirtyTracker(hwpt: hwpt), trackerUnavailable: nil)
        } catch {
            return IOMMUFDAttachment(deviceID: deviceID, ioas: ioas, pageTableID: pageTableID, tracker: nil,
                                     trackerUnavailable: "the page table \(name) was handed over on (HWPT \(pageTableID)) has no dirty tracking: \(error)")
        }
    }
}
