import Foundation
import Glibc
import XCTest
import SystemCalls
@testable import VFIOUser

/// A synchronous QMP client for the CLI tests (bounded: a VM that does not answer fails the test).
final class TestQMP {
    let s: UnixSocket
    var buf: [UInt8] = []
    init(_ path: String) throws {
        s = try UnixSocket.connect(path: path, timeoutMilliseconds: 5000)
        _ = try next()
        _ = try execute("qmp_capabilities")
    }
    deinit { s.close() }
    func next() throws -> JSONValue {
        while true {
            if let nl = buf.firstIndex(of: 10) {
                let line = Array(buf[..<nl]); buf.removeFirst(nl + 1)
                return try JSONValue.parse(line[...])
            }
            guard try Poll.waitReadable(s.fd, timeoutMilliseconds: 10_000) else { throw Errno(ETIMEDOUT) }
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
            if let e = m["error"] { throw CLITestError(description: "\(cmd): \(e)") }
            return m["return"] ?? .null
        }
    }
    static func status(_ path: String) -> String? { (try? TestQMP(path).execute("query-status"))?["status"]?.stringValue }
}

struct CLITestError: Error, CustomStringConvertible { var description: String }


/// Device servers and VMs started as processes, stopped at the end.
final class VMRig {
    let tag = "\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
    var processes: [LiveProcess] = []
    var qmps: [String] = []

    func path(_ name: String) -> String { "/tmp/vl-cli-\(tag)-\(name)" }

    func waitForPath(_ p: String, _ proc: LiveProcess) throws {
        let deadline = monotonicNanoseconds() + 20_000_000_000
        while access(p, F_OK) != 0 {
            guard monotonicNanoseconds() < deadline, proc.process.isRunning else { throw CLITestError(description: "\(p) did not appear: \(proc.output)") }
            usleep(10_000)
        }
    }

    @discardableResult
    func start(_ args: [String], env: [String: String] = [:]) throws -> LiveProcess {
        let p = try LiveProcess(args, env: env)
        processes.append(p)
        return p
    }

    /// A device server and a VM on it with a QMP socket; `incoming` makes it a destination.
    @discardableResult
    func vm(_ name: String, workload: String = "dirty-rate=20000,working-set=8M,dma-every=2", memory: String = "64M",
            incoming: String? = nil) throws -> (qmp: String, process: LiveProcess) {
        let dev = path("\(name).sock"), qmp = path("\(name).qmp")
        let d = try start(["device", "serve", "--socket", dev, "--state-size", "1M", "--quiet"])
        try waitForPath(dev, d)
        var args = ["vm", "run", "--memory", memory, "--device", "vfio-user,socket=\(dev)", "--qmp", qmp, "--workload", workload, "--quiet"]
        if let i = incoming { args += ["--incoming", i] }
        let v = try start(args)
        try waitForPath(qmp, v)
        qmps.append(qmp)
        usleep(200_000)
        return (qmp, v)
    }

    func stop() {
        for q in qmps { _ = try? TestQMP(q).execute("quit") }
        for p in processes.reversed() where p.process.isRunning { p.process.terminate() }
        for p in processes { p.wait(killAfter: 5) }
    }
}

func freePort() throws -> UInt16 {
    let l = try TCPListener(host: "127.0.0.1", port: 0)
    defer { l.close() }
    return l.port
}

/// `vfio-live migrate` reports what query-migrate says happened, and SIGINT cancels.
final class CLIMigrateTests: XCTestCase {
    var rig = VMRig()
    override func tearDown() { rig.stop() }

    func testACompletedMigrationIsReportedAndTheDestinationRuns() throws {
        let src = try rig.vm("src")
        let port = try freePort()
        let dst = try rig.vm("dst", incoming: "tcp:127.0.0.1:\(port)")
        let r = try LiveProcess.run(["migrate", "--qmp", src.qmp, "--to", "tcp:127.0.0.1:\(port)", "--max-bandwidth", "1G"])
        XCTAssertEqual(r.status, 0, r.output)
        XCTAssertTrue(r.output.contains("\nmigration completed\n"), r.output)
        XCTAssertEqual(TestQMP.status(dst.qmp), "running", "what the CLI said: the destination has the VM")
        XCTAssertEqual(TestQMP.status(src.qmp), "postmigrate")
        XCTAssertEqual(try TestQMP(src.qmp).execute("query-migrate-parameters")["max-bandwidth"]?.uint64, 1 << 30, "--max-bandwidth 1G")
    }

