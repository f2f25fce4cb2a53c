import Control
import Devices
import Glibc
import SystemCalls
import XCTest

/// `vfio-live migrate` sent its integer arguments as doubles: --max-bandwidth
/// 18446744073709551615 (QEMU's "unlimited") went out as 1.8446744073709552e+19, which QEMU's
/// uint64 visitor (and ours) refuses, and 2^53+1 arrived as 2^53. The real CLI against a VMM
/// behind a real QMP socket; the migration itself is pointed at a socket that does not exist,
/// so it is refused after the parameters were set.
final class CLIExactIntegerTests: QMPVMTestCase {
    override class var socketPrefix: String { "cliint" }

    /// Run `vfio-live migrate` with `extra` against this VM; its exit status (bounded: 30 s).
    func migrateCLI(_ extra: [String]) throws -> Int32 {
        let binary = ChildProcess.besideCurrentExecutable("vfio-live")
        guard access(binary, X_OK) == 0 else { throw XCTSkip("vfio-live is not built at \(binary)") }
        let nowhere = InProcessServer.temporaryPath("cliint-nowhere")
        let pid = try ChildProcess.spawn(binary, ["vfio-live", "migrate", "--qmp", path, "--to", "unix:\(nowhere)", "--quiet"] + extra)
        let deadline = monotonicNanoseconds() + 30_000_000_000
        while monotonicNanoseconds() < deadline {
            if let st = ChildProcess.exitStatus(pid) { return st }
            usleep(10_000)
        }
        kill(pid, SIGKILL)
        XCTFail("vfio-live migrate did not end within 30 s")
        return ChildProcess.wait(pid)
    }

    func testMaxBandwidth2To64Minus1ArrivesExactly() throws {
        XCTAssertEqual(try migrateCLI(["--max-bandwidth", "18446744073709551615"]), 1, "the migration itself cannot connect")
        XCTAssertEqual(vmm.parameters.maxBandwidth, UInt64.max, "QEMU's unlimited, exactly")
    }

    func testEveryIntegerArgumentArrivesExactly() throws {
        XCTAssertEqual(try migrateCLI(["--max-bandwidth", "9007199254740993", "--downtime-limit", "2000000",
                                       "--max-iterations", "999999", "--multifd-channels", "255"]), 1)
        let p = vmm.parameters
        XCTAssertEqual(p.maxBandwidth, 9_007_199_254_740_993, "2^53+1 is not rounded to 2^53")
        XCTAssertEqual(p.downtimeLimitMS, 2_000_000)
        XCTAssertEqual(p.maxIterations, 999_999)
        XCTAssertEqual(p.multifdChannels, 255)
        XCTAssertEqual(vmm.runState, .running, "a refused migration leaves the VM running")
    }
}
