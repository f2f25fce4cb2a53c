import Glibc
import KernelVFIO
import Machine
import Migration
import SystemCalls
import VFIO
import VFIOUser

/// How a live update carries one attached device: the part of CPR where the transports really
/// differ (their descriptors and records, what must be frozen while no process holds the
/// device, and how the new VMM takes it without configuring anything). Everything else (guest
/// RAM, the interrupt eventfd, the attach result) is the same for every device and handled by
/// `LiveUpdateSource` / `LiveUpdateTarget` through the device interface.
public protocol CPRDeviceTransport: VFIODevice {
    /// The transport's name in the CPR state (record `dev<i>_transport`).
    static var cprTransport: String { get }
    /// Why this device cannot be live-updated (QEMU's blocker wording where it has one).
    func cprBlocker() -> String?
    /// Save the transport's descriptors and record for device `index` (guest still running;
    /// `memory` is guest RAM, against which DMA mappings are recorded as offsets).
    func cprSave(index: Int, memory: GuestMemory, into s: inout CPRState) throws
    /// The old VMM, vCPUs paused, just before the main stream (or exec): stop using the device.
    func cprFreeze() throws
    /// Undo `cprFreeze` after a failed handover: the old VMM drives the device again.
    func cprThaw()
}

extension CPRNames {
    public static func transport(_ i: Int) -> String { "dev\(i)_transport" }
    public static func attachment(_ i: Int) -> String { "dev\(i)_pci" }
}

// MARK: vfio-user

extension VFIOUserClient: CPRDeviceTransport {
    public static var cprTransport: String { "vfio-user" }
    public func cprBlocker() -> String? { handoverBlocker() }

    /// The socket, the twin socket and the handover record (VERSION reply, DMA mappings by fd
    /// offset, next message id): the server sees no change at all.
    public func cprSave(index i: Int, memory: GuestMemory, into s: inout CPRState) throws {
        s.save(CPRNames.device(i), connection.socket.fd)
        if let t = twinSocketFD { s.save(CPRNames.twinSocket(i), t) }
        s.saveRecord(CPRNames.device(i), handoverState().encode())
    }
    public func cprFreeze() throws {
        do { try releaseForHandoverInStep() } catch { throw CPRError.blocked("\(deviceName): \(error)") }
    }
    public func cprThaw() { reclaimAfterHandover() }
}

// MARK: kernel VFIO

/// The kernel device's CPR record (`dev<i>`), after QEMU's vmstate "vfio-container" (legacy)
/// and CprVFIODevice {name, devid, ioas_id, hwpt_id} (iommufd):
///
///     version u32 | backend u8 (0 legacy, 1 iommufd) | name u16+bytes
///     legacy:  group u32 | mappings u32 × {iova u64, size u64, offset in guest RAM u64, writable u8}
///     iommufd: devid u32 | ioas u32 | hwpt u32
///
/// Descriptors (QEMU's names): legacy `vfio_container_for_group`/group, `vfio_group`/group;
/// iommufd `iommufd`/index; the device fd under its own name (PCI address or mdev UUID), id 0.
public struct KernelDeviceCPRRecord: Equatable {
    public enum Backend: Equatable {
        case legacy(group: UInt32, mappings: [Mapping])
        case iommufd(device: UInt32, ioas: UInt32, hwpt: UInt32)
    }
    public struct Mapping: Equatable {
        public var iova: UInt64, size: UInt64, ramOffset: UInt64, writable: Bool
        public init(iova: UInt64, size: UInt64, ramOffset: UInt64, writable: Bool) {
            self.iova = iova; self.size = size; self.ramOffset = ramOffset; self.writable = writable
        }
    }
    public var name: String
    public var backend: Backend
    public static let maxMappings = 4096

    public func encode() -> [UInt8] {
        var w = BEWriter()
        w.u32(1)
        switch backend {
        case .legacy: w.append([0])
        case .iommufd: w.append([1])
        }
        let n = Array(name.utf8.prefix(CPRState.maxName))
        w.u16(UInt16(n.count)); w.append(n)
        switch backend {
        case let .legacy(g, maps):
            w.u32(g); w.u32(UInt32(maps.count))
            for m in maps { w.u64(m.iova); w.u64(m.size); w.u64(m.ramOffset); w.append([m.writable ? 1 : 0]) }
        case let .iommufd(d, ioas, hwpt):
            w.u32(d); w.u32(ioas); w.u32(hwpt)
        }
        return w.bytes
    }

