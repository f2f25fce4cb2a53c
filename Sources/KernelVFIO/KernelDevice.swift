import CVFIOLive
import Glibc
import SystemCalls
import VFIO

func irqSet(argsz: Int, flags: UInt32, index: UInt32, start: UInt32, count: UInt32) -> vfio_irq_set {
    var s = vfio_irq_set()
    s.argsz = UInt32(argsz); s.flags = flags; s.index = index; s.start = start; s.count = count
    return s
}

/// A device assigned through kernel VFIO (its fd from a group or a cdev): regions, IRQs,
/// reset, and migration v2 through VFIO_DEVICE_FEATURE — the same `MigrationDeviceHandle`
/// the vfio-user client implements, so migration code does not care about the transport.
public final class KernelDevice: MigrationDeviceHandle, @unchecked Sendable {
    public let name: String
    public let fd: FileDescriptor
    private var dataFD: FileDescriptor?

    public init(name: String, fd: FileDescriptor) { self.name = name; self.fd = fd }

    public struct Info: Sendable { public var flags: UInt32, regions: UInt32, irqs: UInt32 }
    public struct RegionInfo: Sendable {
        public var index: UInt32, flags: UInt32, size: UInt64, offset: UInt64
        public var capsOffset: UInt32
        public var canMmap: Bool { flags & VFIO_REGION_INFO_FLAG_MMAP != 0 }
    }

    public func info() throws -> Info {
        var i = vfio_device_info()
        i.argsz = UInt32(MemoryLayout<vfio_device_info>.size)
        _ = try check("\(name): VFIO_DEVICE_GET_INFO") { try fd.ioctl(VL_VFIO_DEVICE_GET_INFO, &i) }
        return Info(flags: i.flags, regions: i.num_regions, irqs: i.num_irqs)
    }

    /// Region info with its capability chain (the bytes after the struct, when present).
    public func regionInfo(_ index: UInt32) throws -> (RegionInfo, [UInt8]) {
        var argsz = UInt32(MemoryLayout<vfio_region_info>.size)
        for _ in 0..<2 {
            var buf = [UInt8](repeating: 0, count: Int(argsz))
            let r = try buf.withUnsafeMutableBytes { b -> vfio_region_info in
                b.storeBytes(of: argsz, toByteOffset: 0, as: UInt32.self)
                b.storeBytes(of: index, toByteOffset: 8, as: UInt32.self)
                _ = try check("\(name): VFIO_DEVICE_GET_REGION_INFO(\(index))") { try fd.ioctl(VL_VFIO_DEVICE_GET_REGION_INFO, b.baseAddress) }
                return b.load(as: vfio_region_info.self)
            }
            if r.argsz > argsz && r.argsz <= 64 * 1024 { argsz = r.argsz; continue }
            return (RegionInfo(index: index, flags: r.flags, size: r.size, offset: r.offset, capsOffset: r.cap_offset), buf)
        }
        throw KernelVFIOError.invalid("\(name): region \(index) info did not settle")
    }

    public func read(region: RegionInfo, offset: UInt64, into b: UnsafeMutableRawBufferPointer) throws {
        guard offset + UInt64(b.count) <= region.size else { throw KernelVFIOError.invalid("\(name): read past region \(region.index)") }
        let n = try fd.pread(into: b, offset: region.offset + offset)
        guard n == b.count else { throw KernelVFIOError.invalid("\(name): short region read (\(n) of \(b.count))") }
    }

    public func write(region: RegionInfo, offset: UInt64, _ b: UnsafeRawBufferPointer) throws {
        guard offset + UInt64(b.count) <= region.size else { throw KernelVFIOError.invalid("\(name): write past region \(region.index)") }
        let n = try fd.pwrite(b, offset: region.offset + offset)
        guard n == b.count else { throw KernelVFIOError.invalid("\(name): short region write (\(n) of \(b.count))") }
    }

