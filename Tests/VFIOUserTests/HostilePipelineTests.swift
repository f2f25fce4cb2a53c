import Glibc
import SystemCalls
import VFIO
@testable import VFIOUser
import XCTest

/// A raw vfio-user server that speaks just enough: it answers VERSION (no twin socket), then
/// hands every message to `handle`, which answers as it likes through `raw` (any bytes) or
/// `conn`. Not the project's server: nothing is checked or answered unless the test says so.
final class HostileServer: @unchecked Sendable {
    let path: String
    private let listener: UnixListener
    private var thread: OSThread?
    private let lock = Mutex()
    private var socket: UnixSocket?
    /// Every command the client sent, in order (command, id, payload).
    private(set) var seen: [(UInt16, UInt16, [UInt8])] = []

    init(tag: String, handle: @escaping (Message, VFIOUserConnection) throws -> Void) throws {
        path = temporarySocketPath(tag)
        listener = try UnixListener(path: path, backlog: 2)
        thread = try OSThread(name: "scripted") { [self] in
            guard let s = try? listener.accept(timeoutMilliseconds: 10_000) else { return }
            lock.withLock { socket = s }
            let c = VFIOUserConnection(socket: s, maxReceiveFDs: 8, maxMessageSize: 80 << 20)
            guard let v = try? c.receive() else { return }
            v.closeFDs()
            try? c.sendReply(to: v.header, payload: VersionPayload(capabilities: Capabilities()).encode())
            while let m = try? c.receive() {
                lock.withLock { seen.append((m.header.command, m.header.messageID, m.payload)) }
                m.closeFDs()
                do { try handle(m, c) } catch { break }
            }
            _ = shutdown(s.fd.rawValue, Int32(SHUT_RDWR))  // the handler threw: hang up
        }
    }

    var commands: [(UInt16, UInt16, [UInt8])] { lock.withLock { seen } }

    func close() {
        lock.withLock { socket.map { _ = shutdown($0.fd.rawValue, Int32(SHUT_RDWR)) } }
        thread?.join(); thread = nil
        lock.withLock { socket?.close(); socket = nil }
        listener.close()
    }

    deinit { close() }

    /// Raw bytes: a header of our choosing, then `body`.
    static func header(id: UInt16, command: VFIOUserCommand, size: UInt32, flags: UInt32 = MessageHeader.typeReply, errno: UInt32 = 0) -> [UInt8] {
        MessageHeader(messageID: id, command: command.rawValue, messageSize: size, flags: flags, errorNumber: errno).bytes
    }
    /// A MIG_DATA_READ reply: argsz, size, then `data`.
    static func readReply(id: UInt16, data: [UInt8], argsz: UInt32? = nil, size: UInt32? = nil) -> [UInt8] {
        var w = WireWriter(); w.u32(argsz ?? UInt32(8 + data.count)); w.u32(size ?? UInt32(data.count)); w.append(data)
        return header(id: id, command: .migDataRead, size: UInt32(16 + 8 + data.count)) + w.bytes
    }
    static func le32(_ p: [UInt8], _ at: Int) -> UInt32 { p[at..<(at + 4)].reversed().reduce(0) { $0 << 8 | UInt32($1) } }
    static func le64(_ p: [UInt8], _ at: Int) -> UInt64 { p[at..<(at + 8)].reversed().reduce(0) { $0 << 8 | UInt64($1) } }
}

