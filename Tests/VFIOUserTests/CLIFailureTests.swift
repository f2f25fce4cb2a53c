import Foundation
import Glibc
import XCTest
import CVFIOLive
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
        XCTAssertTrue(p.output.contains("stopped while waiting for the old VMM") && p.output.contains("no VM was taken over"), p.output)
    }

    // MARK: item 16: command-line errors vs runtime failures

    func testArgumentErrorsAreNotBlamedOnKVM() throws {
        for (args, says) in [(["--vcpus", "9"], "--vcpus must be 1...8"), (["--memory", "3M"], "--memory must be a multiple of 2 MiB"),
                             (["--workload", "dirty-rate=abc"], "--workload: dirty-rate takes pages per second"),
                             (["--memory", "8M", "--workload", "working-set=64M"], "does not fit")] {
            let r = try LiveProcess.run(["vm", "run"] + args)
            XCTAssertEqual(r.status, 64, "\(args): a command-line error (EX_USAGE): \(r.output)")
            XCTAssertTrue(r.output.contains(says), "\(args): \(r.output)")
            XCTAssertFalse(r.output.contains("KVM"), "\(args) has nothing to do with KVM: \(r.output)")
        }
    }

    func testNegativeNumbersGetAProperMessage() throws {
        for (args, says) in [(["vm", "run", "--memory", "-5M"], "'-5M' is negative"), (["vm", "run", "--vcpus", "-1"], "--vcpus must be 1...8 (got -1)"),
                             (["vm", "run", "--duration", "-2"], "--duration must be more than 0"),
                             (["migrate", "--qmp", "/tmp/q", "--to", "tcp:127.0.0.1:1", "--downtime-limit", "-5"], "--downtime-limit must be 0...2000000 (got -5)"),
                             (["migrate", "--qmp", "/tmp/q", "--to", "tcp:127.0.0.1:1", "--max-bandwidth", "-1M"], "'-1M' is negative"),
                             (["device", "info", "--socket", "/tmp/s", "--device-timeout", "-1"], "--device-timeout must be more than 0")] {
            let r = try LiveProcess.run(args)
            XCTAssertEqual(r.status, 64, "\(args): \(r.output)")
            XCTAssertTrue(r.output.contains(says), "\(args): \(r.output)")
            XCTAssertFalse(r.output.contains("Missing value"), "\(args): \(r.output)")
        }
    }

    func testSocketPathsLongerThanSunPathAreRefusedUpFront() throws {
        let long = "/tmp/" + String(repeating: "s", count: 103)  // 108 bytes: no room for the NUL
        XCTAssertEqual(long.utf8.count, 108)
        for args in [["device", "serve", "--socket", long], ["device", "info", "--socket", long],
                     ["vm", "run", "--device", "vfio-user,socket=\(long)"], ["vm", "run", "--qmp", long],
                     ["vm", "run", "--incoming", "cpr:unix:\(long)"], ["vm", "run", "--incoming", "unix:\(long)"],
                     ["migrate", "--qmp", long, "--to", "tcp:127.0.0.1:1"], ["migrate", "--qmp", "/tmp/q", "--to", "unix:\(long)"],
                     ["update", "--qmp", long], ["update", "--qmp", "/tmp/q", "--to", "unix:\(long)"],
                     ["device", "migrate", "--from", long, "--to", "/tmp/b"]] {
            let r = try LiveProcess.run(args)
            XCTAssertEqual(r.status, 64, "\(args): \(r.output)")
            XCTAssertTrue(r.output.contains("the socket path is 108 bytes; a UNIX socket path holds at most 107 (sun_path is 108 bytes including the NUL)"), "\(args): \(r.output)")
            XCTAssertNotEqual(access(long, F_OK), 0, "nothing was created")
        }
        // 107 bytes is the longest that works: a server listens there and a client connects.
        let fits = "/tmp/vl-\(getpid())-" + String(repeating: "f", count: 107 - "/tmp/vl-\(getpid())-".utf8.count)
        XCTAssertEqual(fits.utf8.count, 107)
        let d = try LiveProcess(["device", "serve", "--socket", fits, "--state-size", "1M", "--quiet"])
        defer { d.process.terminate(); d.wait(killAfter: 5) }
        let deadline = monotonicNanoseconds() + 20_000_000_000
        while access(fits, F_OK) != 0 && monotonicNanoseconds() < deadline { usleep(10_000) }
        let r = try LiveProcess.run(["device", "info", "--socket", fits, "--json"])
        XCTAssertEqual(r.status, 0, r.output)
    }

    func testMaxBandwidthTakesASizeWithASuffix() throws {
        for v in ["10M", "10M/s", "1G", "65536", "0"] {
            // The command line is accepted; only the VM (absent) makes it fail, at run time.
            let r = try LiveProcess.run(["migrate", "--qmp", "/tmp/vfio-live-none-\(getpid()).qmp", "--to", "tcp:127.0.0.1:1", "--max-bandwidth", v])
            XCTAssertEqual(r.status, 1, "\(v): \(r.output)")
            XCTAssertTrue(r.output.contains("cannot reach the VM's QMP socket"), "\(v): \(r.output)")
        }
        let r = try LiveProcess.run(["migrate", "--qmp", "/tmp/q", "--to", "tcp:127.0.0.1:1", "--max-bandwidth", "fast"])
        XCTAssertEqual(r.status, 64, r.output)
        XCTAssertTrue(r.output.contains("--max-bandwidth: 'fast' is not a size"), r.output)
    }

    /// ENOENT, ECONNREFUSED and a server that hangs up: exit 1 with the cause, no usage text.
    func testRuntimeFailuresExitOneWithTheCauseAndNoUsage() throws {
        let missing = "/tmp/vfio-live-missing-\(getpid()).sock"
        // A socket file nobody listens on (a crashed server's): connect gives ECONNREFUSED.
        let stale = temporarySocketPath("stale")
        let raw = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        XCTAssertEqual(stale.withCString { vl_unix_bind(raw, $0) }, 0)
        close(raw)
        defer { unlink(stale) }
        // A server that accepts and closes at once.
        let hangUp = temporarySocketPath("hangup")
        let l = try UnixListener(path: hangUp, backlog: 8)
        defer { l.close() }
        let stop = try EventFD(nonBlocking: true)
        let t = Thread { while let s = try? l.accept(cancel: stop.fd) { s.close() } }
        t.start()
        defer { try? stop.signal(); while !t.isFinished { usleep(1000) } }
        let cases: [([String], String)] = [
            (["device", "info", "--socket", missing], "cannot connect to the vfio-user server at \(missing): ENOENT"),
            (["device", "info", "--socket", stale], "cannot connect to the vfio-user server at \(stale): ECONNREFUSED"),
            (["device", "info", "--socket", hangUp], "the vfio-user server at \(hangUp) failed the negotiation: server closed the connection"),
            (["vm", "run", "--memory", "16M", "--workload", "working-set=4M", "--device", "vfio-user,socket=\(missing)"], "ENOENT"),
            (["vm", "run", "--memory", "16M", "--workload", "working-set=4M", "--device", "vfio-user,socket=\(stale)"], "ECONNREFUSED"),
            (["vm", "run", "--memory", "16M", "--workload", "working-set=4M", "--device", "vfio-user,socket=\(hangUp)"], "server closed the connection"),
            (["device", "migrate", "--from", missing, "--to", stale], "cannot connect to the source server"),
            (["migrate", "--qmp", stale, "--to", "tcp:127.0.0.1:1"], "cannot reach the VM's QMP socket \(stale): ECONNREFUSED"),
            (["update", "--qmp", missing], "cannot reach the VM's QMP socket \(missing): ENOENT"),
        ]
        for (args, says) in cases {
            let r = try LiveProcess.run(args)
            XCTAssertEqual(r.status, 1, "\(args): \(r.output)")
            XCTAssertTrue(r.output.contains(says), "\(args): \(r.output)")
            XCTAssertFalse(r.output.contains("Usage:"), "\(args): \(r.output)")
        }
    }

    /// SIGINT during `device migrate`: the transfer stops through its rollback, the source
    /// device is RUNNING again and the destination is out of RESUMING.
    func testDeviceMigrateInterruptedBySIGINTRollsBack() throws {
        let a = temporarySocketPath("dm-a"), b = temporarySocketPath("dm-b")
        let pa = try LiveProcess(["device", "serve", "--socket", a, "--state-size", "16M", "--quiet"])
        let pb = try LiveProcess(["device", "serve", "--socket", b, "--state-size", "16M", "--quiet"])
        defer { for p in [pa, pb] { p.process.terminate(); p.wait(killAfter: 5) } }
        let deadline = monotonicNanoseconds() + 20_000_000_000
        while (access(a, F_OK) != 0 || access(b, F_OK) != 0) && monotonicNanoseconds() < deadline { usleep(10_000) }
        let m = try LiveProcess(["device", "migrate", "--from", a, "--to", b, "--precopy"], env: ["VFIO_LIVE_TEST_CHUNK_DELAY_MS": "200"])
        usleep(700_000)
        XCTAssertTrue(m.process.isRunning, m.output)
        m.process.interrupt()
        XCTAssertEqual(m.wait(killAfter: 10), 1, m.output)
        XCTAssertTrue(m.output.contains("interrupted by a signal; the source device is back in RUNNING with its state intact"), m.output)
        let ca = try VFIOUserClient(path: a), cb = try VFIOUserClient(path: b)
        defer { ca.close(); cb.close() }
        XCTAssertEqual(try ca.migrationState(), .running)
        XCTAssertNotEqual(try cb.migrationState(), .resuming)
    }

    /// SIGTERM to a running VM whose device server is stopped (SIGSTOP) mid-run: the VM stops
    /// within a second or two, not after the 30 s device bound (nor never, as before).
    func testVMRunStopsOnSIGTERMWhileItsDeviceServerIsStopped() throws {
        let dev = temporarySocketPath("stopped")
        let d = try LiveProcess(["device", "serve", "--socket", dev, "--state-size", "1M", "--quiet"])
        defer { kill(d.process.processIdentifier, SIGCONT); d.process.terminate(); d.wait(killAfter: 5) }
        let deadline = monotonicNanoseconds() + 20_000_000_000
        while access(dev, F_OK) != 0 && monotonicNanoseconds() < deadline { usleep(10_000) }
        let vm = try LiveProcess(["vm", "run", "--memory", "64M", "--device", "vfio-user,socket=\(dev)",
                                  "--workload", "working-set=8M,dirty-rate=20000,dma-every=1", "--device-timeout", "30"])
        usleep(2_000_000)  // running, with DMA (its progress lines are buffered in the pipe)
        XCTAssertTrue(vm.process.isRunning, vm.output)
        kill(d.process.processIdentifier, SIGSTOP)
        usleep(1_000_000)  // the vCPU now waits on the device
        let t0 = monotonicNanoseconds()
        vm.process.terminate()
        let status = vm.wait(killAfter: 40)
        let took = Double(monotonicNanoseconds() - t0) / 1e9
        XCTAssertLessThan(took, 8, "stopped well within the 30 s device bound: \(vm.output)")
        XCTAssertNotEqual(status, 128 + SIGKILL, vm.output)
        XCTAssertTrue(vm.output.contains("a device does not answer: giving up on it to stop now"), vm.output)
    }
}
