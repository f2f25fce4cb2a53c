import Control
import Glibc
import Machine
import SystemCalls
import XCTest

/// `vm run` checks the guest every --verify-every seconds, and each scan parks every vCPU
/// (100-300 ms in the TCG lab): a scan inside a migration lengthened its downtime (1.7 s in a
/// lab run) and perturbed pre-copy. No scan runs while a migration holds the VM; checking
/// resumes on the source after a migration that failed or was cancelled, and on the
/// destination once the guest runs there (that scan is the one that finds a lost page).
extension RunStateTests {
    /// The scans (start...end) of `m` that overlap `window`.
    func scans(of m: VirtualMachineManager, overlapping window: ClosedRange<UInt64>) -> [ClosedRange<UInt64>] {
        m.verifierScans.filter { $0.overlaps(window) }
    }

    /// Check every 20 ms, start a migration to a peer that never reads, hold it active for a
    /// second, then end it with `end`; no scan may overlap it, and checking resumes after.
    func assertNoScanInsideAMigrationEndedBy(_ end: (() -> UnixSocket?) throws -> Void, status: String,
                                             file: StaticString = #filePath, line: UInt = #line) throws {
        try vmm.startPeriodicVerification(every: 0.02) { _ in }
        XCTAssertTrue(waitFor(5) { vmm.verifierScans.count >= 3 }, "the check runs while the VM runs", file: file, line: line)
        let peer = try silentPeer()
        _ = try q("migrate-set-parameters", [("x-vfio-live-peer-timeout", .number(20_000))])
        _ = try q("migrate", [("uri", .string(peer.uri))])
        let started = monotonicNanoseconds()  // the claim is taken: the migration holds the VM
        XCTAssertTrue(waitFor(5) { migrationStatus() == "active" }, migrationStatus(), file: file, line: line)
        usleep(1_000_000)
        XCTAssertEqual(migrationStatus(), "active", "the peer does not read: the migration goes on", file: file, line: line)
        let ending = monotonicNanoseconds()
        try end(peer.accepted)
        XCTAssertTrue(waitFor(5) { migrationStatus() == status }, migrationStatus(), file: file, line: line)
        let inside = scans(of: vmm, overlapping: started...ending)
        XCTAssertEqual(inside.count, 0, "verifier scans (parking the vCPUs) inside the migration: \(inside)", file: file, line: line)
        XCTAssertTrue(waitFor(5) { vmm.verifierScans.contains { $0.lowerBound > ending } }, "checking resumes after the \(status) migration", file: file, line: line)
        XCTAssertNil(vmm.verificationFailure, "\(String(describing: vmm.verificationFailure))", file: file, line: line)
        XCTAssertEqual(vmm.runState, .running, file: file, line: line)
    }

    func testNoVerifierScanInsideAMigrationAndChecksResumeAfterItIsCancelled() throws {
        try assertNoScanInsideAMigrationEndedBy({ _ in _ = try q("migrate_cancel") }, status: "cancelled")
    }

    func testNoVerifierScanInsideAMigrationAndChecksResumeAfterItFails() throws {
        try assertNoScanInsideAMigrationEndedBy({ accepted in
            // The destination goes away: the source's next send fails.
            guard let s = accepted() else { return XCTFail("the peer was never connected") }
            _ = shutdown(s.fd.rawValue, Int32(SHUT_RDWR))
        }, status: "failed")
    }

    /// A completed migration: no scan at the source from the claim to the end (nor after: the
    /// guest runs elsewhere), none at the destination while it loads, and the destination's
    /// checks start once the guest runs there, and pass.
    func testACompletedMigrationIsNotScannedAndTheDestinationChecksOnceItRuns() throws {
        let d = try destination()
        try vmm.startPeriodicVerification(every: 0.02) { _ in }
        try d.vmm.startPeriodicVerification(every: 0.02) { _ in }
        XCTAssertTrue(waitFor(5) { vmm.verifierScans.count >= 3 })
        usleep(100_000)
        XCTAssertTrue(d.vmm.verifierScans.isEmpty, "a destination waiting for its guest is not checked")
        _ = try q("migrate-set-parameters", [("max-bandwidth", .number(20_000_000))])  // long enough to be seen
        _ = try q("migrate", [("uri", .string(d.uri))])
        let started = monotonicNanoseconds()
        XCTAssertTrue(waitFor(30) { migrationStatus() == "completed" }, migrationStatus())
        XCTAssertTrue(waitFor(5) { vmm.runState == .postmigrate }, "\(vmm.runState)")
        let ended = monotonicNanoseconds()
        XCTAssertTrue(waitFor(5) { d.vmm.runState == .running })
        XCTAssertTrue(waitFor(5) { !d.vmm.verifierScans.isEmpty }, "the destination checks its guest once it runs")
        usleep(100_000)
        XCTAssertEqual(scans(of: vmm, overlapping: started...monotonicNanoseconds()).count, 0,
                       "no source scan from the migration's start to its end (\(Double(ended - started) / 1e6) ms) or after")
        XCTAssertNil(d.vmm.verificationFailure, "\(String(describing: d.vmm.verificationFailure))")
    }

    /// `vm run` ended on a lost device before the check moved to the VMM's thread (the report
    /// names it as a violation, as `x-vfio-live-verify` does); the periodic check keeps that: a
    /// VM stopped in internal-error is still checked, and the report says why it cannot run.
    func testTheCheckReportsALostDeviceAsAViolationSoThatVMRunEnds() throws {
        try vmm.startPeriodicVerification(every: 0.02) { _ in }
        XCTAssertTrue(waitFor(5) { vmm.verifierScans.count >= 3 }, "the check runs while the VM runs")
        XCTAssertNil(vmm.verificationFailure)
        server.stop()
        XCTAssertTrue(waitFor(5) { vmm.runState == .internalError }, "state \(vmm.runState)")
        XCTAssertTrue(waitFor(5) { vmm.verificationFailure != nil }, "a lost device fails the periodic check")
        let why = vmm.verificationFailure?.violations.first ?? ""
        XCTAssertTrue(why.contains("device 0 lost"), why)
    }
}