    /// Decode and check against guest RAM's size (a mapping must lie inside it).
    public init(decoding b: [UInt8], ramSize: UInt64) throws {
        var r = BEReader(b[...])
        guard r.u32() == 1, let kind = r.bytes(1)?.first, let n = r.u16(), n > 0, n <= CPRState.maxName, let nb = r.bytes(Int(n)),
              let s = String(validating: nb, as: UTF8.self), !s.contains("/") else {
            throw CPRError.malformed("kernel VFIO device record: truncated, another version, or a bad device name")
        }
        name = s
        switch kind {
        case 0:
            guard let g = r.u32(), let count = r.u32(), count <= Self.maxMappings else {
                throw CPRError.malformed("\(s): legacy container record truncated or with too many mappings")
            }
            var maps: [Mapping] = []
            for _ in 0..<count {
                guard let iova = r.u64(), let size = r.u64(), let off = r.u64(), let w = r.bytes(1)?.first else {
                    throw CPRError.malformed("\(s): a DMA mapping is truncated")
                }
                guard size > 0, off < ramSize, size <= ramSize - off, iova &+ size > iova else {
                    throw CPRError.malformed("\(s): DMA mapping at IOVA \(hex(iova)) (+\(hex(size))) is not inside guest RAM")
                }
                maps.append(Mapping(iova: iova, size: size, ramOffset: off, writable: w != 0))
            }
            backend = .legacy(group: g, mappings: maps)
        case 1:
            guard let d = r.u32(), let ioas = r.u32(), let hwpt = r.u32() else { throw CPRError.malformed("\(s): iommufd record truncated") }
            backend = .iommufd(device: d, ioas: ioas, hwpt: hwpt)
        default:
            throw CPRError.malformed("\(s): unknown kernel VFIO backend \(kind)")
        }
        guard r.remaining == 0 else { throw CPRError.malformed("\(s): \(r.remaining) trailing bytes in its record") }
    }

    public init(name: String, backend: Backend) { self.name = name; self.backend = backend }
}

extension AssignedKernelDevice: CPRDeviceTransport {
    public static var cprTransport: String { "kernel" }
    public static let containerName = "vfio_container_for_group"
    public static let groupName = "vfio_group"
    public static let iommufdName = "iommufd"

    /// A mediated device (its name is an mdev UUID under /sys/bus/mdev/devices).
    public var isMediated: Bool { access("/sys/bus/mdev/devices/\(device.name)", F_OK) == 0 }

    /// QEMU's blockers (hw/vfio/cpr-legacy.c, cpr-iommufd.c), with the reason spelled out:
    /// - legacy: the container must support VFIO_UPDATE_VADDR and VFIO_UNMAP_ALL;
    /// - legacy mdev: "CPR does not support vfio mdev": a mediated device's vendor driver pins
    ///   guest pages by virtual address whenever it needs them, so its VA must always be valid,
    ///   and during the handover no process has one (a pin would block until the new VMM
    ///   restores it, or fail);
    /// - iommufd: IOMMU_IOAS_CHANGE_PROCESS must work (it fails if any mapping is not by file).
    ///   An mdev behind iommufd is fine: its pages come from the file, never from a VA.
    public func cprBlocker() -> String? {
        switch dmaSpace {
        case let .container(c):
            if isMediated {
                return "CPR does not support vfio mdev \(device.name) in a legacy VFIO container: a mediated device pins guest pages " +
                    "by virtual address at any time, so its VA must always be valid, and VFIO_DMA_UNMAP_FLAG_VADDR invalidates every " +
                    "VA for the handover (attach it with iommufd=on, whose mappings are by file)"
            }
            if let why = c.liveUpdateBlocker { return "\(device.name): \(why)" }
            if group == nil { return "\(device.name): its VFIO group is not known, so it cannot be handed over" }
            return nil
        case let .iommufd(i, _):
            if iommufdIDs == nil { return "\(device.name): its iommufd device and page table ids are not known, so it cannot be handed over" }
            return i.liveUpdateBlocker.map { "\(device.name): \($0) (some memory regions do not support IOMMU_IOAS_CHANGE_PROCESS)" }
        }
    }

    public func cprSave(index i: Int, memory: GuestMemory, into s: inout CPRState) throws {
        let backend: KernelDeviceCPRRecord.Backend
        switch dmaSpace {
        case let .container(c):
            guard let g = group else { throw CPRError.blocked("\(device.name): no VFIO group") }
            // QEMU saves the container once per group, under the group number.
            s.save(Self.containerName, id: Int32(g.id), c.fd)
            s.save(Self.groupName, id: Int32(g.id), g.fd)
            let ram = (base: UInt64(UInt(bitPattern: memory.base)), size: memory.size)
            var maps: [KernelDeviceCPRRecord.Mapping] = []
            for m in c.mappings {
                guard m.vaddr >= ram.base, m.vaddr - ram.base < ram.size, m.size <= ram.size - (m.vaddr - ram.base) else {
                    throw CPRError.blocked("VFIO mapping at IOVA \(hex(m.iova)) is not in guest RAM (only memfd-backed RAM can be handed over)")
                }
                maps.append(.init(iova: m.iova, size: m.size, ramOffset: m.vaddr - ram.base, writable: m.writable))
            }
            backend = .legacy(group: UInt32(g.id), mappings: maps)
        case let .iommufd(iommufd, ioas):
            guard let ids = iommufdIDs else { throw CPRError.blocked("\(device.name): no iommufd ids") }
            s.save(Self.iommufdName, id: Int32(i), iommufd.fd)
            backend = .iommufd(device: ids.device, ioas: ioas, hwpt: ids.hwpt)
        }
        s.save(device.name, id: 0, device.fd)
        s.saveRecord(CPRNames.device(i), KernelDeviceCPRRecord(name: device.name, backend: backend).encode())
    }