    /// One register of any width (little-endian, as PCI is).
    public func read<T: FixedWidthInteger>(_ r: RegionInfo, _ off: UInt64, as _: T.Type = T.self) throws -> T {
        var v = T.zero
        try withUnsafeMutableBytes(of: &v) { try read(region: r, offset: off, into: $0) }
        return T(littleEndian: v)
    }
    public func write<T: FixedWidthInteger>(_ r: RegionInfo, _ off: UInt64, _ v: T) throws {
        var x = v.littleEndian
        try withUnsafeBytes(of: &x) { try write(region: r, offset: off, $0) }
    }

    /// mmap a region the kernel allows to be mapped (a BAR).
    public func map(_ r: RegionInfo) throws -> MappedRegion {
        guard r.canMmap else { throw KernelVFIOError.invalid("\(name): region \(r.index) cannot be mmap'd") }
        return try MappedRegion(fd: fd, offset: r.offset, length: Int(r.size), writable: r.flags & VFIO_REGION_INFO_FLAG_WRITE != 0)
    }

    /// PCI config space is region 7 (VFIO_PCI_CONFIG_REGION_INDEX). A device DMAs only with
    /// memory decoding and bus mastering on in its command register.
    public static let configRegion: UInt32 = 7

    public func enableBusMaster() throws {
        let cfg = try regionInfo(Self.configRegion).0
        let cmd = try read(cfg, 4, as: UInt16.self)
        guard cmd & 0x6 != 0x6 else { return }
        try write(cfg, 4, cmd | 0x6)
    }

    // MARK: interrupts

    public func irqCount(_ index: UInt32) throws -> UInt32 {
        var i = vfio_irq_info(argsz: UInt32(MemoryLayout<vfio_irq_info>.size), flags: 0, index: index, count: 0)
        _ = try check("\(name): VFIO_DEVICE_GET_IRQ_INFO(\(index))") { try fd.ioctl(VL_VFIO_DEVICE_GET_IRQ_INFO, &i) }
        return i.count
    }

    /// Trigger eventfds for vectors [start, start+count) of IRQ `index` (INTx 0, MSI 1, MSI-X 2).
    public func setIRQs(index: UInt32, start: UInt32 = 0, eventfds: [EventFD]) throws {
        let head = MemoryLayout<vfio_irq_set>.size
        var buf = [UInt8](repeating: 0, count: head + 4 * eventfds.count)
        _ = try buf.withUnsafeMutableBytes { b in
            b.storeBytes(of: irqSet(argsz: b.count, flags: VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER, index: index,
                                    start: start, count: UInt32(eventfds.count)), toByteOffset: 0, as: vfio_irq_set.self)
            for (i, e) in eventfds.enumerated() { b.storeBytes(of: e.fd.rawValue, toByteOffset: head + 4 * i, as: Int32.self) }
            return try check("\(name): VFIO_DEVICE_SET_IRQS(\(index))") { try fd.ioctl(VL_VFIO_DEVICE_SET_IRQS, b.baseAddress) }
        }
    }

    public func disableIRQs(index: UInt32) throws {
        var s = irqSet(argsz: MemoryLayout<vfio_irq_set>.size, flags: VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER,
                       index: index, start: 0, count: 0)
        _ = try check("\(name): VFIO_DEVICE_SET_IRQS(\(index), off)") { try fd.ioctl(VL_VFIO_DEVICE_SET_IRQS, &s) }
    }

    public func reset() throws { _ = try check("\(name): VFIO_DEVICE_RESET") { try fd.ioctl(VL_VFIO_DEVICE_RESET, value: 0) } }

    // MARK: VFIO_DEVICE_FEATURE and migration v2

    /// One DEVICE_FEATURE call; `data` is the payload after the 8-byte header, updated in place.
    @discardableResult
    public func feature(_ feature: UInt32, flags: UInt32, data: inout [UInt8]) throws -> Int32 {
        var buf = [UInt8](repeating: 0, count: 8 + data.count)
        let rc = try buf.withUnsafeMutableBytes { b -> Int32 in
            b.storeBytes(of: UInt32(b.count), toByteOffset: 0, as: UInt32.self)
            b.storeBytes(of: feature | flags, toByteOffset: 4, as: UInt32.self)
            data.withUnsafeBytes { d in if d.count > 0 { (b.baseAddress! + 8).copyMemory(from: d.baseAddress!, byteCount: d.count) } }
            return try fd.ioctl(VL_VFIO_DEVICE_FEATURE, b.baseAddress)
        }
        data = Array(buf[8...])
        return rc
    }

