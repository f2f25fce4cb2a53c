import Control
import Devices
import Glibc
import Machine
import SystemCalls
import VFIOUser
import XCTest

/// `migrate_cancel` over QMP while the device's server hangs on MIG_DATA_READ, so that the
/// rollback cannot bring the device back to RUNNING (CancelHungDeviceTests covers the
/// engine; this is the `vm run` VMM around it). QEMU's rule for a device that cannot be
/// recovered: vfio_migration_set_state falls back to a reset, and when that fails too it
/// calls hw_error() (qemu-design-notes 1.5); an unrecoverable device error stops the VM in
/// internal-error (vfio_err_notifier_handler). vfio-live takes the second and keeps answering
/// QMP: the VM stops in internal-error, query-migrate says cancelled with the device named, and
/// the VMM is never seen "running" over a device it lost.
final class CancelHungDeviceVMMTests: QMPVMTestCase {
    override class var socketPrefix: String { "chdv" }
    override class var workload: WorkloadConfig {
        var w = WorkloadConfig(); w.workingSet = 8 << 20; w.dirtyRate = 20_000; w.dmaEvery = 4; return w
    }
    var relay: HoldingRelay!
    var sink: OSThread?
    var sinkListener: UnixListener?

    override func connectDevice(to serverPath: String) throws -> VFIOUserClient {
        relay = try HoldingRelay(to: serverPath, tag: "chdv-relay")
        var o = VFIOUserClient.Options()
        o.offerTwinSocket = false  // one connection for the relay to carry
        return try VFIOUserClient(path: relay.path, options: o)
    }

    override func tearDown() {
        super.tearDown()
        relay?.close(); sinkListener?.close(); sink?.join()
    }

    /// A destination that reads and discards everything: the hang is the device's.
    func startSink() throws -> String {
        let p = InProcessServer.temporaryPath("chdv-mig")
        let l = try UnixListener(path: p)
        sinkListener = l
        sink = try OSThread(name: "sink") {
            guard let s = try? l.accept(timeoutMilliseconds: 10_000) else { return }
            var b = [UInt8](repeating: 0, count: 1 << 16)
            while recv(s.fd.rawValue, &b, b.count, 0) > 0 {}
            s.close()
        }
        return "unix:\(p)"
    }

    func testMigrateCancelWithADeviceHungOnMigDataReadStopsInInternalErrorAndQMPStillAnswers() throws {
        let p = try QMPTests.Peer(path)
        QMPExactIntegerTests.setReceiveTimeout(p.s.fd.rawValue, seconds: 5)  // an answer within 5 s, or the test fails
        _ = try p.next()
        try p.send(#"{"execute":"qmp_capabilities"}"#); _ = try p.reply()
        var events: [String] = []
        func ask(_ cmd: String, _ args: String = "") throws -> JSONValue {
            try p.send(#"{"execute":"\#(cmd)"\#(args.isEmpty ? "" : #","arguments":"# + args)}"#)
            while true {
                let m = try p.next()
                guard case let .string(e)? = m["event"] else { return m }
                events.append(e)
            }
        }
        _ = try ask("migrate-set-parameters", #"{"x-vfio-live-peer-timeout":60000}"#)  // nothing else times out
        relay.holdNextRead = .infinity
        XCTAssertEqual(try ask("migrate", #"{"uri":"\#(try startSink())"}"#)["return"], .object([]))
        XCTAssertTrue(try Poll.waitReadable(relay.holding.fd, timeoutMilliseconds: 20_000), "a MIG_DATA_READ was sent and is held")
        usleep(50_000)
        // Watch the VMM from here on: once the migration no longer holds the VM (read first),
        // its run state must not say running over the lost device.
        let watching = Condition()
        var stopWatching = false, states: Set<String> = []
        let watcher = try OSThread(name: "watch") { [vmm] in
            while !watching.mutex.withLock({ stopWatching }) {
                let op = vmm!.currentOperation
                let s = vmm!.runState.rawValue
                if op == nil { watching.mutex.withLock { _ = states.insert(s) } }
            }
        }
        let t0 = monotonicNanoseconds()
        XCTAssertEqual(try ask("migrate_cancel")["return"], .object([]), "migrate_cancel answers at once")
        events = []
        var q = JSONValue.null
        let deadline = monotonicNanoseconds() + 8_000_000_000
        repeat { q = try ask("query-migrate")["return"] ?? .null; usleep(20_000) }
        while !["cancelled", "failed"].contains(text(q["status"])) && monotonicNanoseconds() < deadline
        let took = Double(monotonicNanoseconds() - t0) / 1e9
        XCTAssertEqual(q["status"], .string("cancelled"), "\(q)")
        XCTAssertLessThan(took, 8, "cancel gave up on the hung device (the device timeout is 10 s)")
        let outcome = text(q["x-vfio-live"]?["source-outcome"])
        XCTAssertTrue(outcome.contains("device 0 is lost"), "query-migrate names the device and why: \(q)")
        XCTAssertTrue(waitFor(5) { vmm.currentOperation == nil })
        watching.mutex.withLock { stopWatching = true }
        watcher.join()
        XCTAssertEqual(try ask("query-status")["return"]?["status"], .string("internal-error"), "QEMU's run state for a lost device")
        XCTAssertTrue(vm.isPaused, "the vCPUs are stopped, as the state says")
        XCTAssertFalse(states.contains("running"), "after the migration, the run state never said running over a lost device: \(states)")
        let cont = try ask("cont")
        XCTAssertTrue(text(cont["error"]?["desc"]).contains("device 0 lost"), "\(cont)")
        XCTAssertEqual(try ask("query-migrate")["return"]?["status"], .string("cancelled"), "the QMP server still answers")
        let t1 = monotonicNanoseconds()
        let devices = try ask("x-vfio-live-devices")
        XCTAssertLessThan(Double(monotonicNanoseconds() - t1) / 1e9, 2, "x-vfio-live-devices answers without the device timeout")
        // The events say so: STOP and the device, and no RESUME (the guest never ran again).
        while !events.contains("X_VFIO_LIVE_DEVICE_LOST") {
            let m = try p.next()
            if case let .string(e)? = m["event"] { events.append(e) }
        }
        XCTAssertTrue(events.contains("STOP"), "\(events)")
        XCTAssertFalse(events.contains("RESUME"), "\(events)")
        guard case let .array(list)? = devices["return"], let first = list.first else { return XCTFail("\(devices)") }
        XCTAssertEqual(first["state"], .string("unreachable"), "the lost device is said so, without a wait on its hung server: \(devices)")
    }

    func text(_ v: JSONValue?) -> String { if case let .string(s)? = v { return s }; return "" }

    func waitFor(_ seconds: Double, _ cond: () -> Bool) -> Bool {
        let deadline = monotonicNanoseconds() + UInt64(seconds * 1e9)
        while !cond() { if monotonicNanoseconds() > deadline { return false }; usleep(5_000) }
        return true
    }
}
