import Foundation
import Glibc
import XCTest
@testable import Devices
import SystemCalls
import VFIO
@testable import VFIOUser

/// The real `vfio-live` binary, in separate processes, over real sockets.
final class CLITests: XCTestCase {
    /// The vfio-live executable built beside this test bundle.
    static var binary: String { ChildProcess.besideCurrentExecutable("vfio-live") }

    func start(_ args: [String]) throws -> Process {
        guard FileManager.default.isExecutableFile(atPath: Self.binary) else {
            throw XCTSkip("vfio-live is not built at \(Self.binary): run `swift build` first")
        }
        let p = Process()
        p.executableURL = URL(fileURLWithPath: Self.binary)
        p.arguments = args
        try p.run()
        return p
    }

    /// Run vfio-live with `args`; its exit status and everything it printed.
    func run(_ args: [String]) throws -> (status: Int32, output: String) { try run2([Self.binary] + args) }

    func waitForSocket(_ path: String, _ p: Process) throws -> VFIOUserClient {
        let deadline = monotonicNanoseconds() + 20_000_000_000
        while monotonicNanoseconds() < deadline {
            if let c = try? VFIOUserClient(path: path) { return c }
            XCTAssertTrue(p.isRunning, "server exited early")
            usleep(10_000)
        }
        throw XCTSkip("server did not come up")
    }

    func testServeInfoJobAndCleanShutdown() throws {
        let path = temporarySocketPath("cli")
        let p = try start(["device", "serve", "--socket", path, "--state-size", "1M", "--quiet"])
        defer { if p.isRunning { p.terminate() } }
        let c = try waitForSocket(path, p)
        var st = stat()
        XCTAssertEqual(stat(path, &st), 0)
        XCTAssertEqual(st.st_mode & 0o777, 0o600, "socket created 0600")
        // A job across processes: our memfd, their device.
        let ram = try GuestRAM(size: 1 << 20)
        try c.mapDMA(iova: 0x20_0000, size: ram.size, local: ram.map.base, fd: ram.fd)
        ram.fill(offset: 0, count: 65536, seed: 42)
        try runJob(c, source: 0x20_0000, destination: DMAEngine.deviceMemoryBase, count: 65536, toRAM: false)
        try runJob(c, source: DMAEngine.deviceMemoryBase, destination: 0x28_0000, count: 65536, toRAM: true)
        XCTAssertEqual(ram.bytes(offset: 0x8_0000, count: 65536), ram.bytes(offset: 0, count: 65536))
        c.close()
        // device info --json, from another process.
        let (status, out) = try run(["device", "info", "--socket", path, "--json"])
        XCTAssertEqual(status, 0, out)
        let json = try JSONValue.parse(Array(out.utf8)[...])
        XCTAssertEqual(json["version"], .string("0.2"))
        XCTAssertEqual(json["migration"]?["v2"], .string("STOP_COPY|PRE_COPY"))
        XCTAssertEqual(json["migration"]?["v1_region"], .number(9))
        XCTAssertEqual(json["migration"]?["dma_logging"], .bool(true))
        guard case let .array(regions)? = json["regions"] else { return XCTFail("no regions: \(out)") }
        XCTAssertTrue(regions.contains { $0["index"] == .number(4) && $0["fd"] == .bool(true) }, "BAR4 offers an mmap fd")
        let text = try run(["device", "info", "--socket", path])
        XCTAssertTrue(text.output.contains("4 BAR4: size 0x100000"), text.output)
        // SIGTERM: exits 0 and removes its socket.
        p.terminate()
        p.waitUntilExit()
        XCTAssertEqual(p.terminationStatus, 0)
        XCTAssertNotEqual(access(path, F_OK), 0, "socket removed on exit")
    }

    func testMigrateCommandBetweenTwoServerProcesses() throws {
        let a = temporarySocketPath("cli-a"), b = temporarySocketPath("cli-b")
        let pa = try start(["device", "serve", "--socket", a, "--state-size", "1M", "--quiet"])
        let pb = try start(["device", "serve", "--socket", b, "--state-size", "1M", "--quiet"])
        defer { pa.terminate(); pb.terminate(); pa.waitUntilExit(); pb.waitUntilExit() }
        let ca = try waitForSocket(a, pa)
        try ca.write32(0, DMAEngine.Reg.liveness, 0x77)
        try ca.regionWrite(2, offset: 0x1000, [UInt8](repeating: 0x5c, count: 4096))
        ca.close()
        _ = try waitForSocket(b, pb).close()
        for proto in ["v2", "v1"] {
            let (status, out) = try run(["device", "migrate", "--from", a, "--to", b, "--precopy", "--protocol", proto])
            XCTAssertEqual(status, 0, out)
            XCTAssertTrue(out.contains("source path:       RUNNING → PRE_COPY → STOP_COPY → STOP"), out)
            XCTAssertTrue(out.contains("migration \(proto)"), out)
            let cb = try VFIOUserClient(path: b)
            XCTAssertEqual(try cb.read32(0, DMAEngine.Reg.liveness), ~UInt32(0x77))
            XCTAssertEqual(try cb.regionRead(2, offset: 0x1000, count: 4096), [UInt8](repeating: 0x5c, count: 4096))
            cb.close()
            // Back the other way needs the source running again.
            let c = try VFIOUserClient(path: a); try c.setMigrationState(.running); c.close()
        }
        // A destination that does not exist: a clear error and a non-zero exit.
        let (status, out) = try run(["device", "migrate", "--from", a, "--to", "/tmp/nonexistent-\(getpid()).sock"])
        XCTAssertNotEqual(status, 0)
        XCTAssertTrue(out.contains("cannot connect to the destination server"), out)
    }

