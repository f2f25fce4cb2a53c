import Machine
import Migration
import SystemCalls

/// The VM's shape, so that a successor builds the same machine around the memfd it is given
/// (vfio-live's equivalent of starting the new QEMU "with the same machine arguments").
public struct MachineRecord: Equatable {
    public var memorySize: UInt64
    public var vcpus: Int
    public var softwareVCPUs: Bool
    public var workload: WorkloadConfig
    public var devices: Int

    public init(vm: MicroVM) {
        memorySize = vm.memory.size; vcpus = vm.vcpuCount; softwareVCPUs = vm.isSoftware
        workload = vm.workload; devices = vm.devices.count
    }

    public static let name = "machine"

    public func encode() -> [UInt8] {
        var w = BEWriter()
        w.u32(1)
        w.u64(memorySize); w.u32(UInt32(vcpus)); w.u32(softwareVCPUs ? 1 : 0); w.u32(UInt32(devices))
        for v in [workload.workingSet, workload.dirtyRate, workload.batch, workload.dmaEvery, workload.dmaLength] { w.u64(v) }
        return w.bytes
    }

    public init(decoding b: [UInt8]) throws {
        var r = BEReader(b[...])
        guard r.u32() == 1, let mem = r.u64(), let n = r.u32(), let sw = r.u32(), let devs = r.u32() else {
            throw CPRError.malformed("machine record truncated or of another version")
        }
        var vals: [UInt64] = []
        for _ in 0..<5 { guard let v = r.u64() else { throw CPRError.malformed("machine record truncated") }; vals.append(v) }
        guard r.remaining == 0 else { throw CPRError.malformed("machine record has trailing bytes") }
        guard mem > 0, mem % (2 << 20) == 0, mem <= 64 << 30 else { throw CPRError.malformed("guest RAM of \(mem) bytes") }
        guard n >= 1, n <= 64, devs <= 64 else { throw CPRError.malformed("\(n) vCPUs, \(devs) devices") }
        memorySize = mem; vcpus = Int(n); softwareVCPUs = sw != 0; devices = Int(devs)
        workload = WorkloadConfig()
        workload.workingSet = vals[0]; workload.dirtyRate = vals[1]; workload.batch = vals[2]
        workload.dmaEvery = vals[3]; workload.dmaLength = vals[4]
    }
}

/// The names descriptors are saved under, after QEMU's convention (cpr.c, hw/vfio/cpr*.c):
/// a RAM block by its name, a device by its name, its interrupt eventfds as
/// `<device>_interrupt` with the vector as id.
public enum CPRNames {
    public static let guestRAM = "ram"
    public static func device(_ i: Int) -> String { "dev\(i)" }
    public static func twinSocket(_ i: Int) -> String { "dev\(i)_twin" }
    public static func interrupt(_ i: Int) -> String { "dev\(i)_interrupt" }
    public static let qmpListener = "qmp-listener"
    public static let qmpPath = "qmp-path"
}

extension CPRState {
    /// The QMP listening socket handed over, when its path is `ownPath` (or the new VMM was
    /// given none): the new VMM serves on it, so clients reconnecting meanwhile are never refused.
    public func handedQMPListener(ownPath: String?) -> (path: String, fd: FileDescriptor)? {
        guard let fd = find(CPRNames.qmpListener), let p = record(CPRNames.qmpPath).map({ String(decoding: $0, as: UTF8.self) }),
              ownPath == nil || ownPath == p else { return nil }
        return (p, fd)
    }
}
