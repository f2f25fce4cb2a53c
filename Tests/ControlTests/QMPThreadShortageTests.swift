import Control
import Devices
import Glibc
import Migration
import SystemCalls
import XCTest

/// A QMP client or a migration whose thread cannot be had is refused; the VMM, its guest and
/// its other clients go on (before, OSThread's precondition killed the VMM).
extension RunStateTests {
    func testAQMPClientWhoseThreadCannotStartIsTurnedAwayAndTheNextIsServed() throws {
        OSThread.refuseForTesting = { $0 == "qmp-client" }
        defer { OSThread.refuseForTesting = nil }
        let turnedAway = try UnixSocket.connect(path: path)
        defer { turnedAway.close() }
        var byte: UInt8 = 0
        XCTAssertTrue(try Poll.waitReadable(turnedAway.fd, timeoutMilliseconds: 10_000), "the connection is closed, not left hanging")
        XCTAssertEqual(recv(turnedAway.fd.rawValue, &byte, 1, 0), 0, "closed without a greeting")
        OSThread.refuseForTesting = nil
        XCTAssertEqual(try q("query-status")["status"], .string("running"), "the next client is served")
    }

    func testAMigrationWhoseThreadCannotStartIsRefusedAndTheVMRunsOn() throws {
        let d = try destination()
        OSThread.refuseForTesting = { $0 == "migration" }
        defer { OSThread.refuseForTesting = nil }
        let why = refusal("migrate", [("uri", .string(d.uri))])
        XCTAssertTrue(why?.contains("cannot start thread migration") == true, why ?? "accepted")
        OSThread.refuseForTesting = nil
        XCTAssertEqual(migrationStatus(), "failed", "query-migrate says the attempt failed")
        XCTAssertEqual(vmm.runState, .running)
        XCTAssertFalse(vm.isPaused)
        let p = vm.pagesWritten
        usleep(200_000)
        XCTAssertGreaterThan(vm.pagesWritten, p, "the guest still writes")
        // The claims were released, and the destination (which saw a connection close empty)
        // still waits: the next migrate goes through.
        XCTAssertFalse(MigrationSource.inProgress(vm))
        XCTAssertNil(refusal("migrate", [("uri", .string(d.uri))]), "a second migrate is accepted")
        XCTAssertTrue(waitFor(30) { ["completed", "failed"].contains(migrationStatus()) }, migrationStatus())
        XCTAssertEqual(migrationStatus(), "completed")
    }

    func testALiveUpdateWhoseThreadCannotStartIsRefusedAndTheVMRunsOn() throws {
        let path = InProcessServer.temporaryPath("rs-shortage-cpr")
        let l = try UnixListener(path: path)
        defer { l.close() }
        OSThread.refuseForTesting = { $0 == "live-update" }
        defer { OSThread.refuseForTesting = nil }
        let why = refusal("x-vfio-live-update", [("mode", .string("cpr-transfer")), ("to", .string("unix:\(path)"))])
        XCTAssertTrue(why?.contains("cannot start thread live-update") == true, why ?? "accepted")
        OSThread.refuseForTesting = nil
        XCTAssertEqual(migrationStatus(), "failed")
        XCTAssertEqual(vmm.runState, .running)
        XCTAssertFalse(vm.isPaused)
        XCTAssertNil(try? l.accept(timeoutMilliseconds: 100), "no successor was contacted")
        // The claim was released: a migration may start.
        let d = try destination()
        XCTAssertNil(refusal("migrate", [("uri", .string(d.uri))]), "a migration is accepted after it")
        XCTAssertTrue(waitFor(30) { ["completed", "failed"].contains(migrationStatus()) }, migrationStatus())
        XCTAssertEqual(migrationStatus(), "completed")
    }

    /// A thaw or commit that could not start the interrupt reader leaves the eventfds unread;
    /// the VMM's periodic check starts the reader again, and the device's MSIs are counted.
    func testThePeriodicCheckStartsAnInterruptReaderThatCouldNotStart() throws {
        vm.stopInterruptCounting()
        XCTAssertFalse(vm.readsInterrupts)
        OSThread.refuseForTesting = { $0 == "irq" }
        defer { OSThread.refuseForTesting = nil }
        try vmm.startPeriodicVerification(every: 0.02) { _ in }
        XCTAssertTrue(waitFor(5) { vmm.verifierScans.count >= 2 }, "the check runs")
        XCTAssertFalse(vm.readsInterrupts, "still refused")
        OSThread.refuseForTesting = nil
        XCTAssertTrue(waitFor(5) { vm.readsInterrupts }, "the next check started the reader")
        let n = vm.interruptsCounted[0]
        XCTAssertTrue(waitFor(5) { vm.interruptsCounted[0] > n }, "the device's MSIs are counted again")
    }
}
