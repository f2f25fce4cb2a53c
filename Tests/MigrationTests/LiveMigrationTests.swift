import Devices
import Glibc
import Machine
@testable import Migration
import SystemCalls
import VFIO
import VFIOUser
import XCTest

/// Whole-VM live migration over real TCP loopback: two VMs (KVM, or software vCPUs without
/// it), two real device servers, the guest writing pages and DMAing all along.
final class LiveMigrationTests: XCTestCase {
    final class Side {
        let server: InProcessServer
        let client: VFIOUserClient
        let vm: MicroVM
        init(_ tag: String, workload: WorkloadConfig, stateSize: UInt64 = 1 << 20) throws {
            server = try InProcessServer(path: InProcessServer.temporaryPath(tag), stateSize: stateSize, name: tag)
            client = try VFIOUserClient(path: server.path)
            vm = try MicroVM(memorySize: 64 << 20, vcpus: 2, workload: workload, devices: [client])
        }
        func close() { vm.stop(); client.close(); server.stop() }
    }

    var src: Side!, dst: Side!
    var listener: TCPListener!

    override func setUpWithError() throws {
        Log.level = .error
        var w = WorkloadConfig()
        w.workingSet = 16 << 20
        w.dirtyRate = 100_000
        w.dmaEvery = 4
        src = try Side("mig-src", workload: w)
        dst = try Side("mig-dst", workload: w)
        listener = try TCPListener(host: "127.0.0.1", port: 0)
    }

    override func tearDown() {
        src?.close(); dst?.close(); listener?.close()
        Log.level = .info
    }

    /// Start the destination on its own thread; returns a way to wait for its result.
    func startDestination(_ configure: ((MigrationDestination) -> Void)? = nil) -> () -> Error? {
        var result: Error?
        var done = false
        let cond = Condition()
        let t = OSThread(name: "destination") { [self] in
            var err: Error? = nil
            do {
                guard let s = try listener.accept(timeoutMilliseconds: 20_000) else { throw MigrationError.channel("no connection") }
                let d = try MigrationDestination(vm: dst.vm, from: s)
                configure?(d)
                try d.run()
            } catch { err = error }
            cond.mutex.withLock { result = err; done = true; cond.broadcast() }
        }
        return {
            cond.mutex.withLock { while !done { cond.wait() } }
            t.join()
            return result
        }
    }

    func connectSource(_ p: MigrationParameters = MigrationParameters()) throws -> MigrationSource {
        try MigrationSource(vm: src.vm, to: TCPSocket.connect(host: "127.0.0.1", port: listener.port), parameters: p, policies: [.auto])
    }

    func testRunningVMMigratesWithItsDeviceAndNothingIsLost() throws {
        src.vm.start(); src.vm.resume()
        dst.vm.start()
        usleep(300_000)
        var destDigest: UInt64 = 0
        let wait = startDestination { [self] d in d.beforeResume = { destDigest = self.dst.server.device.stateDigest() } }
        let m = try connectSource()
        let beforePages = src.vm.pagesWritten, beforeDMA = src.vm.dmaRoundsOK
        XCTAssertGreaterThan(beforeDMA, 0, "the guest was DMAing before the migration")
        try m.run()
        XCTAssertNil(wait(), "destination")
        XCTAssertEqual(m.stats.status, .completed)
        XCTAssertGreaterThanOrEqual(m.stats.iterations, 1)
        XCTAssertGreaterThan(m.stats.zeroPages, 0, "zero pages elided")
        // The source is stopped; its device ended in STOP with exactly what the destination loaded.
        XCTAssertTrue(src.vm.isPaused)
        XCTAssertEqual(try src.client.migrationState(), .stop)
        XCTAssertEqual(src.server.device.stateDigest(), destDigest, "device memory and registers identical")
        // The guest goes on at the destination: pages, DMA round trips, interrupts.
        let atSwitch = dst.vm.pagesWritten, dmaAtSwitch = dst.vm.dmaRoundsOK
        XCTAssertGreaterThan(atSwitch, beforePages)
        usleep(300_000)
        XCTAssertGreaterThan(dst.vm.pagesWritten, atSwitch, "the guest runs at the destination")
        XCTAssertGreaterThan(dst.vm.dmaRoundsOK, dmaAtSwitch, "and its device DMA continues")
        let r = dst.vm.verify()
        XCTAssertTrue(r.ok, r.description)
        XCTAssertGreaterThan(dst.vm.interruptsCounted[0], 0)
    }
}
