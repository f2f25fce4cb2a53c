import Glibc
import KernelVFIO
import Migration
import SystemCalls

/// A legacy VFIO container, its group and device, carried across a live update. Guest RAM
/// keeps its pages and the IOMMU its translations and pins; only the virtual addresses change:
/// VFIO_DMA_UNMAP_FLAG_VADDR|ALL before the handover, VFIO_DMA_MAP_FLAG_VADDR with the new
/// addresses after it (or with the old ones again when the handover fails).
public final class LegacyContainerCPR: CPRParticipant {
    public let container: Container
    public let group: Group
    public let device: KernelDevice
    /// Guest RAM in this process: each mapping is recorded as an offset in its memfd.
    public let memoryBase: UnsafeMutableRawPointer
    public let memorySize: UInt64
    private var invalidated = false
    /// Fault injection (tests): fail the freeze after invalidating, as a partial UNMAP_ALL would.
    public var failFreezeForTesting = false

    public init(container: Container, group: Group, device: KernelDevice, memoryBase: UnsafeMutableRawPointer, memorySize: UInt64) {
        self.container = container; self.group = group; self.device = device
        self.memoryBase = memoryBase; self.memorySize = memorySize
    }

    public static let recordName = "vfio-container"
    /// QEMU's names: the container is saved once per group, with the group number as id.
    public static let containerName = "vfio_container_for_group"
    public static let groupName = "vfio_group"

    public func cprBlocker() -> String? {
        if let b = container.liveUpdateBlocker { return b }
        let base = UInt64(UInt(bitPattern: memoryBase))
        for m in container.mappings where m.vaddr < base || m.vaddr + m.size > base + memorySize {
            return "VFIO mapping at IOVA \(hex(m.iova)) is not in guest RAM (only memfd-backed RAM can be handed over)"
        }
        return nil
    }

    public func cprSave(into s: inout CPRState) throws {
        s.save(Self.containerName, id: Int32(group.id), container.fd)
        s.save(Self.groupName, id: Int32(group.id), group.fd)
        s.save(device.name, id: 0, device.fd)
        var w = BEWriter()
        w.u32(UInt32(group.id)); w.u16(UInt16(device.name.utf8.count)); w.append(Array(device.name.utf8))
        w.u32(UInt32(container.mappings.count))
        let base = UInt64(UInt(bitPattern: memoryBase))
        for m in container.mappings { w.u64(m.iova); w.u64(m.size); w.u64(m.vaddr - base); w.u32(m.writable ? 1 : 0) }
        s.saveRecord(Self.recordName, w.bytes)
    }

    public func cprFreeze() throws {
        try container.invalidateVirtualAddresses()
        invalidated = true
        if failFreezeForTesting { throw CPRError.channel("injected failure after VFIO_DMA_UNMAP_FLAG_VADDR") }
    }

    /// Recovery: give every mapping its address in this process back (the ones UNMAP_ALL did
    /// not reach answer EEXIST and are left as they are).
    public func cprThaw() {
        guard invalidated else { return }
        invalidated = false
        let failed = container.restoreVirtualAddresses { m in UnsafeMutableRawPointer(bitPattern: UInt(m.vaddr))! }
        for (m, e) in failed { Log.error("cpr", "restoring the address of VFIO mapping at IOVA \(hex(m.iova)) failed: \(e)") }
    }

