import Foundation
import Glibc
import XCTest
import SystemCalls
@testable import VFIOUser

/// A scripted vfio-user server on a real socket that answers VERSION and then every request in
/// order (as the spec has a server do), each reply after the delay given for its request number
/// (1 = the first request after VERSION). DEVICE_GET_INFO is answered with `regionCount` = the
/// request number, MIG_DATA_READ with `size` bytes all equal to the request number: a reply
/// taken for another request's shows.
final class LateServer: @unchecked Sendable {
    let path: String
    private let listener: UnixListener
    private let stop: EventFD
    private var thread: Thread?
    private let lock = NSLock()
    private var sock: UnixSocket?
    private var delays: [Int: Double]
    private var answeredStorage = 0
    var answered: Int { lock.withLock { answeredStorage } }

    init(tag: String, delays: [Int: Double]) throws {
        path = temporarySocketPath(tag)
        listener = try UnixListener(path: path, backlog: 2)
        stop = try EventFD(nonBlocking: true)
        self.delays = delays
        let t = Thread { [self] in
            guard let s = try? listener.accept(cancel: stop.fd) else { return }
            lock.withLock { sock = s }
            let c = VFIOUserConnection(socket: s)
            guard let v = try? c.receive() else { return }
            try? c.sendReply(to: v.header, payload: VersionPayload(capabilities: Capabilities()).encode())
            var n = 0
            while let m = try? c.receive() {
                m.closeFDs()
                n += 1
                if let d = delays[n] { usleep(UInt32(d * 1e6)) }
                switch m.header.knownCommand {
                case .deviceGetInfo?:
                    try? c.sendReply(to: m.header, payload: DeviceInfo(flags: 0, regionCount: UInt32(n), irqCount: 0).encode())
                case .migDataRead?:
                    var r = WireReader(m.payload[...], context: "test")
                    _ = try? r.u32()
                    let size = Int((try? r.u32()) ?? 0)
                    var w = WireWriter(); w.u32(UInt32(8 + size)); w.u32(UInt32(size))
                    try? c.sendReply(to: m.header, payload: w.bytes + [UInt8](repeating: UInt8(truncatingIfNeeded: n), count: size))
                default:
                    try? c.sendReply(to: m.header)
                }
                lock.withLock { answeredStorage = n }
            }
        }
        thread = t
        t.start()
    }

    func close() {
        try? stop.signal()
        lock.withLock { if let s = sock { _ = shutdown(s.fd.rawValue, Int32(SHUT_RDWR)) } }
        while thread?.isFinished == false { usleep(1000) }
        lock.withLock { sock?.close(); sock = nil }
        listener.close()
    }
}

/// Recorded bug (hostile pass): after a wait on the server was cut (timeout, cancel), the client
/// refused every later call for good, even once the server had answered. QEMU's vfio-user proxy
/// (hw/vfio-user/proxy.c) forgets a timed-out request and drops a later reply to it as an
/// "unexpected reply" while the connection stays up; the client does the same: calls fail at
/// once while the late reply is still owed (a hung server is not waited for again and again),
/// and once it came it is dropped and the next call gets its own reply.
final class LateReplyTests: XCTestCase {
    /// The scripted server answers on its main socket only.
    func options(_ ms: Int32, cancel: Int32? = nil) -> VFIOUserClient.Options { timeoutOptions(ms, cancel: cancel, twinSocket: false) }

    func waitUntil(_ what: String, within s: Double = 5, _ cond: () -> Bool) {
        let end = monotonicNanoseconds() + UInt64(s * 1e9)
        while !cond() && monotonicNanoseconds() < end { usleep(10_000) }
        XCTAssertTrue(cond(), what)
    }

    func testALateReplyAfterATimeoutIsDroppedAndTheConnectionWorksAgainAsInQEMU() throws {
        let server = try LateServer(tag: "late", delays: [1: 0.8])
        defer { server.close() }
        let c = try VFIOUserClient(path: server.path, options: options(300))
        defer { c.close() }
        XCTAssertThrowsError(try c.deviceInfo()) {
            XCTAssertEqual($0 as? VFIOUserClientError, .timeout(command: .deviceGetInfo, seconds: 0.3))
        }
        // Still owed: the next call fails at once with the cause, without a second wait.
        let t0 = monotonicNanoseconds()
        XCTAssertThrowsError(try c.deviceInfo()) {
            XCTAssertEqual($0 as? VFIOUserClientError, .timeout(command: .deviceGetInfo, seconds: 0.3))
        }
        XCTAssertLessThan(Double(monotonicNanoseconds() - t0) / 1e9, 0.2, "fails at once while the reply is owed")
        waitUntil("the server answered the first request late") { server.answered >= 1 }
        usleep(50_000)
        // The late reply (regionCount 1) is dropped; this call's own reply is request 2's.
        XCTAssertEqual(try c.deviceInfo().regionCount, 2)
        XCTAssertEqual(try c.deviceInfo().regionCount, 3, "and the connection stays in step")
    }

