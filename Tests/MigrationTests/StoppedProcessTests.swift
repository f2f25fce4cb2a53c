import Devices
import Foundation
import Glibc
import Machine
@testable import Migration
import SystemCalls
import VFIO
import VFIOUser
import XCTest

/// Issue 13 item 11 as it was reported: the destination is a real process that reads the
/// stream and is then SIGSTOPped in stop-and-copy. The source must not stay paused for as
/// long as the peer hangs: the peer timeout resumes it, and cancel works at once.
extension LiveMigrationTests {
    /// A reader process (python3: bind, report the port, accept, read and discard) with a
    /// small fixed receive buffer, as a hung QEMU or VMM would look from the socket.
    func spawnReader() throws -> (pid: pid_t, port: UInt16) {
        let portFile = NSTemporaryDirectory() + "mig-reader-\(getpid())-\(monotonicNanoseconds()).port"
        let script = """
        import os, socket, sys
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 262144)
        s.bind(("127.0.0.1", 0)); s.listen(1)
        open(sys.argv[1] + ".tmp", "w").write(str(s.getsockname()[1])); os.rename(sys.argv[1] + ".tmp", sys.argv[1])
        c, _ = s.accept()
        while c.recv(1 << 20): pass
        """
        let pid = try ChildProcess.spawn("/usr/bin/python3", ["python3", "-c", script, portFile])
        let deadline = monotonicNanoseconds() + 10_000_000_000
        while monotonicNanoseconds() < deadline {
            if let s = try? String(contentsOfFile: portFile, encoding: .utf8), let p = UInt16(s) {
                unlink(portFile)
                return (pid, p)
            }
            usleep(10_000)
        }
        kill(pid, SIGKILL); _ = ChildProcess.wait(pid)
        throw MigrationError.channel("the reader process did not start")
    }

    func sourceTo(port: UInt16, _ p: MigrationParameters) throws -> MigrationSource {
        try MigrationSource(vm: src.vm, to: TCPSocket.connect(host: "127.0.0.1", port: port), parameters: p, policies: [.auto])
    }

    func testSIGSTOPpedDestinationInStopAndCopyTimesOutAndTheSourceResumes() throws {
        guard FileManager.default.isExecutableFile(atPath: "/usr/bin/python3") else { throw XCTSkip("needs /usr/bin/python3 for the reader process") }
        try startSource()
        let reader = try spawnReader()
        defer { kill(reader.pid, SIGKILL); _ = ChildProcess.wait(reader.pid) }
        var p = params(peerTimeoutMS: 1000)
        p.maxIterations = 1
        let m = try sourceTo(port: reader.port, p)
        var stopped = false, stoppedAt: UInt64 = 0
        m.beforeSection = { _, _ in
            if m.stats.status == .device && !stopped { stopped = true; stoppedAt = monotonicNanoseconds(); kill(reader.pid, SIGSTOP) }
        }
        XCTAssertThrowsError(try m.run()) { XCTAssertTrue("\($0)".contains("destination stopped reading for 1000 ms during stop-and-copy"), "\($0)") }
        XCTAssertTrue(stopped)
        print("SIGSTOPped destination: the source resumed \(Int(Double(monotonicNanoseconds() - stoppedAt) / 1e6)) ms after the SIGSTOP (peer timeout 1000 ms): \(m.stats.errorDescription ?? "")")
        try assertSourceRunsOn(m, status: .failed, reasonContains: "during stop-and-copy")
    }

    func testCancelWithASIGSTOPpedDestinationInStopAndCopy() throws {
        guard FileManager.default.isExecutableFile(atPath: "/usr/bin/python3") else { throw XCTSkip("needs /usr/bin/python3 for the reader process") }
        try startSource()
        let reader = try spawnReader()
        defer { kill(reader.pid, SIGKILL); _ = ChildProcess.wait(reader.pid) }
        var p = params()
        p.maxIterations = 1
        let m = try sourceTo(port: reader.port, p)
        var stopped = false
        m.beforeSection = { _, _ in if m.stats.status == .device && !stopped { stopped = true; kill(reader.pid, SIGSTOP) } }
        let wait = try runAsync(m)
        waitUntilBlocked(m, in: .device)
        _ = cancelAndMeasure(m, wait, phase: "stop-and-copy, destination process SIGSTOPped")
        try assertSourceRunsOn(m, status: .cancelled, reasonContains: "cancelled")
    }
}
