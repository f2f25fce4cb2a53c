import Foundation
import Glibc
import SystemCalls
import VFIOUser
import XCTest

/// Real VMM processes: a device server and a running VM with a QMP socket, started from the
/// vfio-live built beside the tests; each test's processes end with it.
class VMMProcessTestCase: XCTestCase {
    static var binary: String { ChildProcess.besideCurrentExecutable("vfio-live") }

    var processes: [Process] = []
    var tag = ""
    var devicePath = "", qmpPath = ""
    var vmLog: String { "/tmp/vfio-live-upd-\(tag)-vm.log" }

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

    /// An executable file `/tmp/vfio-live-upd-<tag>-<name>` holding `contents` (a stand-in
    /// for the new VMM binary); the caller unlinks it.
    func executable(_ name: String, _ contents: String) -> String {
        let path = "/tmp/vfio-live-upd-\(tag)-\(name)"
        _ = FileManager.default.createFile(atPath: path, contents: Data(contents.utf8))
        chmod(path, 0o755)
        return path
    }

    /// A device server and a running VM with a QMP socket.
    func startVM(deviceOptions: String = "", env: [String: String] = [:]) throws {
        _ = try start(["device", "serve", "--socket", devicePath, "--state-size", "1M", "--quiet"], log: "/tmp/vfio-live-upd-\(tag)-dev.log")
        waitForPath(devicePath)
        _ = try start(["vm", "run", "--memory", "64M", "--device", "vfio-user,socket=\(devicePath)\(deviceOptions)", "--qmp", qmpPath,
                       "--workload", "dirty-rate=20000,working-set=8M,dma-every=2", "--verify-every", "0.5", "--quiet"],
                      env: env, log: vmLog)
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
}

/// A synchronous QMP client for the tests.
extension VMMProcessTestCase {
    /// Processes whose parent is `pid`, with their state letter (Z: a zombie) and command line.
    func children(of pid: pid_t) -> [(pid: pid_t, state: Character, cmdline: String)] {
        var out: [(pid_t, Character, String)] = []
        for name in (try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? [] {
            guard let p = pid_t(name), let stat = try? String(contentsOfFile: "/proc/\(p)/stat", encoding: .utf8),
                  let close = stat.lastIndex(of: ")") else { continue }
            let fields = stat[stat.index(close, offsetBy: 2)...].split(separator: " ")
            guard fields.count > 2, pid_t(fields[1]) == pid, let st = fields[0].first else { continue }
            let cmd = (try? Data(contentsOf: URL(fileURLWithPath: "/proc/\(p)/cmdline"))).map { String(decoding: $0.map { $0 == 0 ? 32 : $0 }, as: UTF8.self) } ?? ""
            out.append((p, st, cmd))
        }
        return out
    }

    /// The process's state letter, nil once it is gone.
    func processState(_ pid: pid_t) -> Character? {
        guard let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8), let close = stat.lastIndex(of: ")") else { return nil }
        return stat[stat.index(close, offsetBy: 2)...].first
    }

    /// Open descriptors and threads of a process.
    func fdAndThreadCount(_ pid: pid_t) -> (fds: Int, threads: Int) {
        let fds = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/fd"))?.count ?? -1
        let threads = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/task"))?.count ?? -1
        return (fds, threads)
    }

    func waitUntil(_ seconds: Double, _ cond: () -> Bool) -> Bool {
        let deadline = monotonicNanoseconds() + UInt64(seconds * 1e9)
        while !cond() { if monotonicNanoseconds() > deadline { return false }; usleep(2_000) }
        return true
    }
}

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
    /// `arguments` is the JSON text of the arguments object, e.g. #"{"mode":"cpr-exec"}"#.
    func execute(_ cmd: String, _ arguments: String? = nil) throws -> JSONValue {
        try s.send(Array("{\"execute\":\"\(cmd)\"\(arguments.map { ",\"arguments\":\($0)" } ?? "")}".utf8))
        while true {
            let m = try next()
            if m["event"] != nil { continue }
            if let e = m["error"] { throw QMPTestError(description: "\(cmd): \(e)") }
            return m["return"] ?? .null
        }
    }
}

struct QMPTestError: Error, CustomStringConvertible { var description: String }
