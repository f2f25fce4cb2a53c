import Foundation
import Glibc
import SystemCalls
import VFIOUser
import XCTest

/// `vfio-live update` against real VMM processes: the old VMM starts its successor (transfer)
/// or re-executes itself (exec); the new one dies at each step; exec fails; a device opts out.
final class UpdateCommandTests: XCTestCase {
    static var binary: String { ChildProcess.besideCurrentExecutable("vfio-live") }

    var processes: [Process] = []
    var tag = ""
    var devicePath = "", qmpPath = ""

    override func setUpWithError() throws {
        guard FileManager.default.isExecutableFile(atPath: Self.binary) else { throw XCTSkip("vfio-live is not built at \(Self.binary)") }
        tag = "\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        devicePath = "/tmp/vfio-live-upd-\(tag).sock"
        qmpPath = "/tmp/vfio-live-upd-\(tag).qmp"
    }

    override func tearDown() {
        if let q = try? QMP(qmpPath) { _ = try? q.execute("quit") }
        for p in processes where p.isRunning { p.terminate(); p.waitUntilExit() }
    }

    func start(_ args: [String], env: [String: String] = [:], log: String) throws -> Process {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: Self.binary)
        p.arguments = args
        var e = ProcessInfo.processInfo.environment
        for (k, v) in env { e[k] = v }
        p.environment = e
        _ = FileManager.default.createFile(atPath: log, contents: nil)
        let h = FileHandle(forWritingAtPath: log)!
        p.standardOutput = h; p.standardError = h
        try p.run()
        processes.append(p)
        return p
    }

    func run(_ args: [String]) throws -> (Int32, String) {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: Self.binary)
        p.arguments = args
        let pipe = Pipe()
        p.standardOutput = pipe; p.standardError = pipe
        try p.run()
        let data = pipe.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        return (p.terminationStatus, String(decoding: data, as: UTF8.self))
    }

    func waitForPath(_ path: String) {
        let deadline = monotonicNanoseconds() + 20_000_000_000
        while access(path, F_OK) != 0 && monotonicNanoseconds() < deadline { usleep(10_000) }
    }

    /// A device server and a running VM with a QMP socket.
    func startVM(deviceOptions: String = "") throws {
        _ = try start(["device", "serve", "--socket", devicePath, "--state-size", "1M", "--quiet"], log: "/tmp/vfio-live-upd-\(tag)-dev.log")
        waitForPath(devicePath)
        _ = try start(["vm", "run", "--memory", "64M", "--device", "vfio-user,socket=\(devicePath)\(deviceOptions)", "--qmp", qmpPath,
                       "--workload", "dirty-rate=20000,working-set=8M,dma-every=2", "--verify-every", "0.5", "--quiet"],
                      log: "/tmp/vfio-live-upd-\(tag)-vm.log")
        waitForPath(qmpPath)
        usleep(300_000)
    }

    /// The VM behind the QMP socket: verified, running, and still making progress.
    func assertHealthy(_ what: String, file: StaticString = #filePath, line: UInt = #line) throws -> UInt64 {
        let q = try QMP(qmpPath)
        XCTAssertEqual(try q.execute("query-status")["status"], .string("running"), what, file: file, line: line)
        let v0 = try q.execute("x-vfio-live-verify")
        XCTAssertEqual(v0["ok"], .bool(true), "\(what): \(v0)", file: file, line: line)
        usleep(300_000)
        let v1 = try q.execute("x-vfio-live-verify")
        XCTAssertEqual(v1["ok"], .bool(true), "\(what): \(v1)", file: file, line: line)
        XCTAssertGreaterThan(v1["page-writes"]?.uint64 ?? 0, v0["page-writes"]?.uint64 ?? 0, "\(what): the guest runs", file: file, line: line)
        XCTAssertGreaterThan(v1["dma-round-trips"]?.uint64 ?? 0, v0["dma-round-trips"]?.uint64 ?? 0, "\(what): its DMA goes on", file: file, line: line)
        return try q.execute("x-vfio-live-pid")["pid"]?.uint64 ?? 0
    }

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
        let bogus = "/tmp/vfio-live-upd-\(tag)-not-elf"
        _ = FileManager.default.createFile(atPath: bogus, contents: Data("not an executable".utf8))
        chmod(bogus, 0o755)
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

/// A synchronous QMP client for the tests.
final class QMP {
    let s: UnixSocket
    var buf: [UInt8] = []
    init(_ path: String) throws {
        s = try UnixSocket.connect(path: path)
        _ = try next()
        _ = try execute("qmp_capabilities")
    }
    func next() throws -> JSONValue {
        while true {
            if let nl = buf.firstIndex(of: 10) {
                let line = Array(buf[..<nl]); buf.removeFirst(nl + 1)
                return try JSONValue.parse(line[...])
            }
            var chunk = [UInt8](repeating: 0, count: 4096)
            let n = try chunk.withUnsafeMutableBytes { try s.fd.read(into: $0) }
            guard n > 0 else { throw Errno.ECONNRESET }
            buf += chunk[0..<n]
        }
    }
    func execute(_ cmd: String) throws -> JSONValue {
        try s.send(Array("{\"execute\":\"\(cmd)\"}".utf8))
        while true {
            let m = try next()
            if m["event"] != nil { continue }
            if let e = m["error"] { throw QMPTestError(description: "\(cmd): \(e)") }
            return m["return"] ?? .null
        }
    }
}

struct QMPTestError: Error, CustomStringConvertible { var description: String }
