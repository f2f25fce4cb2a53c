import Control
import Devices
import Glibc
@testable import LiveUpdate
import Machine
import Migration
import SystemCalls
import VFIO
import VFIOUser
import XCTest

/// The VMM's control layer under racing operators and broken peers (issue 13): one VM never
/// runs in two places, the run state always says what the vCPUs do, a conflicting operation is
/// refused with an error naming what holds the VM, and a device server that dies is reported.
/// Real device servers over real sockets, the guest on KVM (or software vCPUs).
final class RunStateTests: QMPVMTestCase {
    override class var socketPrefix: String { "rs" }
    override class var workload: WorkloadConfig {
        var w = WorkloadConfig(); w.workingSet = 4 << 20; w.dirtyRate = 20_000; w.dmaEvery = 2; return w
    }
    /// What each test set up beside the VM (destinations, peers), undone last first.
    var others: [() -> Void] = []

    override func tearDown() {
        for f in others.reversed() { f() }
        others = []
        super.tearDown()
    }

    // MARK: helpers

    /// A second VMM waiting for an incoming migration on a UNIX socket, with its own device.
    final class Destination {
        let server: InProcessServer, client: VFIOUserClient, vm: MicroVM, vmm: VirtualMachineManager, uri: String
        init() throws {
            server = try InProcessServer(path: InProcessServer.temporaryPath("rs-dest-dev"), stateSize: 1 << 20)
            client = try VFIOUserClient(path: server.path)
            vm = try MicroVM(memorySize: 32 << 20, workload: RunStateTests.workload, devices: [client])
            vmm = VirtualMachineManager(vm: vm, policies: [.auto], incoming: true)
            uri = "unix:\(InProcessServer.temporaryPath("rs-mig"))"
            try vmm.startIncoming(uri: uri)
        }
        func close() { vmm.stopPeriodicVerification(); vm.stop(); client.close(); server.stop() }
    }

    func destination() throws -> Destination {
        let d = try Destination()
        others.append { d.close() }
        return d
    }

    func q(_ cmd: String, _ args: [(String, JSONValue)]? = nil) throws -> JSONValue {
        try vmm.execute(cmd, arguments: args.map { .object($0) })
    }

    /// The QMP error's text, or nil when the command succeeded.
    func refusal(_ cmd: String, _ args: [(String, JSONValue)]? = nil) -> String? {
        do { _ = try q(cmd, args); return nil } catch let e as QMPError { return e.desc } catch { return "\(error)" }
    }

    func waitFor(_ seconds: Double, _ cond: () -> Bool) -> Bool {
        let deadline = monotonicNanoseconds() + UInt64(seconds * 1e9)
        while !cond() { if monotonicNanoseconds() > deadline { return false }; usleep(5_000) }
        return true
    }

    func migrationStatus() -> String {
        if case let .string(s)? = try? q("query-migrate")["status"] { return s }
        return ""
    }

    /// The guest writes pages (it is not frozen), and every page verifies.
    func assertGuestRuns(_ vm: MicroVM, _ what: String, file: StaticString = #filePath, line: UInt = #line) {
        let p = vm.pagesWritten
        XCTAssertTrue(waitFor(5) { vm.pagesWritten > p + 100 }, "\(what): the guest runs", file: file, line: line)
        let r = vm.verify()
        XCTAssertTrue(r.ok, "\(what): \(r)", file: file, line: line)
    }

    /// A listener that accepts and then never reads: a destination (or successor) that hangs.
    func silentPeer() throws -> (uri: String, accepted: () -> UnixSocket?) {
        let path = InProcessServer.temporaryPath("rs-silent")
        let l = try UnixListener(path: path)
        var conn: UnixSocket?
        let m = Mutex()
        let t = try OSThread(name: "silent") { if let s = try? l.accept(timeoutMilliseconds: 10_000) { m.withLock { conn = s } } }
        others.append { t.join(); m.withLock { conn?.close() }; l.close() }
        return ("unix:\(path)", { m.withLock { conn } })
    }

    // MARK: stop/cont

