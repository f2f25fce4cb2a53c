import Foundation
import Glibc
import XCTest
@testable import Devices
import SystemCalls
import VFIO
@testable import VFIOUser

/// A vfio-live process whose output is collected while it runs, so that a test can signal it
/// and bound how long it takes. Killed (SIGKILL) if it outlives `killAfter`.
final class LiveProcess: @unchecked Sendable {
    let process = Process()
    private let pipe = Pipe()
    private var data = Data()
    private let lock = NSLock()
    private let started = monotonicNanoseconds()

    init(_ args: [String], env: [String: String] = [:]) throws {
        let binary = ChildProcess.besideCurrentExecutable("vfio-live")
        guard FileManager.default.isExecutableFile(atPath: binary) else { throw XCTSkip("vfio-live is not built at \(binary)") }
        process.executableURL = URL(fileURLWithPath: binary)
        process.arguments = args
        var e = ProcessInfo.processInfo.environment
        for (k, v) in env { e[k] = v }
        process.environment = e
        process.standardOutput = pipe
        process.standardError = pipe
        pipe.fileHandleForReading.readabilityHandler = { [weak self] h in
            let d = h.availableData
            guard let self else { return }
            self.lock.withLock { self.data.append(d) }
        }
        try process.run()
    }

    var output: String { lock.withLock { String(decoding: data, as: UTF8.self) } }
    var seconds: Double { Double(monotonicNanoseconds() - started) / 1e9 }

    /// Wait for `text` in the output (true) or for the process to exit / `timeout` (false).
    func waitFor(_ text: String, timeout: Double = 20) -> Bool {
        let deadline = monotonicNanoseconds() + UInt64(timeout * 1e9)
        while monotonicNanoseconds() < deadline {
            if output.contains(text) { return true }
            if !process.isRunning { return output.contains(text) }
            usleep(10_000)
        }
        return false
    }

    /// The exit status (a signal's number + 128), SIGKILLing the process after `killAfter` s.
    @discardableResult
    func wait(killAfter: Double = 30) -> Int32 {
        let deadline = monotonicNanoseconds() + UInt64(killAfter * 1e9)
        while process.isRunning && monotonicNanoseconds() < deadline { usleep(5_000) }
        if process.isRunning { kill(process.processIdentifier, SIGKILL) }
        process.waitUntilExit()
        usleep(50_000)  // the last output
        pipe.fileHandleForReading.readabilityHandler = nil
        lock.withLock { data.append(pipe.fileHandleForReading.readDataToEndOfFile()) }
        return process.terminationReason == .uncaughtSignal ? 128 + process.terminationStatus : process.terminationStatus
    }

    /// Run to the end: (status, output, seconds taken).
    static func run(_ args: [String], killAfter: Double = 60) throws -> (status: Int32, output: String, seconds: Double) {
        let p = try LiveProcess(args)
        let s = p.wait(killAfter: killAfter)
        return (s, p.output, p.seconds)
    }
}

/// The CLI against servers that do not answer, and with command lines that are wrong: each
/// failure says what happened, within a bound, with the right exit status.
final class CLIFailureTests: XCTestCase {
    // MARK: item 8: a busy or silent server

    func testDeviceInfoAgainstAServerThatNeverAnswersFailsWithinTheBound() throws {
        let server = try SilentServer(tag: "cli-silent")
        defer { server.close() }
        let r = try LiveProcess.run(["device", "info", "--socket", server.path, "--device-timeout", "1"])
        XCTAssertEqual(r.status, 1, r.output)
        XCTAssertTrue(r.output.contains("the server at \(server.path) accepted but did not answer VERSION within 1 s: is another VMM connected?"), r.output)
        XCTAssertFalse(r.output.contains("Usage:"), "a runtime failure, not a command-line error: \(r.output)")
        XCTAssertLessThan(r.seconds, 10, "bounded")
    }

    func testVMRunAgainstAServerThatNeverAnswersFailsWithinTheBound() throws {
        let server = try SilentServer(tag: "cli-vm-silent")
        defer { server.close() }
        let r = try LiveProcess.run(["vm", "run", "--memory", "16M", "--workload", "working-set=4M", "--device", "vfio-user,socket=\(server.path)",
                                     "--device-timeout", "1", "--duration", "1"])
        XCTAssertEqual(r.status, 1, r.output)
        XCTAssertTrue(r.output.contains("the server at \(server.path) accepted but did not answer VERSION within 1 s: is another VMM connected?"), r.output)
        XCTAssertFalse(r.output.contains("Usage:"), r.output)
        XCTAssertLessThan(r.seconds, 10)
    }

    /// The project's own server serves one client at a time: a second VMM is told so.
    func testDeviceInfoAgainstAServerBusyWithAnotherVMMFailsWithinTheBound() throws {
        let path = temporarySocketPath("cli-busy")
        let d = try LiveProcess(["device", "serve", "--socket", path, "--state-size", "1M", "--quiet"])
        defer { d.process.terminate(); d.wait(killAfter: 5) }
        var first: VFIOUserClient?
        let deadline = monotonicNanoseconds() + 20_000_000_000
        while first == nil && monotonicNanoseconds() < deadline { first = try? VFIOUserClient(path: path); usleep(10_000) }
        guard let first else { return XCTFail("the server did not come up: \(d.output)") }
        defer { first.close() }
        let r = try LiveProcess.run(["device", "info", "--socket", path, "--device-timeout", "1"])
        XCTAssertEqual(r.status, 1, r.output)
        XCTAssertTrue(r.output.contains("the server at \(path)"), r.output)
        XCTAssertLessThan(r.seconds, 10)
        XCTAssertNoThrow(try first.deviceInfo(), "the first VMM is served all along")
    }

    /// SIGTERM and SIGINT are honoured while `vm run` waits for a device (default bound: 10 s).
    func testVMRunHonoursSIGTERMAndSIGINTWhileWaitingForADevice() throws {
        let server = try SilentServer(tag: "cli-vm-sig")
        defer { server.close() }
        for sig in [SIGTERM, SIGINT] {
            let p = try LiveProcess(["vm", "run", "--memory", "16M", "--workload", "working-set=4M", "--device", "vfio-user,socket=\(server.path)"])
            let before = server.connections
            let deadline = monotonicNanoseconds() + 20_000_000_000
            while server.connections == before && monotonicNanoseconds() < deadline { usleep(10_000) }
            usleep(200_000)
            let t0 = monotonicNanoseconds()
            kill(p.process.processIdentifier, sig)
            let status = p.wait(killAfter: 8)
            let took = Double(monotonicNanoseconds() - t0) / 1e9
            XCTAssertEqual(status, 1, "signal \(sig): \(p.output)")
            XCTAssertTrue(p.output.contains("interrupted by a signal while waiting for the server at \(server.path) to answer VERSION"), p.output)
            XCTAssertLessThan(took, 2, "signal \(sig) honoured within a second or so, not after the 10 s bound")
        }
    }

    /// A live-update successor waiting on its cpr socket stops on SIGTERM too.
    func testVMRunWaitingForALiveUpdateHonoursSIGTERM() throws {
        let cpr = temporarySocketPath("cli-cpr")
        let p = try LiveProcess(["vm", "run", "--incoming", "cpr:unix:\(cpr)"])
        XCTAssertTrue(p.waitFor("waiting for a live update"), p.output)
        p.process.terminate()
        XCTAssertEqual(p.wait(killAfter: 5), 1, p.output)
        XCTAssertTrue(p.output.contains("interrupted by a signal while waiting for a live update"), p.output)
    }
}
