import Glibc
import Machine
@testable import Migration
import SystemCalls
import XCTest

/// A thread that cannot be had (pthread_create's EAGAIN, past OSThread's 2 s of retries) fails
/// what it was for, and the VM lives on: before, OSThread's precondition killed the VMM with its
/// guest. `OSThread.refuseForTesting` plays the kernel refusing.
extension LiveMigrationTests {
    private func refusing(_ names: Set<String>, _ body: () throws -> Void) rethrows {
        OSThread.refuseForTesting = { names.contains($0) }
        defer { OSThread.refuseForTesting = nil }
        try body()
    }

    /// The source's second channel worker cannot start: nothing went out on the main channel,
    /// the destination sees a connection that closed empty, and the source runs on.
    func testAMultifdWorkerThatCannotStartFailsTheMigrationAndTheSourceRunsOn() throws {
        try startSource()
        let wait = try startMultifdDestination()
        let m = try connectMultifdSource(Self.multifdParameters(2))
        try refusing(["multifd-1"]) { XCTAssertThrowsError(try m.run()) }
        try assertSourceRunsOn(m, status: .failed, reasonContains: "cannot start thread multifd-1")
        let e = wait()
        guard case .closedBeforeStream? = e as? MigrationError else { return XCTFail("destination: \(String(describing: e))") }
    }

    /// The destination's second channel reader cannot start: it refuses with that reason, the
    /// source reports the destination's words and rolls back, the destination stays paused.
    func testAMultifdReaderThatCannotStartAtTheDestinationFailsTheMigrationAndTheSourceRunsOn() throws {
        try startSource()
        let wait = try startMultifdDestination()
        let m = try connectMultifdSource(Self.multifdParameters(2))
        try refusing(["multifd-in-1"]) { XCTAssertThrowsError(try m.run()) }
        try assertSourceRunsOn(m, status: .failed, reasonContains: "cannot start thread multifd-in-1")
        XCTAssertTrue("\(wait().map { "\($0)" } ?? "none")".contains("multifd-in-1"))
        XCTAssertTrue(dst.vm.isPaused, "the destination never ran the guest")
    }

    /// Without the watcher that gives up a hanging device's wait on cancel, no migration starts.
    func testNoCancelWatcherNoMigrationAndTheSourceRunsOn() throws {
        try startSource()
        let wait = try startDestination()
        let m = try connectSource(MigrationParameters())
        try refusing(["mig-dev-cancel"]) { XCTAssertThrowsError(try m.run()) }
        XCTAssertEqual(m.stats.status, .failed)
        XCTAssertTrue((m.stats.errorDescription ?? "").contains("cannot start thread mig-dev-cancel"), m.stats.errorDescription ?? "no reason")
        XCTAssertFalse(src.vm.isPaused, "the source VM runs")
        XCTAssertFalse(src.vm.dirtyLogging, "nothing was started")
        XCTAssertEqual(try src.client.migrationState(), .running)
        let e = wait()
        guard case .closedBeforeStream? = e as? MigrationError else { return XCTFail("destination: \(String(describing: e))") }
    }

    /// The throttle's thread cannot start: auto-converge is a help, not a need (the migration
    /// goes on unthrottled, Source.considerThrottle). Refused, the throttle holds no percentage,
    /// so a later step starts it.
    func testAThrottleWhoseThreadCannotStartHoldsNoPercentageAndStartsNextTime() throws {
        try startSource()
        let throttler = VCPUThrottle(vm: src.vm)
        try refusing(["throttle"]) {
            XCTAssertThrowsError(try throttler.set(percent: 20)) { XCTAssertTrue("\($0)".contains("cannot start thread throttle"), "\($0)") }
        }
        // Refused, it holds no percentage: the next set starts the thread, and stop ends it.
        try throttler.set(percent: 20)
        usleep(50_000)
        throttler.stop()
        XCTAssertFalse(src.vm.isPaused, "the last throttle pause was released")
    }
}
