import Control
import Devices
import Glibc
import Machine
import Migration
import SystemCalls
import VFIO
import VFIOUser
import XCTest

/// The QMP protocol over a real socket, and the VMM's run-state rules.
final class QMPTests: QMPVMTestCase {
    override class var socketPrefix: String { "qmp" }

    /// A raw QMP peer: send text, read newline-terminated JSON messages.
    final class Peer {
        let s: UnixSocket
        var buf: [UInt8] = []
        init(_ path: String) throws { s = try UnixSocket.connect(path: path) }
        func send(_ text: String) throws { try s.send(Array(text.utf8)) }
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
        /// The next non-event message.
        func reply() throws -> JSONValue { while true { let m = try next(); if m["event"] == nil { return m } } }
    }

    func testGreetingNegotiationErrorsAndIDs() throws {
        let p = try Peer(path)
        let greeting = try p.next()
        XCTAssertNotNil(greeting["QMP"]?["version"]?["qemu"])
        XCTAssertEqual(greeting["QMP"]?["capabilities"], .array([]))
        try p.send(#"{"execute":"query-status","id":1}"#)
        XCTAssertEqual(try p.reply()["error"]?["class"], .string("CommandNotFound"), "commands before negotiation are refused")
        // Two requests in one write, no newline (as qemu.qmp sends them), split by structure.
        try p.send(#"{"execute":"qmp_capabilities","id":"a"}{"execute":"query-status","id":{"n":2}}"#)
        XCTAssertEqual(try p.reply(), .object([("return", .object([])), ("id", .string("a"))]))
        let st = try p.reply()
        XCTAssertEqual(st["return"]?["status"], .string("running"))
        XCTAssertEqual(st["id"], .object([("n", .number(2))]), "ids are echoed as given")
        try p.send(#"{"execute":"no-such","id":3}"#)
        let e = try p.reply()
        XCTAssertEqual(e["error"]?["class"], .string("CommandNotFound"))
        XCTAssertEqual(e["id"], .number(3))
        try p.send(#"{"execute":"migrate","arguments":{"uri":"carrier-pigeon:1"},"id":4}"#)
        XCTAssertEqual(try p.reply()["error"]?["desc"], .string("unknown migration protocol: carrier-pigeon:1"), "QEMU's words")
        try p.send(#"{"nonsense":true}"#)
        XCTAssertNotNil(try p.reply()["error"])
        try p.send(#"{"execute":"migrate-set-parameters","arguments":{"downtime-limit":123,"max-bandwidth":1000000},"id":5}"#)
        _ = try p.reply()
        try p.send(#"{"execute":"query-migrate-parameters","id":6}"#)
        let params = try p.reply()["return"]
        XCTAssertEqual(params?["downtime-limit"], .number(123))
        XCTAssertEqual(params?["max-bandwidth"], .number(1_000_000))
    }

    func testDevicesFollowTheRunStateAndEventsAreSent() throws {
        let p = try Peer(path)
        _ = try p.next()
        try p.send(#"{"execute":"qmp_capabilities"}"#); _ = try p.reply()
        try p.send(#"{"execute":"stop"}"#)
        // The reply and the STOP event may come in either order: read until both arrived.
        var sawStop = false, sawReply = false
        while !(sawStop && sawReply) {
            let m = try p.next()
            if m["event"] == .string("STOP") { sawStop = true }
            if m["return"] != nil { sawReply = true }
        }
        XCTAssertTrue(vm.isPaused)
        XCTAssertEqual(try client.migrationState(), .stop, "a stopped VM's devices are quiesced")
        try p.send(#"{"execute":"query-status"}"#)
        XCTAssertEqual(try p.reply()["return"]?["status"], .string("paused"))
        try p.send(#"{"execute":"cont"}"#)
        _ = try p.reply()
        XCTAssertEqual(try client.migrationState(), .running)
        let w = vm.pagesWritten
        usleep(100_000)
        XCTAssertGreaterThan(vm.pagesWritten, w, "the guest runs again")
        try p.send(#"{"execute":"x-vfio-live-verify"}"#)
        XCTAssertEqual(try p.reply()["return"]?["ok"], .bool(true))
    }

    /// Two VMMs in this process: the QMP handler migrates the running VM over a UNIX socket.
    func testVMMsMigrateOverAUNIXSocket() throws {
        let server2 = try InProcessServer(path: InProcessServer.temporaryPath("qmp-dev2"), stateSize: 1 << 20)
        let client2 = try VFIOUserClient(path: server2.path)
        var w = WorkloadConfig(); w.workingSet = 4 << 20
        let vm2 = try MicroVM(memorySize: 32 << 20, workload: w, devices: [client2])
        let dest = VirtualMachineManager(vm: vm2, policies: [.auto], incoming: true)
        defer { vm2.stop(); client2.close(); server2.stop() }
        let sock = InProcessServer.temporaryPath("mig")
        try dest.startIncoming(uri: "unix:\(sock)")
        XCTAssertEqual(dest.runState, .inmigrate)
        usleep(200_000)
        _ = try vmm.execute("migrate", arguments: .object([("uri", .string("unix:\(sock)"))]))
        let deadline = monotonicNanoseconds() + 30_000_000_000
        var status = ""
        while monotonicNanoseconds() < deadline {
            if case let .string(s)? = try vmm.execute("query-migrate", arguments: nil)["status"] { status = s }
            if ["completed", "failed", "cancelled"].contains(status) { break }
            usleep(20_000)
        }
        XCTAssertEqual(status, "completed")
        XCTAssertEqual(vmm.runState, .postmigrate)
        let t = monotonicNanoseconds() + 5_000_000_000
        while dest.runState != .running && monotonicNanoseconds() < t { usleep(10_000) }
        XCTAssertEqual(dest.runState, .running)
        XCTAssertTrue(vm2.verify().ok)
        XCTAssertEqual(vmm.deviceDigests, dest.deviceDigests, "device memory identical")
        XCTAssertEqual(try client2.migrationState(), .running)
    }
}