    public func migrationCapabilities() throws -> MigrationCapabilities? {
        var d = [UInt8](repeating: 0, count: 8)
        do { try feature(UInt32(VFIO_DEVICE_FEATURE_MIGRATION), flags: VFIO_DEVICE_FEATURE_GET, data: &d) } catch let e as Errno where e == .ENOTTY || e == .EINVAL || e == Errno(EOPNOTSUPP) {
            return nil
        }
        return MigrationCapabilities(rawValue: d.withUnsafeBytes { $0.load(as: UInt64.self) })
    }

    public func migrationState() throws -> MigrationState {
        var d = [UInt8](repeating: 0, count: 8)
        try feature(UInt32(VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE), flags: VFIO_DEVICE_FEATURE_GET, data: &d)
        let raw = d.withUnsafeBytes { $0.load(as: UInt32.self) }
        guard let s = MigrationState(rawValue: raw) else { throw KernelVFIOError.invalid("\(name): unknown migration state \(raw)") }
        return s
    }

    /// One arc of the state machine. STOP_COPY→PRE_COPY is never requested: the kernel would
    /// loop on it. The data fd the kernel returns for a saving or resuming state is kept.
    public func setMigrationState(_ s: MigrationState) throws {
        if s == .preCopy || s == .preCopyP2P, (try? migrationState()) == .stopCopy {
            throw KernelVFIOError.invalid("\(name): STOP_COPY→\(s) is refused (the kernel loops on it)")
        }
        var d = [UInt8](repeating: 0, count: 8)
        d.withUnsafeMutableBytes { $0.storeBytes(of: s.rawValue, as: UInt32.self); $0.storeBytes(of: Int32(-1), toByteOffset: 4, as: Int32.self) }
        try feature(UInt32(VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE), flags: VFIO_DEVICE_FEATURE_SET, data: &d)
        let dataFD = d.withUnsafeBytes { $0.load(fromByteOffset: 4, as: Int32.self) }
        if dataFD >= 0 { self.dataFD?.close(); self.dataFD = FileDescriptor(adopting: dataFD) }
        // States without a data session end the one held (RUNNING_P2P ends PRE_COPY_P2P's).
        if s == .running || s == .stop || s == .runningP2P || s == .error { self.dataFD?.close(); self.dataFD = nil }
    }

    /// Up to `max` bytes of the saving stream. In PRE_COPY the kernel answers ENOMSG when the
    /// pre-copy data is drained for now; QEMU (vfio_save_block) reads that as 0, and so do we.
    public func readMigrationData(max: Int) throws -> [UInt8] {
        guard let d = dataFD else { throw KernelVFIOError.invalid("\(name): no migration data fd (not saving)") }
        var b = [UInt8](repeating: 0, count: max)
        let n: Int
        do { n = try b.withUnsafeMutableBytes { try d.read(into: $0) } } catch let e as Errno where e == Errno(ENOMSG) {
            return []
        }
        return Array(b[0..<n])
    }

    /// VFIO_MIG_GET_PRECOPY_INFO on the data fd: the initial image still to read, and what the
    /// device dirtied since (both estimates, the kernel's words). Valid in PRE_COPY and
    /// PRE_COPY_P2P only; nil when there is no saving session.
    public func preCopyInfo() throws -> (initialBytes: UInt64, dirtyBytes: UInt64)? {
        guard let d = dataFD else { return nil }
        var info = vfio_precopy_info()
        info.argsz = UInt32(MemoryLayout<vfio_precopy_info>.size)
        _ = try check("\(name): VFIO_MIG_GET_PRECOPY_INFO") { try d.ioctl(VL_VFIO_MIG_GET_PRECOPY_INFO, &info) }
        return (info.initial_bytes, info.dirty_bytes)
    }

    public func writeMigrationData(_ data: UnsafeRawBufferPointer) throws {
        guard let d = dataFD else { throw KernelVFIOError.invalid("\(name): no migration data fd (not resuming)") }
        try d.writeAll(data)
    }