    /// Item 10: concurrent stop/cont from several clients left the guest frozen while
    /// query-status said running (two stops paused twice, one cont resumed once).
    func testConcurrentStopAndContNeverLeaveARunningStateOverFrozenVCPUs() throws {
        let done = Condition()
        var finished = 0
        for t in 0..<4 {
            _ = try OSThread(name: "qmp-\(t)") { [self] in
                for i in 0..<40 { _ = try? q((i + t) % 3 == 0 ? "cont" : "stop") }
                done.mutex.withLock { finished += 1; done.broadcast() }
            }
        }
        done.mutex.withLock { while finished < 4 { done.wait() } }
        // Whatever the interleaving, the state says what the vCPUs do...
        if vmm.runState == .running { assertGuestRuns(vm, "running after the race") } else { XCTAssertTrue(vm.isPaused) }
        // ...and one cont runs the guest again; one stop stops it; one cont runs it.
        _ = try q("cont")
        XCTAssertEqual(vmm.runState, .running)
        assertGuestRuns(vm, "after cont")
        _ = try q("stop"); _ = try q("stop")
        XCTAssertTrue(vm.isPaused)
        XCTAssertEqual(try client.migrationState(), .stop)
        _ = try q("cont")
        assertGuestRuns(vm, "two stops, one cont")
        XCTAssertEqual(try client.migrationState(), .running)
    }

    // MARK: one VM, one place

    /// Two simultaneous migrations both completed and cloned the VM onto two destinations.
    func testTwoSimultaneousMigrationsRunTheVMInOnePlaceOnly() throws {
        let d1 = try destination(), d2 = try destination()
        let go = Condition()
        var results: [String?] = []
        for d in [d1, d2] {
            _ = try OSThread(name: "migrate") { [self] in
                let r = refusal("migrate", [("uri", .string(d.uri))])
                go.mutex.withLock { results.append(r); go.broadcast() }
            }
        }
        go.mutex.withLock { while results.count < 2 { go.wait() } }
        let refused = results.compactMap { $0 }
        XCTAssertEqual(refused.count, 1, "\(results)")
        XCTAssertTrue(refused.first?.contains("a migration is in progress") == true, "\(refused)")
        XCTAssertTrue(waitFor(30) { migrationStatus() == "completed" }, migrationStatus())
        XCTAssertTrue(waitFor(5) { [d1, d2].contains { $0.vmm.runState == .running } })
        let running = [d1, d2].filter { $0.vmm.runState == .running }
        let waiting = [d1, d2].filter { $0.vmm.runState == .inmigrate }
        XCTAssertEqual(running.count, 1)
        XCTAssertEqual(waiting.count, 1, "the other destination was never touched")
        XCTAssertEqual(waiting.first?.vmm.stats.status, MigrationStats.Status.none)
        // The status says completed a moment before the source's run state moves from
        // finish-migrate to postmigrate (QEMU has the same order): wait for it, bounded.
        XCTAssertTrue(waitFor(5) { vmm.runState == .postmigrate }, "\(vmm.runState)")
        if let r = running.first { assertGuestRuns(r.vm, "the one destination") }
        XCTAssertNotNil(refusal("cont"), "a migrated-away source is not run again")
    }

    /// A live update started during a migration killed it; now it is refused (all modes), the
    /// migration goes on, and migrate_cancel still ends it with the guest running.
    func testALiveUpdateDuringAMigrationIsRefusedAndNothingIsKilled() throws {
        let peer = try silentPeer()
        _ = try q("migrate-set-parameters", [("x-vfio-live-peer-timeout", .number(20_000))])
        _ = try q("migrate", [("uri", .string(peer.uri))])
        XCTAssertTrue(waitFor(5) { migrationStatus() == "active" }, migrationStatus())
        for mode in ["cpr-transfer", "cpr-exec"] {
            let r = refusal("x-vfio-live-update", [("mode", .string(mode))])
            XCTAssertTrue(r?.contains("a migration is in progress") == true, "\(mode): \(r ?? "accepted")")
        }
        _ = try q("migrate-set-parameters", [("mode", .string("cpr-transfer"))])
        let viaMigrate = refusal("migrate", [("uri", .string("unix:/tmp/nowhere.cpr"))])
        XCTAssertTrue(viaMigrate?.contains("a migration is in progress") == true, viaMigrate ?? "accepted")
        _ = try q("migrate-set-parameters", [("mode", .string("normal"))])
        XCTAssertEqual(migrationStatus(), "active", "the migration was not disturbed")
        _ = try q("migrate_cancel")
        XCTAssertTrue(waitFor(2) { migrationStatus() == "cancelled" }, migrationStatus())
        XCTAssertTrue(waitFor(2) { vmm.runState == .running })
        assertGuestRuns(vm, "after the cancel")
        XCTAssertEqual(try client.migrationState(), .running)
    }