    /// A migration that cannot converge, switched over by --max-iterations: said as such, with
    /// the downtime against the limit, exactly when query-migrate says it was forced.
    func testAForcedSwitchoverIsSaidAsSuch() throws {
        let src = try rig.vm("src", workload: "dirty-rate=0,working-set=32M")
        let port = try freePort()
        _ = try rig.vm("dst", incoming: "tcp:127.0.0.1:\(port)")
        let r = try LiveProcess.run(["migrate", "--qmp", src.qmp, "--to", "tcp:127.0.0.1:\(port)", "--downtime-limit", "1", "--max-iterations", "2"])
        XCTAssertEqual(r.status, 0, r.output)
        let q = try TestQMP(src.qmp).execute("query-migrate")
        XCTAssertEqual(q["status"], .string("completed"))
        let forced = q["x-vfio-live"]?["forced-switchover"]?.boolValue == true
        XCTAssertTrue(forced, "an unlimited dirty rate with a 1 ms limit cannot converge in 2 iterations: \(q)")
        XCTAssertEqual(r.output.contains("migration completed with a forced switch-over"), forced, r.output)
        let downtime = q["downtime"]?.uint64 ?? 0
        XCTAssertTrue(r.output.contains("downtime:         \(downtime) ms (limit 1 ms\(downtime > 1 ? ", exceeded by \(downtime - 1) ms" : ""))"), r.output)
    }

    /// A destination that cannot be reached: the VMM refuses `migrate`; the CLI says the
    /// migration did not start, and the source's state as checked.
    func testAMigrationRefusedAtTheStartSaysSoAndTheCheckedSourceState() throws {
        let src = try rig.vm("src")
        let port = try freePort()  // nobody listens there
        let r = try LiveProcess.run(["migrate", "--qmp", src.qmp, "--to", "tcp:127.0.0.1:\(port)"])
        XCTAssertEqual(r.status, 1, r.output)
        XCTAssertFalse(r.output.contains("Usage:"), r.output)
        XCTAssertFalse(r.output.contains("migration completed"), r.output)
        XCTAssertEqual(TestQMP.status(src.qmp), "running")
        // QEMU starts the migration and fails it in query-migrate; vfio-live refuses the command.
        XCTAssertTrue(r.output.contains("the migration did not start: migrate: ") && r.output.contains("ECONNREFUSED") && r.output.contains("; the source VM is running")
                      || r.output.contains("the source VM keeps running (query-status: running)"), r.output)
    }

    /// A destination that accepts and hangs up: the migration fails in flight; the CLI exits 1
    /// with query-migrate's error-desc and the source's state as checked.
    func testAMigrationFailingInFlightExitsNonZeroWithTheErrorDesc() throws {
        let src = try rig.vm("src")
        let l = try TCPListener(host: "127.0.0.1", port: 0, backlog: 4)
        defer { l.close() }
        let stop = try EventFD(nonBlocking: true)
        let t = Thread { while let s = try? l.accept(cancel: stop.fd) { s.fd.close() } }
        t.start()
        defer { try? stop.signal(); while !t.isFinished { usleep(1000) } }
        let r = try LiveProcess.run(["migrate", "--qmp", src.qmp, "--to", "tcp:127.0.0.1:\(l.port)"])
        XCTAssertEqual(r.status, 1, r.output)
        let q = try TestQMP(src.qmp).execute("query-migrate")
        XCTAssertEqual(q["status"], .string("failed"), "\(q)")
        XCTAssertTrue(r.output.contains("migration failed: \(q["error-desc"]?.stringValue ?? "?")"), r.output)
        XCTAssertTrue(r.output.contains("the source VM keeps running (query-status: running)"), r.output)
        XCTAssertEqual(TestQMP.status(src.qmp), "running")
        XCTAssertFalse(r.output.contains("migration completed"), r.output)
    }