    public func migrationDataSize() throws -> UInt64 {
        var d = [UInt8](repeating: 0, count: 8)
        try feature(UInt32(VFIO_DEVICE_FEATURE_MIG_DATA_SIZE), flags: VFIO_DEVICE_FEATURE_GET, data: &d)
        return d.withUnsafeBytes { $0.load(as: UInt64.self) }
    }

    public func resetDevice() throws { try reset() }

    /// Whether the device logs its own DMA (DMA_LOGGING_START answers a PROBE).
    public var supportsDMALogging: Bool {
        var d: [UInt8] = []
        return (try? feature(UInt32(VFIO_DEVICE_FEATURE_DMA_LOGGING_START), flags: VFIO_DEVICE_FEATURE_PROBE | VFIO_DEVICE_FEATURE_SET, data: &d)) != nil
    }

    /// The v1 migration region, by its type capability (3/1), if the device has one.
    public func findRegion(type: UInt32, subtype: UInt32) throws -> (index: UInt32, size: UInt64)? {
        let n = try info().regions
        for i in 0..<n {
            guard let (r, buf) = try? regionInfo(i), r.flags & VFIO_REGION_INFO_FLAG_CAPS != 0 else { continue }
            var off = Int(r.capsOffset)
            while off > 0 && off + 16 <= buf.count {
                let id = buf.withUnsafeBytes { $0.load(fromByteOffset: off, as: UInt16.self) }
                if id == UInt16(VFIO_REGION_INFO_CAP_TYPE) {
                    let t = buf.withUnsafeBytes { $0.load(fromByteOffset: off + 8, as: UInt32.self) }
                    let st = buf.withUnsafeBytes { $0.load(fromByteOffset: off + 12, as: UInt32.self) }
                    if t == type && st == subtype { return (i, r.size) }
                }
                off = Int(buf.withUnsafeBytes { $0.load(fromByteOffset: off + 4, as: UInt32.self) })
            }
        }
        return nil
    }

    public func regionRead(_ index: UInt32, offset: UInt64, count: Int) throws -> [UInt8] {
        let (r, _) = try regionInfo(index)
        var b = [UInt8](repeating: 0, count: count)
        try b.withUnsafeMutableBytes { try read(region: r, offset: offset, into: $0) }
        return b
    }

    public func regionWrite(_ index: UInt32, offset: UInt64, _ data: [UInt8]) throws {
        let (r, _) = try regionInfo(index)
        try data.withUnsafeBytes { try write(region: r, offset: offset, $0) }
    }

    // MARK: the device cdev with iommufd

    /// VFIO_DEVICE_BIND_IOMMUFD; returns the device id in that iommufd.
    public func bind(_ iommufd: IOMMUFD) throws -> UInt32 {
        var b = vfio_device_bind_iommufd()
        b.argsz = UInt32(MemoryLayout<vfio_device_bind_iommufd>.size)
        b.iommufd = iommufd.fd.rawValue
        _ = try check("\(name): VFIO_DEVICE_BIND_IOMMUFD") { try fd.ioctl(VL_VFIO_DEVICE_BIND_IOMMUFD, &b) }
        return b.out_devid
    }

    /// Attach to an IOAS (or HWPT); returns the page table id the kernel attached.
    public func attach(pageTable id: UInt32) throws -> UInt32 {
        var a = vfio_device_attach_iommufd_pt(argsz: UInt32(MemoryLayout<vfio_device_attach_iommufd_pt>.size), flags: 0, pt_id: id, pasid: 0)
        _ = try check("\(name): VFIO_DEVICE_ATTACH_IOMMUFD_PT(\(id))") { try fd.ioctl(VL_VFIO_DEVICE_ATTACH_IOMMUFD_PT, &a) }
        return a.pt_id
    }

    public func detach() throws {
        var d = vfio_device_detach_iommufd_pt(argsz: UInt32(MemoryLayout<vfio_device_detach_iommufd_pt>.size), flags: 0, pasid: 0)
        _ = try check("\(name): VFIO_DEVICE_DETACH_IOMMUFD_PT") { try fd.ioctl(VL_VFIO_DEVICE_DETACH_IOMMUFD_PT, &d) }
    }
}