func hostileOpenFDs() -> Int { (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd").count) ?? -1 }

/// Task: pipelined MIG_DATA_READ replies from a hostile server, through the public API only
/// (`readMigrationData(into:)`, `relayMigrationData(to:)`), so that they hold for any
/// pipeline. Each ends with a precise error, within the client's timeout (1 s here), without
/// leaking a descriptor; after an error the connection is either back in step (a next call
/// works) or refuses every call with the reason.
final class HostilePipelineTests: XCTestCase {
    var servers: [HostileServer] = []
    var clients: [VFIOUserClient] = []
    var fdsBefore = 0

    override func setUp() { fdsBefore = hostileOpenFDs() }
    override func tearDown() {
        for c in clients { c.close() }
        for s in servers { s.close() }
        clients = []; servers = []
        XCTAssertLessThanOrEqual(hostileOpenFDs(), fdsBefore, "no descriptor leaked")
    }

    func client(_ handle: @escaping (Message, VFIOUserConnection) throws -> Void) throws -> (VFIOUserClient, HostileServer) {
        let s = try HostileServer(tag: "hp", handle: handle)
        servers.append(s)
        var o = VFIOUserClient.Options(); o.timeoutMilliseconds = 1000; o.offerTwinSocket = false
        let c = try VFIOUserClient(path: s.path, options: o)
        clients.append(c)
        return (c, s)
    }

    /// A destination that takes every MIG_DATA_WRITE.
    func sink() throws -> VFIOUserClient {
        try client { m, c in
            if m.header.command == VFIOUserCommand.migDataWrite.rawValue { try c.sendReply(to: m.header) }
        }.0
    }

    /// Answers MIG_DEVICE_STATE GET with RUNNING (the "next call" that shows the stream in step).
    static func answerState(_ m: Message, _ c: VFIOUserConnection) throws -> Bool {
        guard m.header.command == VFIOUserCommand.deviceFeature.rawValue else { return false }
        var w = WireWriter(); w.u32(16); w.u32(DeviceFeature.migDeviceState | DeviceFeature.get); w.u32(MigrationState.running.rawValue); w.i32(-1)
        try c.sendReply(to: m.header, payload: w.bytes)
        return true
    }

    func timed<T>(_ what: String, bound: Double = 5, _ f: () throws -> T) -> (Result<T, Error>, Double) {
        let t0 = monotonicNanoseconds()
        let r = Result { try f() }
        let s = Double(monotonicNanoseconds() - t0) / 1e9
        XCTAssertLessThan(s, bound, "\(what) answered within \(bound) s")
        return (r, s)
    }

    func assertViolation<T>(_ r: Result<T, Error>, _ contains: String, file: StaticString = #filePath, line: UInt = #line) {
        guard case let .failure(e) = r else { return XCTFail("no error", file: file, line: line) }
        guard case let .protocolViolation(why)? = e as? VFIOUserClientError else { return XCTFail("error: \(e)", file: file, line: line) }
        XCTAssertTrue(why.contains(contains), why, file: file, line: line)
    }

    // MARK: out of order, duplicated, unasked

    /// Pipelined reads answered newest first: a violation, and the stream is back in step.
    func testRepliesOutOfOrder() throws {
        var held: [MessageHeader] = []
        let (src, _) = try client { m, c in
            if try Self.answerState(m, c) { return }
            held.append(m.header)
            if held.count == 2 {
                for h in held.reversed() { try c.socket.send(HostileServer.readReply(id: h.messageID, data: [UInt8](repeating: 7, count: 64))) }
                held = []
            }
        }
        let dst = try sink()
        let (r, _) = timed("an out-of-order relay") { try src.relayMigrationData(to: dst, chunk: 4096, depth: 2) }
        assertViolation(r, "out of order")
        XCTAssertEqual(try src.migrationState(), .running, "the connection is back in step")
    }

    func testDuplicatedReplyID() throws {
        let (src, _) = try client { m, c in
            if try Self.answerState(m, c) { return }
            let r = HostileServer.readReply(id: m.header.messageID, data: [1, 2, 3])
            try c.socket.send(r + r)
        }
        let (r, _) = timed("a duplicated reply") { () -> Int in
            var b = [UInt8](repeating: 0, count: 4096)
            let n1 = try b.withUnsafeMutableBytes { try src.readMigrationData(into: $0) }
            XCTAssertEqual(n1, 3)
            return try b.withUnsafeMutableBytes { try src.readMigrationData(into: $0) }
        }
        assertViolation(r, "out of order")
    }

    func testReplyForAMessageNeverSent() throws {
        let (src, _) = try client { m, c in
            if try Self.answerState(m, c) { return }
            try c.socket.send(HostileServer.readReply(id: m.header.messageID &+ 1000, data: [1]))
        }
        var b = [UInt8](repeating: 0, count: 4096)
        let (r, _) = timed("an unasked reply") { try b.withUnsafeMutableBytes { try src.readMigrationData(into: $0) } }
        assertViolation(r, "id")
    }

    // MARK: sizes

    func testReplyWithMoreDataThanAsked() throws {
        let (src, _) = try client { m, c in
            if try Self.answerState(m, c) { return }
            try c.socket.send(HostileServer.readReply(id: m.header.messageID, data: [UInt8](repeating: 9, count: 8192)))
        }
        var b = [UInt8](repeating: 0, count: 4096)
        let (r, _) = timed("an oversized reply") { try b.withUnsafeMutableBytes { try src.readMigrationData(into: $0) } }
        assertViolation(r, "4096-byte read")
        XCTAssertEqual(try src.migrationState(), .running, "the oversized reply was drained: in step")
    }

    /// The reply's own size field near 2^32, in a reply of normal length.
    func testSizeFieldNear2To32() throws {
        let (src, _) = try client { m, c in
            if try Self.answerState(m, c) { return }
            try c.socket.send(HostileServer.readReply(id: m.header.messageID, data: [1, 2, 3, 4], argsz: .max, size: .max - 7))
        }
        var b = [UInt8](repeating: 0, count: 4096)
        let (r, _) = timed("a huge size field") { try b.withUnsafeMutableBytes { try src.readMigrationData(into: $0) } }
        assertViolation(r, "returned size 4294967288")
        XCTAssertEqual(try src.migrationState(), .running)
    }

    /// A header announcing a 4 GiB reply, then nothing: bounded by the timeout, not read.
    func testMessageSizeNear2To32ThenSilence() throws {
        let (src, _) = try client { m, c in
            try c.socket.send(HostileServer.header(id: m.header.messageID, command: .migDataRead, size: .max))
        }
        var b = [UInt8](repeating: 0, count: 4096)
        let (r, _) = timed("a 4 GiB header") { try b.withUnsafeMutableBytes { try src.readMigrationData(into: $0) } }
        // Before: the drain's raw EAGAIN came out, and the connection was not marked broken.
        guard case let .failure(e) = r, case .timeout(.migDataRead, _)? = e as? VFIOUserClientError else { return XCTFail("\(r)") }
        XCTAssertThrowsError(try src.migrationState(), "a stream out of step refuses later calls") {
            XCTAssertTrue("\($0)".contains("did not answer MIG_DATA_READ"), "\($0)")
        }
    }

    /// A reply whose message size is below the header's 16 bytes.
    func testMessageSizeSmallerThanTheHeader() throws {
        let (src, _) = try client { m, c in try c.socket.send(HostileServer.header(id: m.header.messageID, command: .migDataRead, size: 3)) }
        var b = [UInt8](repeating: 0, count: 4096)
        let (r, _) = timed("a 3-byte message") { try b.withUnsafeMutableBytes { try src.readMigrationData(into: $0) } }
        assertViolation(r, "smaller than the 16-byte header")
    }

    // MARK: stops, closes, never ends

    func testServerStopsMidPayload() throws {
        let (src, _) = try client { m, c in
            let full = HostileServer.readReply(id: m.header.messageID, data: [UInt8](repeating: 5, count: 4096))
            try c.socket.send(Array(full.prefix(100)))  // then silence
        }
        var b = [UInt8](repeating: 0, count: 4096)
        let (r, _) = timed("a reply cut half-way") { try b.withUnsafeMutableBytes { try src.readMigrationData(into: $0) } }
        guard case let .failure(e) = r, case .timeout? = e as? VFIOUserClientError else { return XCTFail("\(r)") }
        XCTAssertThrowsError(try src.migrationState()) { XCTAssertTrue("\($0)".contains("did not answer"), "\($0)") }
    }

    func testServerClosesMidPayloadOfAPipelinedRelay() throws {
        var n = 0
        let (src, _) = try client { m, c in
            n += 1
            let full = HostileServer.readReply(id: m.header.messageID, data: [UInt8](repeating: 5, count: 4096))
            if n < 3 { try c.socket.send(full) } else { try c.socket.send(Array(full.prefix(50))); throw Errno.ECONNRESET }
        }
        let dst = try sink()
        let (r, _) = timed("a relay whose source dies") { try src.relayMigrationData(to: dst, chunk: 4096, depth: 4) }
        guard case let .failure(e) = r else { return XCTFail("no error") }
        XCTAssertEqual(e as? VFIOUserClientError, .disconnected, "\(e)")
    }

    /// Full-size replies forever would be a device that always has data (PRE_COPY may); a
    /// zero-length one ends the data: the relay stops at the first one and its in-flight reads.
    func testZeroLengthReplyEndsTheRelay() throws {
        let (src, _) = try client { m, c in
            if try Self.answerState(m, c) { return }
            try c.socket.send(HostileServer.readReply(id: m.header.messageID, data: []))
        }
        let dst = try sink()
        let (r, _) = timed("a zero-length reply") { try src.relayMigrationData(to: dst, chunk: 4096, depth: 4) }
        XCTAssertEqual(try r.get(), 0)
        XCTAssertEqual(try src.migrationState(), .running)
    }

    /// An error reply in the middle of a pipeline: the errno, and the stream in step.
    func testErrorReplyMidPipeline() throws {
        var n = 0
        let (src, _) = try client { m, c in
            if try Self.answerState(m, c) { return }
            n += 1
            if n == 2 { try c.sendError(to: m.header, errno: Errno(EIO)) } else {
                try c.socket.send(HostileServer.readReply(id: m.header.messageID, data: [UInt8](repeating: 1, count: 4096)))
            }
        }
        let dst = try sink()
        let (r, _) = timed("an error mid-pipeline") { try src.relayMigrationData(to: dst, chunk: 4096, depth: 4) }
        guard case let .failure(e) = r else { return XCTFail("no error") }
        XCTAssertEqual(e as? VFIOUserClientError, .remote(command: .migDataRead, errno: Errno(EIO)))
        XCTAssertEqual(try src.migrationState(), .running, "in step after the error")
    }

    /// A reply carrying descriptors: refused, and the descriptors closed.
    func testReplyCarryingDescriptors() throws {
        let (src, _) = try client { m, c in
            if try Self.answerState(m, c) { return }
            let e = try EventFD()
            try c.socket.send(HostileServer.readReply(id: m.header.messageID, data: [1]), fds: [e.fd.rawValue, e.fd.rawValue])
        }
        let before = hostileOpenFDs()
        var b = [UInt8](repeating: 0, count: 4096)
        let (r, _) = timed("a reply with fds") { try b.withUnsafeMutableBytes { try src.readMigrationData(into: $0) } }
        assertViolation(r, "file descriptors")
        XCTAssertEqual(try src.migrationState(), .running)
        XCTAssertLessThanOrEqual(hostileOpenFDs(), before, "the received descriptors were closed")
    }
}

/// Task 2b: the page size the server returns from DMA_LOGGING_START is the granularity of its
/// reports (the kernel uAPI: page_size is a hint, the device returns the one it chose). The
/// client used to ignore it and ask REPORT for 4 KiB bitmaps regardless.
final class DMALoggingPageSizeTests: XCTestCase {
    var server: HostileServer?
    var client: VFIOUserClient?
    override func tearDown() { client?.close(); server?.close() }

    /// A server that logs at `chosen` (and answers START with `reply`, default `chosen`), and
    /// refuses a REPORT at another page size; its report marks pages 1 and 3 dirty.
    func start(chosen: UInt64, replyData: [UInt8]? = nil) throws -> (VFIOUserClient, HostileServer) {
        let s = try HostileServer(tag: "dls") { m, c in
            guard m.header.command == VFIOUserCommand.deviceFeature.rawValue else { return }
            let p = m.payload, flags = HostileServer.le32(p, 4)
            switch flags & DeviceFeature.indexMask {
            case DeviceFeature.dmaLoggingStart:
                var w = WireWriter(); w.u32(HostileServer.le32(p, 0)); w.u32(flags)
                if let d = replyData { w.append(d) } else { w.u64(chosen); w.append(p[16...]) }
                try c.sendReply(to: m.header, payload: w.bytes)
            case DeviceFeature.dmaLoggingStop:
                try c.sendReply(to: m.header, payload: Array(p[0..<8]))
            case DeviceFeature.dmaLoggingReport:
                let length = HostileServer.le64(p, 16), ps = HostileServer.le64(p, 24)
                guard ps == chosen else { return try c.sendError(to: m.header, errno: Errno(EINVAL)) }
                let pages = (length + ps - 1) / ps
                var bits = [UInt64](repeating: 0, count: Int((pages + 63) / 64)); bits[0] = 0b1010
                var w = WireWriter(); w.append(p[0..<32]); w.append(bits.littleEndianBytes)
                try c.sendReply(to: m.header, payload: w.bytes)
            default: try c.sendError(to: m.header, errno: Errno(ENOTTY))
            }
        }
        server = s
        var o = VFIOUserClient.Options(); o.timeoutMilliseconds = 2000; o.offerTwinSocket = false
        let c = try VFIOUserClient(path: s.path, options: o)
        client = c
        return (c, s)
    }

    func testTheServersCoarserPageSizeIsHonouredAndItsReportRebased() throws {
        let (c, _) = try start(chosen: 16384)
        try c.startDMALogging(pageSize: 4096, ranges: [(0, 1 << 20)])
        XCTAssertEqual(c.dmaLoggingPageSize, 16384)
        let words = try c.dmaLoggingReport(iova: 0, length: 1 << 20, pageSize: 4096)
        // Server pages 1 and 3 (16 KiB each) are 4 KiB pages 4-7 and 12-15.
        XCTAssertEqual(words.first, 0b1111_0000_1111_0000)
        XCTAssertEqual(words.count, 4)
        XCTAssertTrue(words.dropFirst().allSatisfy { $0 == 0 })
    }

    /// A finer server granularity ORs into the caller's pages.
    func testAFinerPageSizeIsORedIntoTheCallersPages() throws {
        let (c, _) = try start(chosen: 1024)
        try c.startDMALogging(pageSize: 4096, ranges: [(0, 1 << 16)])
        let words = try c.dmaLoggingReport(iova: 0, length: 1 << 16, pageSize: 4096)
        XCTAssertEqual(words, [0b1], "1 KiB pages 1 and 3 both lie in 4 KiB page 0")
    }

    /// libvfio-user returns no page size: the hint stands.
    func testAnEmptyReplyKeepsTheHint() throws {
        let (c, _) = try start(chosen: 4096, replyData: [])
        try c.startDMALogging(pageSize: 4096, ranges: [(0, 1 << 20)])
        XCTAssertEqual(c.dmaLoggingPageSize, 4096)
        XCTAssertEqual(try c.dmaLoggingReport(iova: 0, length: 1 << 20, pageSize: 4096).first, 0b1010)
    }

    func testZeroNonPowerOfTwoAndTooLargePageSizesAreRefusedAndLoggingStopped() throws {
        for bad: UInt64 in [0, 3, 12288, 1 << 31, .max, 256] {
            let (c, s) = try start(chosen: bad)
            XCTAssertThrowsError(try c.startDMALogging(pageSize: 4096, ranges: [(0, 1 << 20)])) { e in
                XCTAssertTrue("\(e)".contains("the server chose page size \(bad)"), "\(e)")
            }
            XCTAssertNil(c.dmaLoggingPageSize)
            usleep(50_000)
            XCTAssertTrue(s.commands.contains { HostileServer.le32($0.2, 4) & DeviceFeature.indexMask == DeviceFeature.dmaLoggingStop },
                          "page size \(bad): the log the server started was stopped")
            c.close(); s.close()
        }
        client = nil; server = nil
    }

    func testAReplyTooShortForAPageSizeIsRefused() throws {
        let (c, _) = try start(chosen: 4096, replyData: [1, 2, 3])
        XCTAssertThrowsError(try c.startDMALogging(pageSize: 4096, ranges: [(0, 1 << 20)])) { e in
            XCTAssertTrue("\(e)".contains("carries 3 bytes, not a page size"), "\(e)")
        }
    }
}
