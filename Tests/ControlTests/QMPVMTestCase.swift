import Control
import Devices
import Glibc
import Machine
import SystemCalls
import VFIOUser
import XCTest

/// A running VM behind a real QMP socket: a dma-engine server, a 32 MiB micro-VM with its
/// workload, the VMM and its QMP listener. The QMP test classes share it; each names its
/// sockets with its own prefix so that classes never meet on a path.
class QMPVMTestCase: XCTestCase {
    var server: InProcessServer!
    var client: VFIOUserClient!
    var vm: MicroVM!
    var vmm: VirtualMachineManager!
    var qmp: QMPServer!
    var path: String!

    /// The prefix of this class's socket paths.
    class var socketPrefix: String { "qmp" }
    /// The guest's workload (a class that needs more dirtying or DMA says so).
    class var workload: WorkloadConfig { var w = WorkloadConfig(); w.workingSet = 4 << 20; return w }

    override func setUpWithError() throws {
        Log.level = .error
        signal(SIGPIPE, SIG_IGN)
        server = try InProcessServer(path: InProcessServer.temporaryPath("\(Self.socketPrefix)-dev"), stateSize: 1 << 20)
        client = try connectDevice(to: server.path)
        vm = try MicroVM(memorySize: 32 << 20, workload: Self.workload, devices: [client])
        vmm = VirtualMachineManager(vm: vm, policies: [.auto], incoming: false)
        path = InProcessServer.temporaryPath(Self.socketPrefix)
        qmp = try QMPServer(path: path, handler: vmm)
        vmm.qmp = qmp
        try qmp.start()
        try vmm.boot()
    }

    /// The VM's device connection (a class can put something between it and the server).
    func connectDevice(to serverPath: String) throws -> VFIOUserClient { try VFIOUserClient(path: serverPath) }

    override func tearDown() {
        vmm?.stopPeriodicVerification()
        qmp?.stop(); vm?.stop(); client?.close(); server?.stop()
        Log.level = .info
    }
}