    /// The reverse order, with a successor that hangs after READY (the vCPUs are paused for
    /// the handover then): migrate, stop and quit are refused while it lasts, the waiting
    /// destination is never touched, and the hang is detected within the peer timeout and the
    /// old VMM takes the VM back.
    func testAMigrationDuringALiveUpdateIsRefusedAndAHungSuccessorGivesTheVMBack() throws {
        let path = InProcessServer.temporaryPath("rs-cpr")
        let l = try UnixListener(path: path)
        var held: (UnixSocket, CPRState)?
        let successor = try OSThread(name: "hung-successor") {
            guard let s = try? l.accept(timeoutMilliseconds: 10_000), let st = try? CPRState.receive(from: s) else { return }
            try? CPRMessage.send(s, .ready)
            held = (s, st)  // then never answers
        }
        others.append { successor.join(); held?.1.closeAll(); held?.0.close(); l.close() }
        let d = try destination()
        _ = try q("migrate-set-parameters", [("x-vfio-live-peer-timeout", .number(1000))])
        let t0 = monotonicNanoseconds()
        _ = try q("x-vfio-live-update", [("mode", .string("cpr-transfer")), ("to", .string("unix:\(path)"))])
        let m = refusal("migrate", [("uri", .string(d.uri))])
        XCTAssertTrue(m?.contains("a live update is in progress") == true, m ?? "accepted")
        XCTAssertTrue(refusal("stop")?.contains("a live update is in progress") == true)
        XCTAssertTrue(refusal("quit")?.contains("a live update is in progress") == true)
        XCTAssertTrue(refusal("x-vfio-live-update", [("mode", .string("cpr-exec"))])?.contains("a live update is in progress") == true)
        XCTAssertTrue(waitFor(10) { migrationStatus() == "failed" }, migrationStatus())
        let took = Double(monotonicNanoseconds() - t0) / 1e9
        XCTAssertLessThan(took, 8, "the hang is detected within the peer timeout (plus the successor's READY)")
        let why = (try q("query-migrate"))["error-desc"]
        XCTAssertTrue(why?.description.contains("no answer within 1000 ms") == true, "\(String(describing: why))")
        XCTAssertEqual(vmm.runState, .running)
        assertGuestRuns(vm, "taken back from a hung successor")
        XCTAssertEqual(try client.migrationState(), .running, "the device connection was reclaimed")
        XCTAssertEqual(d.vmm.runState, .inmigrate)
        XCTAssertEqual(d.vmm.stats.status, MigrationStats.Status.none, "the destination never saw a connection")
        // With the claim released, a migration now goes through.
        _ = try q("migrate", [("uri", .string(d.uri))])
        XCTAssertTrue(waitFor(30) { migrationStatus() == "completed" }, migrationStatus())
        XCTAssertTrue(waitFor(5) { d.vmm.runState == .running })
    }

    /// A migration refused at the source (a device with enable-migration=off) killed the
    /// waiting destination; now nothing reaches it, and a next attempt migrates into it.
    func testAMigrationRefusedAtTheSourceLeavesTheDestinationWaiting() throws {
        let d = try destination()
        let refused = VirtualMachineManager(vm: vm, policies: [.off], incoming: false)
        XCTAssertThrowsError(try refused.execute("migrate", arguments: .object([("uri", .string(d.uri))]))) { e in
            XCTAssertTrue((e as? QMPError)?.desc.contains("enable-migration=off") == true, "\(e)")
        }
        usleep(200_000)
        XCTAssertEqual(d.vmm.runState, .inmigrate)
        _ = try q("migrate", [("uri", .string(d.uri))])
        XCTAssertTrue(waitFor(30) { migrationStatus() == "completed" }, migrationStatus())
        XCTAssertTrue(waitFor(5) { d.vmm.runState == .running })
        assertGuestRuns(d.vm, "destination after a refused attempt")
    }

    /// QEMU's rule: a source paused when it migrates stays paused on the destination (devices
    /// in STOP), and `cont` there runs it.
    func testAPausedSourceResumesPausedOnTheDestination() throws {
        let d = try destination()
        _ = try q("stop")
        _ = try q("migrate", [("uri", .string(d.uri))])
        XCTAssertTrue(waitFor(30) { migrationStatus() == "completed" }, migrationStatus())
        XCTAssertTrue(waitFor(5) { d.vmm.runState != .inmigrate })
        XCTAssertEqual(d.vmm.runState, .paused)
        XCTAssertTrue(d.vm.isPaused)
        XCTAssertEqual(try d.client.migrationState(), .stop)
        _ = try d.vmm.execute("cont", arguments: nil)
        XCTAssertEqual(d.vmm.runState, .running)
        assertGuestRuns(d.vm, "destination after cont")
        XCTAssertEqual(try d.client.migrationState(), .running)
    }

