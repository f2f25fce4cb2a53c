import Foundation
import Glibc
import XCTest
import SystemCalls
@testable import VFIOUser

/// `vfio-live update` says what happened to the VM, as checked: "keeps running in the old
/// VMM" only when QMP answers with the old pid and query-status says running; a VMM that died
/// is said to be gone; every wait is bounded, with progress.
final class CLIUpdateTests: XCTestCase {
    var rig = VMRig()
    override func tearDown() { rig.stop() }

    func vmmPID(_ qmp: String) -> Int32? {
        guard let p = (try? TestQMP(qmp).execute("x-vfio-live-pid"))?["pid"]?.uint64 else { return nil }
        return Int32(p)
    }

    /// The old VMM execs /bin/false, which exits: nothing can take the VM back (cpr-exec has no
    /// way back once exec succeeded). The CLI must not say the VM keeps running; the old code
    /// waited 120 s silently and then said exactly that.
    func testExecIntoABinaryThatExitsIsReportedAsTheVMLost() throws {
        let vm = try rig.vm("exec")
        guard let pid0 = vmmPID(vm.qmp) else { return XCTFail("no pid: \(vm.process.output)") }
        let r = try LiveProcess.run(["update", "--qmp", vm.qmp, "--mode", "exec", "--binary", "/bin/false", "--timeout", "30"])
        XCTAssertEqual(r.status, 1, r.output)
        XCTAssertLessThan(r.seconds, 30, r.output)
        // What the CLI says must be what a check finds now.
        if vmmPID(vm.qmp) == pid0 && TestQMP.status(vm.qmp) == "running" {
            XCTAssertTrue(r.output.contains("the VM keeps running in the old VMM (pid \(pid0); checked: query-status running)"), r.output)
        } else {
            XCTAssertFalse(r.output.contains("keeps running"), r.output)
            XCTAssertTrue(r.output.contains("re-executed /bin/false, which then exited without taking the VM over: the VM is lost"), r.output)
            XCTAssertFalse(vm.process.process.isRunning, "the VMM process is gone indeed")
        }
    }

    /// A successor that accepts the CPR connection and never answers; the old VMM is
    /// SIGKILLed meanwhile. The CLI says the old VMM is gone, not that it keeps the VM.
    func testTheOldVMMKilledMidUpdateIsSaidToBeGone() throws {
        let vm = try rig.vm("killed")
        guard let pid0 = vmmPID(vm.qmp) else { return XCTFail("no pid: \(vm.process.output)") }
        let successor = try SilentServer(tag: "cpr-silent")
        defer { successor.close() }
        let u = try rig.start(["update", "--qmp", vm.qmp, "--to", "unix:\(successor.path)", "--timeout", "30"])
        XCTAssertTrue(u.waitFor("started; the old VMM is pid \(pid0)"), u.output)
        let deadline = monotonicNanoseconds() + 10_000_000_000
        while successor.connections == 0 && monotonicNanoseconds() < deadline { usleep(10_000) }
        XCTAssertEqual(successor.connections, 1, "the old VMM connected to its successor")
        kill(pid0, SIGKILL)
        let status = u.wait(killAfter: 30)
        XCTAssertEqual(status, 1, u.output)
        XCTAssertTrue(u.output.contains("the old VMM (pid \(pid0)) is gone (killed or crashed during the update), and no VMM answers on \(vm.qmp): the VM is lost"), u.output)
        XCTAssertFalse(u.output.contains("keeps running"), u.output)
    }

    /// The same silent successor, and the old VMM alive: no silent long wait. Progress every
    /// few seconds, then a failure at the bound that says where the VM is (checked).
    func testAnUpdateWithoutOutcomeShowsProgressAndFailsAtTheBound() throws {
        let vm = try rig.vm("bound")
        guard let pid0 = vmmPID(vm.qmp) else { return XCTFail("no pid: \(vm.process.output)") }
        let successor = try SilentServer(tag: "cpr-bound")
        defer { successor.close() }
        let r = try LiveProcess.run(["update", "--qmp", vm.qmp, "--to", "unix:\(successor.path)", "--timeout", "4"])
        XCTAssertEqual(r.status, 1, r.output)
        XCTAssertTrue(r.output.contains("  waiting (3 s): status "), r.output)
        XCTAssertTrue(r.output.contains("live update: no outcome after 4 s (last status: "), r.output)
        XCTAssertLessThan(r.seconds, 15)
        // The old VMM still has the VM (its own bound on the successor is longer): said so
        // because it was checked.
        XCTAssertEqual(vmmPID(vm.qmp), pid0)
        if TestQMP.status(vm.qmp) == "running" {
            XCTAssertTrue(r.output.contains("the VM keeps running in the old VMM (pid \(pid0); checked: query-status running)"), r.output)
        }
    }

    /// A successor that dies at a step: the old VMM takes the VM back, and the CLI says so
    /// only after checking it.
    func testAFailedUpdateSaysTheOldVMMKeepsTheVMOnlyAfterCheckingIt() throws {
        let vm = try rig.vm("fail")
        guard let pid0 = vmmPID(vm.qmp) else { return XCTFail("no pid: \(vm.process.output)") }
        let cpr = rig.path("fail.cpr")
        let n = try rig.start(["vm", "run", "--incoming", "cpr:unix:\(cpr)", "--qmp", rig.path("fail-new.qmp")], env: ["VFIO_LIVE_CPR_FAULT": "ready"])
        try rig.waitForPath(cpr, n)
        let r = try LiveProcess.run(["update", "--qmp", vm.qmp, "--to", "unix:\(cpr)"])
        XCTAssertEqual(r.status, 1, r.output)
        XCTAssertTrue(r.output.contains("live update failed: "), r.output)
        XCTAssertTrue(r.output.contains("the VM keeps running in the old VMM (pid \(pid0); checked: query-status running)"), r.output)
        XCTAssertEqual(vmmPID(vm.qmp), pid0)
        XCTAssertEqual(TestQMP.status(vm.qmp), "running")
    }
}
