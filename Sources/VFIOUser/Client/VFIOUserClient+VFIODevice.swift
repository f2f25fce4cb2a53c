import Glibc
import SystemCalls
import VFIO

/// The vfio-user client as the transport-neutral device a VMM drives. vfio-user reuses the
/// kernel's layouts, so this is mostly a translation of names.
extension VFIOUserClient: VFIODevice {
    public var transportName: String { "vfio-user" }
    public var callTimeoutMilliseconds: UInt64 { UInt64(max(options.timeoutMilliseconds, 0)) }

    /// The server's socket path (the connection's peer address), for messages. A server that
    /// bound under a temporary name and renamed it reports the old name: then only the fd.
    public var deviceName: String {
        let fd = connection.socket.fd.rawValue
        var a = sockaddr_un()
        var len = socklen_t(MemoryLayout<sockaddr_un>.size)
        let rc = withUnsafeMutablePointer(to: &a) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getpeername(fd, $0, &len) } }
        guard rc == 0, len > socklen_t(MemoryLayout<sa_family_t>.size) else { return "socket fd \(fd)" }
        let path = withUnsafeBytes(of: &a.sun_path) { b in String(decoding: b.prefix { $0 != 0 }, as: UTF8.self) }
        var st = stat()
        guard !path.isEmpty, stat(path, &st) == 0, st.st_mode & S_IFMT == S_IFSOCK else { return "socket fd \(fd)" }
        return path
    }

    public func describeDevice() throws -> VFIODeviceInfo {
        let i = try deviceInfo()
        return VFIODeviceInfo(flags: i.flags, regionCount: i.regionCount, irqCount: i.irqCount)
    }

    public func describeRegion(_ index: UInt32) throws -> VFIORegionInfo {
        let (r, fd) = try regionInfo(index)
        fd?.close()
        return VFIORegionInfo(index: r.index, readable: r.flags.contains(.read), writable: r.flags.contains(.write),
                              mappable: r.flags.contains(.mmap), size: r.size, offset: r.offset,
                              sparseAreas: r.sparseAreas?.map { .init(offset: $0.offset, size: $0.size) }, type: r.type)
    }

    public func describeIRQ(_ index: UInt32) throws -> VFIOIRQInfo {
        let i = try irqInfo(index)
        return VFIOIRQInfo(index: i.index, count: i.count, eventfd: i.flags.contains(.eventfd), maskable: i.flags.contains(.maskable),
                           automasked: i.flags.contains(.automasked), noresize: i.flags.contains(.noresize))
    }

    public func mapRegionAreas(_ index: UInt32) throws -> VFIORegionMapping? {
        let writable = try describeRegion(index).writable
        guard let m = try mapRegion(index) else { return nil }
        return VFIORegionMapping(index: index, areas: m.areas.map { .init(offset: $0.offset, size: $0.size, base: $0.memory.base, writable: writable) },
                                 owners: [m])
    }

    public func unmaskIRQ(index: UInt32, vector: UInt32) throws {
        _ = try call(.deviceSetIRQs, SetIRQsRequest(flags: [.dataNone, .actionUnmask], index: index, start: vector, count: 1).encode())
    }

    /// DMA_MAP, by fd when the region has one (the server mmaps guest RAM), else served by
    /// DMA_READ/DMA_WRITE messages from `host`.
    public func addDMAMapping(_ r: VFIODMARegion) throws {
        try mapDMA(iova: r.iova, size: r.size, local: r.host, fd: r.fd, offset: r.fdOffset, writable: r.writable)
    }

    public func removeDMAMapping(iova: UInt64, size: UInt64) throws {
        _ = try unmapDMA(iova: iova, size: size, dirtyPageSize: nil)
    }

    public var supportsDMALogging: Bool { probeFeature(DeviceFeature.dmaLoggingStart, get: false) }

    /// The connection: a server that dies hangs it up.
    public var lossWatchFD: Int32? { connection.socket.fd.rawValue }

    /// vfio-user has no IOMMU of its own: the server logs its DMA or nothing does.
    public var iommuDirtyTracker: VFIOIOMMUDirtyTracker? { nil }
}