    /// The new process: take the container, group and device as configured (no SET_CONTAINER,
    /// no SET_IOMMU, no device reset) and attach guest RAM's new address to every mapping.
    public static func adopt(_ s: CPRState, memoryBase: UnsafeMutableRawPointer, memorySize: UInt64) throws -> (Container, Group, KernelDevice) {
        guard let rec = s.record(recordName) else { throw CPRError.malformed("no \(recordName) record") }
        var r = BEReader(rec[...])
        guard let g = r.u32(), let n = r.u16(), let nameBytes = r.bytes(Int(n)), let count = r.u32(), count <= 4096 else {
            throw CPRError.malformed("\(recordName) record truncated")
        }
        let name = String(decoding: nameBytes, as: UTF8.self)
        guard let cfd = s.find(containerName, id: Int32(g)), let gfd = s.find(groupName, id: Int32(g)), let dfd = s.find(name, id: 0) else {
            throw CPRError.malformed("the container, group \(g) or device \(name) descriptor is missing")
        }
        var maps: [Container.Mapping] = []
        let base = UInt64(UInt(bitPattern: memoryBase))
        for _ in 0..<count {
            guard let iova = r.u64(), let size = r.u64(), let off = r.u64(), let w = r.u32() else { throw CPRError.malformed("\(recordName) mapping truncated") }
            guard off < memorySize, size <= memorySize - off else { throw CPRError.malformed("mapping at IOVA \(hex(iova)) lies outside guest RAM") }
            maps.append(.init(iova: iova, size: size, vaddr: base + off, writable: w != 0))
        }
        let container = Container(adopting: cfd, mappings: maps)
        let failed = container.restoreVirtualAddresses { m in UnsafeMutableRawPointer(bitPattern: UInt(m.vaddr))! }
        if let (m, e) = failed.first {
            throw CPRError.malformed("VFIO_DMA_MAP_FLAG_VADDR for IOVA \(hex(m.iova)) failed: \(e)")
        }
        return (container, Group(id: Int(g), adopting: gfd), KernelDevice(name: name, fd: dfd))
    }
}

/// An iommufd and a device bound to it through its cdev, carried across a live update. The
/// mappings were made by file (IOMMU_IOAS_MAP_FILE), so they do not depend on any address;
/// the new process only calls IOMMU_IOAS_CHANGE_PROCESS.
public final class IOMMUFDCPR: CPRParticipant {
    public let iommufd: IOMMUFD
    public let device: KernelDevice
    public let deviceID: UInt32, ioasID: UInt32, hwptID: UInt32

    public init(iommufd: IOMMUFD, device: KernelDevice, deviceID: UInt32, ioasID: UInt32, hwptID: UInt32) {
        self.iommufd = iommufd; self.device = device; self.deviceID = deviceID; self.ioasID = ioasID; self.hwptID = hwptID
    }

    public static let iommufdName = "iommufd0"
    public static let recordName = "vfio-iommufd-device"

    public func cprBlocker() -> String? { iommufd.liveUpdateBlocker }

    public func cprSave(into s: inout CPRState) throws {
        s.save(Self.iommufdName, id: 0, iommufd.fd)
        s.save(device.name, id: 0, device.fd)
        var w = BEWriter()
        w.u16(UInt16(device.name.utf8.count)); w.append(Array(device.name.utf8))
        w.u32(deviceID); w.u32(ioasID); w.u32(hwptID)
        s.saveRecord(Self.recordName, w.bytes)
    }

    public func cprFreeze() throws {}
    public func cprThaw() {}

    /// The new process: no BIND, no ATTACH, no HWPT_ALLOC; the pinned pages move to it.
    public static func adopt(_ s: CPRState) throws -> (IOMMUFD, KernelDevice, deviceID: UInt32, ioasID: UInt32, hwptID: UInt32) {
        guard let rec = s.record(recordName) else { throw CPRError.malformed("no \(recordName) record") }
        var r = BEReader(rec[...])
        guard let n = r.u16(), let nb = r.bytes(Int(n)), let dev = r.u32(), let ioas = r.u32(), let hwpt = r.u32() else {
            throw CPRError.malformed("\(recordName) record truncated")
        }
        let name = String(decoding: nb, as: UTF8.self)
        guard let ifd = s.find(iommufdName), let dfd = s.find(name) else { throw CPRError.malformed("the iommufd or device \(name) descriptor is missing") }
        let i = IOMMUFD(adopting: ifd)
        do { try i.changeProcess() } catch { throw CPRError.malformed("IOMMU_IOAS_CHANGE_PROCESS fd \(ifd.rawValue) failed: \(error)") }
        return (i, KernelDevice(name: name, fd: dfd), dev, ioas, hwpt)
    }
}