    /// Ctrl-C (SIGINT) and SIGTERM: migrate_cancel, the cancelled status, a non-zero exit.
    func testSIGINTAndSIGTERMCancelTheMigration() throws {
        let src = try rig.vm("src", workload: "dirty-rate=20000,working-set=32M")
        for sig in [SIGINT, SIGTERM] {
            let port = try freePort()
            _ = try rig.vm("dst\(sig)", incoming: "tcp:127.0.0.1:\(port)")
            // 1 MiB/s: 32 MiB of working set keeps it in pre-copy for half a minute.
            let m = try rig.start(["migrate", "--qmp", src.qmp, "--to", "tcp:127.0.0.1:\(port)", "--max-bandwidth", "1M"])
            XCTAssertTrue(m.waitFor("active:"), m.output)
            let t0 = monotonicNanoseconds()
            kill(m.process.processIdentifier, sig)
            let status = m.wait(killAfter: 20)
            let took = Double(monotonicNanoseconds() - t0) / 1e9
            XCTAssertEqual(status, 1, "signal \(sig): \(m.output)")
            XCTAssertTrue(m.output.contains("signal received: cancelling the migration (migrate_cancel)"), m.output)
            XCTAssertTrue(m.output.contains("migration cancelled by the signal"), m.output)
            XCTAssertTrue(m.output.contains("the source VM keeps running (query-status: running)"), m.output)
            XCTAssertFalse(m.output.contains("migration completed"), m.output)
            XCTAssertLessThan(took, 10, "the cancel is bounded")
            XCTAssertEqual(try TestQMP(src.qmp).execute("query-migrate")["status"], .string("cancelled"))
            XCTAssertEqual(TestQMP.status(src.qmp), "running")
        }
    }

    /// A second `migrate` while one runs: refused (by the CLI or the VMM), never reported as
    /// completed; the first one is unaffected and can still be cancelled.
    func testASecondMigrateWhileOneRunsIsRefused() throws {
        let src = try rig.vm("src", workload: "dirty-rate=20000,working-set=32M")
        let port = try freePort(), port2 = try freePort()
        _ = try rig.vm("dst", incoming: "tcp:127.0.0.1:\(port)")
        _ = try rig.vm("dst2", incoming: "tcp:127.0.0.1:\(port2)")
        let first = try rig.start(["migrate", "--qmp", src.qmp, "--to", "tcp:127.0.0.1:\(port)", "--max-bandwidth", "1M"])
        XCTAssertTrue(first.waitFor("active:"), first.output)
        let second = try LiveProcess.run(["migrate", "--qmp", src.qmp, "--to", "tcp:127.0.0.1:\(port2)"])
        XCTAssertEqual(second.status, 1, second.output)
        XCTAssertFalse(second.output.contains("migration completed"), second.output)
        XCTAssertTrue(second.output.contains("already in progress"), second.output)
        XCTAssertTrue(first.process.isRunning, first.output)
        first.process.interrupt()
        XCTAssertEqual(first.wait(killAfter: 20), 1, first.output)
        XCTAssertTrue(first.output.contains("migration cancelled by the signal"), first.output)
    }

    /// The QMP socket answers nothing (a hung VMM): the CLI fails within its bound.
    func testAQMPSocketThatNeverAnswersFailsWithinTheBound() throws {
        let silent = try SilentServer(tag: "qmp-silent")
        defer { silent.close() }
        let r = try LiveProcess.run(["migrate", "--qmp", silent.path, "--to", "tcp:127.0.0.1:1", "--qmp-timeout", "1"])
        XCTAssertEqual(r.status, 1, r.output)
        XCTAssertTrue(r.output.contains("the VM behind \(silent.path) did not answer the QMP greeting within 1 s"), r.output)
        XCTAssertLessThan(r.seconds, 10)
        let u = try LiveProcess.run(["update", "--qmp", silent.path, "--qmp-timeout", "0.5"])
        XCTAssertEqual(u.status, 1, u.output)
        XCTAssertTrue(u.output.contains("did not answer the QMP greeting within 0.5 s"), u.output)
        XCTAssertLessThan(u.seconds, 10)
    }
}