    /// QEMU's rule: `stop` during a migration is the switch-over point. A migration held back
    /// by a bandwidth limit switches over at once; the guest is paused from the stop on (the
    /// state says so), and the destination stays paused, as the source was at switch-over.
    func testStopDuringAMigrationSwitchesOverAndTheDestinationStaysPaused() throws {
        let d = try destination()
        _ = try q("migrate-set-parameters", [("max-bandwidth", .number(1_000_000))])
        _ = try q("migrate", [("uri", .string(d.uri))])
        XCTAssertTrue(waitFor(5) { migrationStatus() == "active" }, migrationStatus())
        usleep(300_000)
        _ = try q("stop")
        XCTAssertNotEqual(vmm.runState, .running)
        XCTAssertTrue(vm.isPaused, "stopped from the stop on")
        XCTAssertTrue(waitFor(20) { migrationStatus() == "completed" }, "the migration switched over: \(migrationStatus())")
        // The migration thread sets postmigrate just after the status turns completed.
        XCTAssertTrue(waitFor(5) { vmm.runState == .postmigrate }, "\(vmm.runState)")
        XCTAssertTrue(waitFor(5) { d.vmm.runState != .inmigrate })
        XCTAssertEqual(d.vmm.runState, .paused)
        XCTAssertTrue(d.vm.verify().ok)
    }

    // MARK: a device lost

    /// The destination froze the same way when its server died after the switch-over.
    func testADeviceLostOnTheDestinationAfterTheSwitchOverIsInternalError() throws {
        let d = try destination()
        _ = try q("migrate", [("uri", .string(d.uri))])
        XCTAssertTrue(waitFor(30) { migrationStatus() == "completed" }, migrationStatus())
        XCTAssertTrue(waitFor(5) { d.vmm.runState == .running })
        d.server.stop()
        XCTAssertTrue(waitFor(5) { d.vmm.runState == .internalError }, "destination: \(d.vmm.runState)")
        XCTAssertTrue(d.vm.isPaused)
    }

    /// A device lost while a migration runs ends the migration at once, and the VM is in
    /// internal-error afterwards, not "running" over a guest that cannot run.
    func testADeviceLostDuringAMigrationEndsItInInternalError() throws {
        let peer = try silentPeer()
        _ = try q("migrate-set-parameters", [("x-vfio-live-peer-timeout", .number(20_000))])
        _ = try q("migrate", [("uri", .string(peer.uri))])
        XCTAssertTrue(waitFor(5) { migrationStatus() == "active" }, migrationStatus())
        server.stop()
        XCTAssertTrue(waitFor(3) { ["failed", "cancelled"].contains(migrationStatus()) }, migrationStatus())
        XCTAssertTrue(waitFor(2) { vmm.currentOperation == nil })
        XCTAssertEqual(vmm.runState, .internalError)
        XCTAssertTrue(vm.isPaused)
    }

    /// The source's device server died and the guest froze silently with status running. Now:
    /// QEMU's rule for an unrecoverable device error (vm_stop to internal-error): STOP, an event
    /// naming the device, query-status internal-error, and cont/migrate/live update refused.
    func testADeviceServerThatDiesStopsTheVMInInternalErrorAndSaysSo() throws {
        let p = try QMPTests.Peer(path)
        _ = try p.next()
        try p.send(#"{"execute":"qmp_capabilities"}"#); _ = try p.reply()
        server.stop()
        XCTAssertTrue(waitFor(5) { vmm.runState == .internalError }, "state \(vmm.runState)")
        var events: Set<String> = []
        while !(events.contains("STOP") && events.contains("X_VFIO_LIVE_DEVICE_LOST")) {
            let m = try p.next()
            if case let .string(e)? = m["event"] { events.insert(e) }
            if m["event"] == .string("X_VFIO_LIVE_DEVICE_LOST") { XCTAssertEqual(m["data"]?["device"], .number(0)) }
        }
        let st = try q("query-status")
        XCTAssertEqual(st["status"], .string("internal-error"))
        XCTAssertEqual(st["running"], .bool(false))
        XCTAssertTrue(vm.isPaused, "the vCPUs are stopped, as the state says")
        XCTAssertTrue(refusal("cont")?.contains("device 0 lost") == true)
        XCTAssertTrue(refusal("migrate", [("uri", .string("unix:/tmp/nowhere"))])?.contains("internal-error") == true)
        XCTAssertNotNil(refusal("x-vfio-live-update", [("mode", .string("cpr-transfer"))]))
        XCTAssertEqual(try q("x-vfio-live-verify")["ok"], .bool(false), "the verifier says the VM is broken")
    }
}