    func testDeviceDemoRunsEndToEndAndVerifies() throws {
        let (status, out) = try run(["demo", "--device-only", "--seconds", "0.5", "--state-size", "4M", "--ram-size", "16M", "--quiet"])
        XCTAssertEqual(status, 0, out)
        XCTAssertTrue(out.contains("checks:                   7 passed, 0 failed"), out)
    }

    func testVMDemoMigratesARunningVMAcrossProcesses() throws {
        let (status, out) = try run(["demo", "--seconds", "0.5", "--state-size", "4M", "--quiet"])
        XCTAssertEqual(status, 0, out)
        XCTAssertTrue(out.contains("checks:            14 passed, 0 failed"), out)
        XCTAssertTrue(out.contains("[ok] device memory arrived intact"), out)
        XCTAssertTrue(out.contains("[ok] after cpr-transfer: every page verifies"), out)
        XCTAssertTrue(out.contains("[ok] the VMM re-executed in place (same PID)"), out)
    }

    /// An existing QMP client library (Python's qemu.qmp) drives a whole live migration.
    func testQEMUQMPLibraryDrivesALiveMigration() throws {
        guard (try? run2(["/usr/bin/env", "python3", "-c", "import qemu.qmp"]))?.status == 0 else {
            throw XCTSkip("Python's qemu.qmp is not installed (scripts/test.sh installs it with pip)")
        }
        // The repository root, from this source file's path (Tests/VFIOUserTests/CLITests.swift).
        let root = (((#filePath as NSString).deletingLastPathComponent as NSString).deletingLastPathComponent as NSString).deletingLastPathComponent
        let script = (root as NSString).appendingPathComponent("scripts/qmp_migration_test.py")
        let dir = "/tmp/vfio-live-qmp-\(getpid())"
        mkdir(dir, 0o700)
        let port = try TCPListener(host: "127.0.0.1", port: 0)
        let p = port.port
        port.close()
        let (status, out) = try run2(["/usr/bin/env", "python3", script, Self.binary, dir, String(p)])
        XCTAssertEqual(status, 0, out)
        XCTAssertTrue(out.contains("qemu.qmp drove the migration: OK"), out)
    }

    func run2(_ argv: [String]) throws -> (status: Int32, output: String) {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: argv[0])
        p.arguments = Array(argv.dropFirst())
        let pipe = Pipe()
        p.standardOutput = pipe
        p.standardError = pipe
        try p.run()
        let data = pipe.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        return (p.terminationStatus, String(decoding: data, as: UTF8.self))
    }

    func testVMRunVerifiesAndExitsZero() throws {
        let path = temporarySocketPath("cli-vm")
        let d = try start(["device", "serve", "--socket", path, "--state-size", "1M", "--quiet"])
        defer { d.terminate(); d.waitUntilExit() }
        _ = try waitForSocket(path, d).close()
        let (status, out) = try run(["vm", "run", "--memory", "64M", "--vcpus", "2", "--device", "vfio-user,socket=\(path)",
                                     "--workload", "working-set=8M,dma-every=4", "--duration", "1.5", "--verify-every", "0.5"])
        XCTAssertEqual(status, 0, out)
        XCTAssertTrue(out.contains("final integrity verified"), out)
        XCTAssertTrue(out.contains("DMA round trips"), out)
        let (s2, o2) = try run(["vm", "run", "--memory", "8M", "--workload", "working-set=64M"])
        XCTAssertNotEqual(s2, 0)
        XCTAssertTrue(o2.contains("does not fit"), o2)
    }

    func testBadArgumentsExplainThemselves() throws {
        let (s1, o1) = try run(["device", "serve", "--socket", "/tmp/x.sock", "--state-size", "3M"])
        XCTAssertNotEqual(s1, 0)
        XCTAssertTrue(o1.contains("power of two"), o1)
        let (s2, o2) = try run(["device", "serve", "--device", "nic", "--socket", "/tmp/x.sock"])
        XCTAssertNotEqual(s2, 0)
        XCTAssertTrue(o2.contains("available device is dma-engine"), o2)
        let (s3, o3) = try run(["device", "info", "--socket", "/tmp/nothing-\(getpid()).sock"])
        XCTAssertNotEqual(s3, 0)
        XCTAssertTrue(o3.contains("cannot connect"), o3)
    }
}
