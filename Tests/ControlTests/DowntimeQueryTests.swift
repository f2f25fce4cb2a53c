import Control
import Devices
import Glibc
import Machine
import Migration
import SystemCalls
import VFIO
import VFIOUser
import XCTest

/// Issue 12, item 4: query-migrate carries the measured downtime's breakdown, the prediction's,
/// and the costs measured in this migration that the prediction is made of.
extension QMPTests {
    func testQueryMigrateCarriesTheDowntimeBreakdownsAndThePredictionsInputs() throws {
        let server2 = try InProcessServer(path: InProcessServer.temporaryPath("qmp-dev3"), stateSize: 1 << 20)
        let client2 = try VFIOUserClient(path: server2.path)
        var w = WorkloadConfig(); w.workingSet = 4 << 20
        let vm2 = try MicroVM(memorySize: 32 << 20, workload: w, devices: [client2])
        let dest = VirtualMachineManager(vm: vm2, policies: [.auto], incoming: true)
        defer { vm2.stop(); client2.close(); server2.stop() }
        let sock = InProcessServer.temporaryPath("mig-dt")
        try dest.startIncoming(uri: "unix:\(sock)")
        usleep(200_000)
        _ = try vmm.execute("migrate", arguments: .object([("uri", .string("unix:\(sock)"))]))
        let deadline = monotonicNanoseconds() + 30_000_000_000
        var q = JSONValue.object([])
        while monotonicNanoseconds() < deadline {
            q = try vmm.execute("query-migrate", arguments: nil)
            if case let .string(s)? = q["status"], ["completed", "failed", "cancelled"].contains(s) { break }
            usleep(20_000)
        }
        XCTAssertEqual(q["status"], .string("completed"))
        guard case let .number(downtime)? = q["downtime"], case let .number(total)? = q["x-downtime-breakdown"]?["total"] else {
            return XCTFail("no downtime or breakdown in \(q)")
        }
        XCTAssertEqual(total, downtime, accuracy: 0.51, "the phases sum to the downtime (which query-migrate rounds)")
        XCTAssertNotNil(q["x-expected-downtime-breakdown"]?["handshake"])
        let i = try XCTUnwrap(q["x-downtime-inputs"], "the prediction's inputs")
        XCTAssertEqual(i["destination-answers-probes"], .bool(true))
        XCTAssertEqual(i["caught-up-at-stop"], .bool(true))
        for key in ["ram-rate", "harvest", "destination-backlog", "round-trip", "catch-up", "send-queue-at-end"] {
            guard case .number(let v)? = i[key] else { XCTFail("\(key) is not a number in \(i)"); continue }
            XCTAssertGreaterThanOrEqual(v, 0, key)
        }
        guard case let .array(trips)? = i["device-round-trips"] else { return XCTFail("no device round trips in \(i)") }
        XCTAssertEqual(trips.count, 1, "one per device")
    }
}
