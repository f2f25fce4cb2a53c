import Foundation
import Glibc
import SystemCalls
import VFIOUser
import XCTest

/// `vfio-live update` against real VMM processes: the old VMM starts its successor (transfer)
/// or re-executes itself (exec); the new one dies at each step; exec fails; a device opts out.
final class UpdateCommandTests: VMMProcessTestCase {
    func testTransferThenExecKeepTheVMRunning() throws {
        try startVM()
        let pid0 = try assertHealthy("before")
        let (s1, o1) = try run(["update", "--qmp", qmpPath, "--mode", "transfer"])
        XCTAssertEqual(s1, 0, o1)
        XCTAssertTrue(o1.contains("live update completed"), o1)
        XCTAssertTrue(o1.contains("dev0_interrupt/0"), o1)
        let pid1 = try assertHealthy("after cpr-transfer")
        XCTAssertNotEqual(pid1, pid0, "a new process runs the VM")
        let (s2, o2) = try run(["update", "--qmp", qmpPath, "--mode", "exec"])
        XCTAssertEqual(s2, 0, o2)
        XCTAssertTrue(o2.contains("cpr-exec"), o2)
        let pid2 = try assertHealthy("after cpr-exec")
        XCTAssertEqual(pid2, pid1, "exec keeps the PID")
    }

    func testNewVMMDyingAtEachStepLeavesTheVMWithTheOldOne() throws {
        try startVM()
        let pid0 = try assertHealthy("before")
        for step in ["receive-state", "after-state", "ready", "load", "commit"] {
            let cpr = "/tmp/vfio-live-upd-\(tag)-\(step).cpr"
            let n = try start(["vm", "run", "--incoming", "cpr:unix:\(cpr)", "--qmp", "/tmp/vfio-live-upd-\(tag)-new.qmp"],
                              env: ["VFIO_LIVE_CPR_FAULT": step], log: "/tmp/vfio-live-upd-\(tag)-new.log")
            waitForPath(cpr)
            let (s, o) = try run(["update", "--qmp", qmpPath, "--mode", "transfer", "--to", "unix:\(cpr)"])
            XCTAssertNotEqual(s, 0, "\(step): \(o)")
            XCTAssertTrue(o.contains("live update failed"), "\(step): \(o)")
            n.waitUntilExit()
            XCTAssertNotEqual(n.terminationStatus, 0, "\(step): the new VMM died")
            XCTAssertEqual(try assertHealthy("new VMM died at \(step)"), pid0)
        }
    }

    /// The new binary is probed before the VM is touched: one that cannot even start is refused.
    func testExecOfABinaryThatCannotStartIsRefusedBeforeThePause() throws {
        try startVM()
        let pid0 = try assertHealthy("before")
        let bogus = executable("not-elf", "not an executable")
        defer { unlink(bogus) }
        let (s, o) = try run(["update", "--qmp", qmpPath, "--mode", "exec", "--binary", bogus])
        XCTAssertNotEqual(s, 0, o)
        XCTAssertTrue(o.contains("cannot start") && o.contains("the VM runs on here"), o)
        XCTAssertEqual(try assertHealthy("after a refused exec"), pid0)
    }

    func testADeviceThatOptsOutBlocksTheUpdate() throws {
        try startVM(deviceOptions: ",cpr=off")
        let (s, o) = try run(["update", "--qmp", qmpPath])
        XCTAssertNotEqual(s, 0, o)
        XCTAssertTrue(o.contains("opts out of live update"), o)
        _ = try assertHealthy("blocked")
    }
}