    /// Legacy: VFIO_DMA_UNMAP_FLAG_VADDR | ALL (QEMU's vfio-container pre_save). The IOVA →
    /// page translations and pins stay, so a DMA job in flight goes on into guest RAM. iommufd:
    /// nothing (mappings are by file; the new VMM moves the accounting with CHANGE_PROCESS).
    public func cprFreeze() throws {
        handedOverForCPR = true
        guard case let .container(c) = dmaSpace else { return }
        do { try c.invalidateVirtualAddresses() } catch { throw CPRError.channel("\(device.name): \(error)") }
    }

    /// Recovery (QEMU's "vfio cpr recover" on MIG_EVENT_PRECOPY_FAILED). Legacy: every mapping
    /// gets this process's address again, also one a successor already re-addressed before it
    /// died. iommufd: CHANGE_PROCESS back to this process (a no-op when it never moved).
    public func cprThaw() {
        handedOverForCPR = false
        switch dmaSpace {
        case let .container(c):
            // The recorded addresses are this process's own (a mapping whose address is valid
            // is invalidated and mapped again: harmless if UNMAP_ALL never reached it).
            let failed = c.restoreVirtualAddresses(takingBack: true) { m in UnsafeMutableRawPointer(bitPattern: UInt(m.vaddr))! }
            for (m, e) in failed { Log.error("cpr", "\(device.name): restoring the address of VFIO mapping at IOVA \(hex(m.iova)) failed: \(e)") }
        case let .iommufd(i, _):
            do { try i.changeProcess() } catch { Log.error("cpr", "\(device.name): taking the pinned pages back: \(error)") }
        }
    }

    /// The new VMM: take the device as its predecessor configured it. Nothing is opened, no
    /// SET_CONTAINER / SET_IOMMU / BIND / ATTACH / HWPT_ALLOC, no reset, no SET_IRQS (the
    /// kernel goes on signalling the handed-over eventfds). The mappings stay; `finish`
    /// attaches this process to them once the main stream is in (QEMU's post_load).
    static func cprAdopt(_ s: CPRState, index i: Int, memory: GuestMemory) throws -> (AssignedKernelDevice, finish: () throws -> Void) {
        guard let rec = s.record(CPRNames.device(i)) else { throw CPRError.malformed("device \(i): no kernel VFIO record") }
        let r = try KernelDeviceCPRRecord(decoding: rec, ramSize: memory.size)
        guard let dfd = s.find(r.name, id: 0) else { throw CPRError.malformed("device \(i) (\(r.name)): its device descriptor is missing") }
        let kd = KernelDevice(name: r.name, fd: dfd)
        switch r.backend {
        case let .legacy(g, maps):
            guard let cfd = s.find(containerName, id: Int32(bitPattern: g)), let gfd = s.find(groupName, id: Int32(bitPattern: g)) else {
                throw CPRError.malformed("device \(i) (\(r.name)): the container or group \(g) descriptor is missing")
            }
            let base = UInt64(UInt(bitPattern: memory.base))
            let container = Container(adopting: cfd, mappings: maps.map { .init(iova: $0.iova, size: $0.size, vaddr: base + $0.ramOffset, writable: $0.writable) })
            let d = AssignedKernelDevice(device: kd, dmaSpace: .container(container), keepAlive: [Group(id: Int(g), adopting: gfd)])
            return (d, {
                // QEMU's vfio-container post_load: VFIO_IOMMU_MAP_DMA with VFIO_DMA_MAP_FLAG_VADDR
                // and this process's address, for every mapping (the sizes are the kernel's).
                let failed = container.restoreVirtualAddresses { m in UnsafeMutableRawPointer(bitPattern: UInt(m.vaddr))! }
                if let (m, e) = failed.first {
                    throw CPRError.malformed("\(r.name): VFIO_DMA_MAP_FLAG_VADDR for IOVA \(hex(m.iova)) failed: \(e)")
                }
            })
        case let .iommufd(devid, ioas, hwpt):
            guard let ifd = s.find(iommufdName, id: Int32(i)) else { throw CPRError.malformed("device \(i) (\(r.name)): the iommufd descriptor is missing") }
            let iommufd = IOMMUFD(adopting: ifd)
            // The attachment (and its HWPT dirty tracker) from the recorded ids: no new ioctl
            // but IOMMU_HWPT_SET_DIRTY_TRACKING(off), which asks whether the HWPT has a dirty bit.
            let d = AssignedKernelDevice.adopted(device: kd, iommufd: iommufd, deviceID: devid, ioas: ioas, pageTableID: hwpt)
            return (d, {
                // QEMU's "iommufd" post_load: the pinned-page accounting moves to this process.
                do { try iommufd.changeProcess() } catch {
                    throw CPRError.malformed("IOMMU_IOAS_CHANGE_PROCESS fd \(ifd.rawValue) failed: \(error)")
                }
            })
        }
    }
}

enum DeviceCPR {
    /// The transport conformance of an attached device (nil: its transport has no CPR).
    static func transport(_ d: AttachedDevice) -> CPRDeviceTransport? { d.device as? CPRDeviceTransport }
}
