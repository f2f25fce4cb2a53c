import Control
import Machine
import XCTest

/// Issue 11's lab bug: `vm run` scans guest RAM every 2 s with the integrity verifier, which
/// holds a vCPU pause while it scans (100-300 ms in the TCG lab). A migration whose engine
/// started inside that scan took the pause for the VM's run state, told the destination the
/// guest was paused, and the destination stayed paused although nobody had stopped the VM.
extension RunStateTests {
    /// The run state that goes to the destination is the VMM's (QEMU's global run state), not
    /// whether the vCPUs happen to be parked at the instant the migration starts.
    func testAMigrationStartedDuringTheVerifiersPauseRunsOnTheDestination() throws {
        let d = try destination()
        // What vm.verify() does around its scan, held across the start of the migration so
        // the engine's first look at the VM falls inside it (the lab hit this by chance).
        vm.pause()
        var held = true
        defer { if held { vm.resume() } }
        _ = try q("migrate", [("uri", .string(d.uri))])
        // The engine reads the run state before its setup ends (status active).
        XCTAssertTrue(waitFor(10) { ["active", "device", "completed"].contains(migrationStatus()) }, migrationStatus())
        vm.resume(); held = false
        XCTAssertTrue(waitFor(30) { migrationStatus() == "completed" }, migrationStatus())
        XCTAssertTrue(waitFor(5) { d.vmm.runState != .inmigrate })
        XCTAssertEqual(d.vmm.runState, .running, "nobody stopped the VM: it runs on at the destination")
        assertGuestRuns(d.vm, "destination after a migration that began during a verifier scan")
        XCTAssertTrue(waitFor(5) { vmm.runState == .postmigrate }, "\(vmm.runState)")
    }
}