    /// Live update: the handover record carries no owed replies, so a connection that owes one
    /// is not handed over (the successor would take the late reply for its own); refused, it
    /// stays this process's and works on; once the reply came it is handed over as usual.
    func testAConnectionOwingALateReplyIsNotHandedOverUntilTheReplyCame() throws {
        let server = try LateServer(tag: "latehandover", delays: [1: 0.8])
        defer { server.close() }
        let c = try VFIOUserClient(path: server.path, options: options(300))
        defer { c.close() }
        XCTAssertNil(c.handoverBlocker(), "a connection in step can be handed over")
        XCTAssertThrowsError(try c.deviceInfo())
        let why = try XCTUnwrap(c.handoverBlocker())
        XCTAssertTrue(why.contains("owes the reply to 1 request"), why)
        XCTAssertThrowsError(try c.releaseForHandoverInStep()) {
            guard case .handoverRefused? = $0 as? VFIOUserClientError else { return XCTFail("\($0)") }
        }
        XCTAssertFalse(c.isHandedOver)
        // The live update's rollback thaws every device it froze: a refused one is left as it is.
        c.reclaimAfterHandover()
        waitUntil("the server answered the first request late") { server.answered >= 1 }
        usleep(50_000)
        XCTAssertNil(c.handoverBlocker(), "the late reply came and was dropped")
        XCTAssertEqual(try c.deviceInfo().regionCount, 2)
        try c.releaseForHandoverInStep()
        XCTAssertTrue(c.isHandedOver)
        XCTAssertThrowsError(try c.deviceInfo()) { XCTAssertEqual($0 as? VFIOUserClientError, .handedOver) }
        c.reclaimAfterHandover()
        XCTAssertEqual(try c.deviceInfo().regionCount, 3, "taken back, in step")
    }

    func testALateReplyAfterACancelIsDroppedOnceTheCancelIsWithdrawn() throws {
        let server = try LateServer(tag: "latecancel", delays: [1: 0.6])
        defer { server.close() }
        let cancel = try EventFD(nonBlocking: true)
        let c = try VFIOUserClient(path: server.path, options: options(10_000, cancel: cancel.fd.rawValue))
        defer { c.close() }
        let signaller = Thread { usleep(150_000); try? cancel.signal() }
        signaller.start()
        XCTAssertThrowsError(try c.deviceInfo()) {
            XCTAssertEqual($0 as? VFIOUserClientError, .cancelled(command: .deviceGetInfo))
        }
        _ = try cancel.consume()
        waitUntil("the server answered the cancelled request") { server.answered >= 1 }
        usleep(50_000)
        XCTAssertEqual(try c.deviceInfo().regionCount, 2)
    }

    /// The migration-data path (its own reply pipeline) owes its cut request the same way.
    func testALateMigDataReadReplyIsDroppedAndTheNextReadGetsItsOwnData() throws {
        let server = try LateServer(tag: "lateread", delays: [1: 0.8])
        defer { server.close() }
        let c = try VFIOUserClient(path: server.path, options: options(300))
        defer { c.close() }
        XCTAssertThrowsError(try c.readMigrationData(max: 4096)) {
            XCTAssertEqual($0 as? VFIOUserClientError, .timeout(command: .migDataRead, seconds: 0.3))
        }
        XCTAssertThrowsError(try c.readMigrationData(max: 4096), "still owed: refused at once")
        waitUntil("the server answered the read late") { server.answered >= 1 }
        usleep(50_000)
        let data = try c.readMigrationData(max: 4096)
        XCTAssertEqual(data.count, 4096)
        XCTAssertEqual(Set(data), [2], "this read's own data, not the late reply's (all 1)")
        XCTAssertEqual(try c.deviceInfo().regionCount, 3)
    }
}
