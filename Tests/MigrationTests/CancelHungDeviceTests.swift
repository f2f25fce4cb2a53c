import Devices
import Glibc
import Machine
@testable import Migration
import SystemCalls
import VFIO
import VFIOUser
import XCTest

/// Task: `migrate_cancel` (and SIGTERM, which cancels) interrupts a wait on a vfio-user device
/// promptly. Before, `MigrationSource.cancel` shut the migration socket only: a device server
/// hung on MIG_DATA_READ held the cancel for the client's whole device timeout (10 s).
final class CancelHungDeviceTests: XCTestCase {
    var server: InProcessServer!, relay: HoldingRelay!, client: VFIOUserClient!, vm: MicroVM!
    var listener: TCPListener!
    var peer: OSThread?

    override func setUpWithError() throws {
        Log.level = .error
        server = try InProcessServer(path: InProcessServer.temporaryPath("chd-srv"), stateSize: 4 << 20, name: "chd")
        relay = try HoldingRelay(to: server.path, tag: "chd-relay")
        var o = VFIOUserClient.Options()
        o.offerTwinSocket = false  // one connection for the relay to carry
        client = try VFIOUserClient(path: relay.path, options: o)
        var w = WorkloadConfig(); w.workingSet = 8 << 20; w.dirtyRate = 20_000; w.dmaEvery = 4
        vm = try MicroVM(memorySize: 32 << 20, vcpus: 1, workload: w, devices: [client])
        listener = try TCPListener(host: "127.0.0.1", port: 0, backlog: 4)
    }

    override func tearDown() {
        vm?.stop(); client?.close(); relay?.close(); server?.stop(); listener?.close(); peer?.join()
        Log.level = .info
    }

    /// A destination that reads and discards everything (the hang is the device's, not its).
    func startSink() throws {
        let l = listener!
        peer = try OSThread(name: "sink") {
            guard let s = try? l.accept(timeoutMilliseconds: 10_000) else { return }
            var b = [UInt8](repeating: 0, count: 1 << 16)
            while recv(s.fd.rawValue, &b, b.count, 0) > 0 {}
            s.fd.close()
        }
    }

    static func openFDs() -> Int { (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd").count) ?? -1 }

    /// Run the migration; when the relay holds a MIG_DATA_READ, cancel. Returns how long
    /// cancel took to end `run()`, and its error.
    func cancelWhileARead(isHeldFor seconds: Double) throws -> (MigrationSource, Double, Error?) {
        try vm.start(); vm.resume()
        usleep(200_000)
        try startSink()
        var p = MigrationParameters(); p.peerTimeoutMS = 60_000
        let m = try MigrationSource(vm: vm, to: TCPSocket.connect(host: "127.0.0.1", port: listener.port), parameters: p, policies: [.auto])
        relay.holdNextRead = seconds
        var err: Error?
        let done = try EventFD(nonBlocking: true)
        let t = try OSThread(name: "mig") { do { try m.run() } catch { err = error }; try? done.signal() }
        defer { t.join() }
        guard try Poll.waitReadable(relay.holding.fd, timeoutMilliseconds: 20_000) else {
            m.cancel(); XCTFail("no MIG_DATA_READ was sent"); return (m, 0, nil)
        }
        usleep(50_000)
        let start = monotonicNanoseconds()
        XCTAssertTrue(m.cancel())
        let ended = try Poll.waitReadable(done.fd, timeoutMilliseconds: 8000)
        let took = Double(monotonicNanoseconds() - start) / 1e9
        XCTAssertTrue(ended, "cancel ended the migration while the device hangs (within 8 s; the device timeout is 10 s)")
        t.join()
        return (m, took, err)
    }

    func testCancelInterruptsADeviceServerHungOnMigDataReadAndReportsTheDeviceLost() throws {
        let fdsBefore = Self.openFDs()
        let (m, took, err) = try cancelWhileARead(isHeldFor: .infinity)
        guard case .cancelled? = err as? MigrationError else { return XCTFail("error: \(String(describing: err))") }
        XCTAssertLessThan(took, 5, "cancel gave up on the hung device after its grace, not the 10 s device timeout")
        XCTAssertEqual(m.stats.status, .cancelled)
        XCTAssertNotNil(m.lostDevices[0], "the device that cannot come back is reported lost")
        XCTAssertTrue(m.stats.sourceOutcome.contains("device 0 is lost"), m.stats.sourceOutcome)
        // The engine released its pause; a guest that touches the lost device stalls on it,
        // which is why the VMM then stops the VM in internal-error (deviceLost).
        XCTAssertFalse(vm.isPaused, "the migration's pause is released")
        XCTAssertFalse(vm.dirtyLogging)
        XCTAssertEqual(client.cancelDescriptor, nil, "the client has its own cancel descriptor back")
        vm.stop(); client.close(); relay.close(); peer?.join(); peer = nil
        relay = nil; client = nil
        XCTAssertLessThanOrEqual(Self.openFDs(), fdsBefore + 2, "no descriptor leaked (the VM's own are still open)")
    }

    /// A slow server (it answers after 300 ms, within the grace) is not given up on: cancel
    /// waits for its answer and the device goes back to RUNNING.
    func testCancelDuringASlowButAliveDeviceReadKeepsTheDevice() throws {
        let (m, took, err) = try cancelWhileARead(isHeldFor: 0.3)
        guard case .cancelled? = err as? MigrationError else { return XCTFail("error: \(String(describing: err))") }
        XCTAssertLessThan(took, 5)
        XCTAssertTrue(m.lostDevices.isEmpty, "\(m.lostDevices)")
        XCTAssertEqual(try client.migrationState(), .running, "the device is back in RUNNING")
        XCTAssertFalse(vm.isPaused)
        let dma = vm.dmaRoundsOK
        usleep(300_000)
        XCTAssertGreaterThan(vm.dmaRoundsOK, dma, "and the guest still DMAs through it")
        let r = vm.verify()
        XCTAssertTrue(r.ok, r.description)
    }
}
