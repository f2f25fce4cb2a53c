import Foundation
import Glibc
import XCTest
@testable import Devices
import SystemCalls
import VFIO
@testable import VFIOUser

/// A stand-in vfio-user server for the migration-data paths: it answers VERSION, then hands
/// every later message to `handle` on its own thread. It is not the project's server, so it
/// can answer out of order, pad, lie about sizes, or not answer at all.
final class ScriptedServer: @unchecked Sendable {
    let path: String
    private let listener: UnixListener
    private var thread: Thread?
    private let stop: EventFD
    private var socket: UnixSocket?
    private let lock = NSLock()

    init(tag: String, _ handle: @escaping @Sendable (Message, VFIOUserConnection) -> Void) throws {
        path = temporarySocketPath(tag)
        listener = try UnixListener(path: path, backlog: 1)
        stop = try EventFD(nonBlocking: true)
        let t = Thread { [self] in
            guard let s = try? listener.accept(cancel: stop.fd) else { return }
            lock.withLock { socket = s }
            let c = VFIOUserConnection(socket: s, maxMessageSize: 64 << 20)
            guard let v = try? c.receive() else { return }
            try? c.sendReply(to: v.header, payload: VersionPayload(capabilities: Capabilities()).encode())
            while (try? Poll.waitAnyReadable([stop.fd.rawValue, s.fd.rawValue], timeoutMilliseconds: -1)) == 1,
                  let m = try? c.receive() {
                handle(m, c)
            }
        }
        thread = t
        t.start()
    }

    func close() {
        try? stop.signal()
        lock.withLock { socket?.shutdown() }
        while thread?.isFinished == false { usleep(1000) }
        lock.withLock { socket?.close() }
        listener.close()
    }

    /// A DEVICE_FEATURE MIG_DEVICE_STATE reply saying `state`.
    static func stateReply(_ c: VFIOUserConnection, to h: MessageHeader, _ state: MigrationState) {
        var w = WireWriter(); w.u32(16); w.u32(DeviceFeature.migDeviceState | DeviceFeature.get); w.u32(state.rawValue); w.i32(-1)
        try? c.sendReply(to: h, payload: w.bytes)
    }

    /// A MIG_DATA_READ reply: `{argsz, size}` and `size` bytes of `fill`, then `pad` zero bytes
    /// (libvfio-user pads to the requested size).
    static func readReply(_ c: VFIOUserConnection, to h: MessageHeader, size: Int, fill: UInt8 = 0x5a, pad: Int = 0, claimedSize: Int? = nil) {
        var w = WireWriter(); w.u32(UInt32(8 + size)); w.u32(UInt32(claimedSize ?? size))
        try? c.sendReply(to: h, payload: w.bytes + [UInt8](repeating: fill, count: size) + [UInt8](repeating: 0, count: pad))
    }
}

/// A value shared with a server thread.
final class Box<T>: @unchecked Sendable {
    private var value: T
    private let lock = NSLock()
    init(_ v: T) { value = v }
    func update<R>(_ body: (inout T) -> R) -> R { lock.withLock { body(&value) } }
}

/// Large, pipelined MIG_DATA_READ, straight into the buffer that is sent on: the spec's
/// pipelining (the server processes commands in order), every size checked, every wait bounded.
final class MigrationDataPipelineTests: XCTestCase {
    override func setUp() { Log.level = .error }
    override func tearDown() { Log.level = .info }

    func options(maxData: UInt64 = Capabilities.defaultMaxDataXferSize, timeoutMS: Int32 = 10_000) -> VFIOUserClient.Options {
        var o = VFIOUserClient.Options()
        o.maxDataXferSize = maxData
        o.timeoutMilliseconds = timeoutMS
        return o
    }

    /// The same recognisable content in both devices' memory (through BAR2).
    func fill(_ c: VFIOUserClient, size: UInt64, seed: UInt8) throws {
        var off: UInt64 = 0
        let block = (0..<(1 << 20)).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ Int(seed)) }
        while off < size { try c.regionWrite(2, offset: off, block); off += UInt64(block.count) }
    }

    func testReadsAsLargeAsTheNegotiatedMaxDataXferSizeArriveWhole() throws {
        var so = VFIOUserServer.Options(); so.maxDataXferSize = 4 << 20
        let a = try RunningServer(stateSize: 16 << 20, options: so, name: "large-a")
        defer { a.stop() }
        let c = try VFIOUserClient(path: a.path, options: options(maxData: 4 << 20))
        defer { c.close() }
        XCTAssertEqual(c.maxTransfer, 4 << 20, "both sides said 4 MiB")
        try fill(c, size: 16 << 20, seed: 3)
        try c.setMigrationState(.stopCopy)
        let buf = UnsafeMutableRawBufferPointer.allocate(byteCount: 8 << 20, alignment: 64)
        defer { buf.deallocate() }
        // Asking for more than max_data_xfer_size gets max_data_xfer_size, in one reply.
        XCTAssertEqual(try c.readMigrationData(into: buf), 4 << 20)
        XCTAssertEqual(try c.readMigrationData(into: UnsafeMutableRawBufferPointer(rebasing: buf[0..<(4 << 20)])), 4 << 20)
        try c.setMigrationState(.stop)
    }

    func testTheServersInPlaceReadGivesTheSameStreamWhateverTheReadSizes() throws {
        // Two devices with the same content: one read in odd sizes through the in-place path,
        // the other in 1 MiB arrays; the streams must be byte for byte the same.
        let a = try RunningServer(stateSize: 2 << 20, name: "same-a"), b = try RunningServer(stateSize: 2 << 20, name: "same-b")
        defer { a.stop(); b.stop() }
        let ca = try VFIOUserClient(path: a.path), cb = try VFIOUserClient(path: b.path)
        defer { ca.close(); cb.close() }
        try fill(ca, size: 2 << 20, seed: 9); try fill(cb, size: 2 << 20, seed: 9)
        try ca.setMigrationState(.stopCopy); try cb.setMigrationState(.stopCopy)
        var odd: [UInt8] = []
        let sizes = [100_000, 65_536 + 28, 7, 1 << 20, 65_564 * 3, 4096]
        var k = 0
        while true {
            let n = sizes[k % sizes.count]; k += 1
            let d = try ca.readMigrationData(max: n)
            odd += d
            if d.count < n { break }
        }
        var whole: [UInt8] = []
        while true { let d = try cb.readMigrationData(max: 1 << 20); whole += d; if d.count < 1 << 20 { break } }
        XCTAssertGreaterThan(whole.count, 2 << 20)
        XCTAssertEqual(odd.count, whole.count)
        XCTAssertTrue(odd == whole, "same stream")
    }

    func testAPipelinedRelayMovesTheWholeStateAndLeavesBothConnectionsInStep() throws {
        var so = VFIOUserServer.Options(); so.maxDataXferSize = 2 << 20
        let a = try RunningServer(stateSize: 8 << 20, options: so, name: "relay-a"), b = try RunningServer(stateSize: 8 << 20, options: so, name: "relay-b")
        defer { a.stop(); b.stop() }
        let ca = try VFIOUserClient(path: a.path, options: options(maxData: 2 << 20)), cb = try VFIOUserClient(path: b.path, options: options(maxData: 2 << 20))
        defer { ca.close(); cb.close() }
        try fill(ca, size: 8 << 20, seed: 42)
        try ca.write32(0, DMAEngine.Reg.liveness, 0x1234)
        let digest = a.device.stateDigest()
        try cb.setMigrationState(.resuming)
        try ca.setMigrationState(.stopCopy)
        var writes = 0
        let moved = try ca.relayMigrationData(to: cb, depth: 8, beforeWrite: { writes += 1 })
        XCTAssertGreaterThan(moved, 8 << 20)
        XCTAssertGreaterThanOrEqual(writes, 4, "in messages of at most 2 MiB")
        try cb.setMigrationState(.stop)
        XCTAssertEqual(b.device.stateDigest(), digest, "the destination holds the source's state")
        // Both connections are in step: ordinary calls get their own replies.
        XCTAssertEqual(try ca.migrationState(), .stopCopy)
        XCTAssertEqual(try cb.migrationState(), .stop)
    }

    func testAReplyOutOfOrderIsAClearErrorAndTheWaitIsBounded() throws {
        // The server answers the second of the pipelined reads first.
        let pending = Box<[MessageHeader]>([])
        let src = try ScriptedServer(tag: "ooo") { m, c in
            guard m.header.command == VFIOUserCommand.migDataRead.rawValue else { try? c.sendError(to: m.header, errno: .EINVAL); return }
            let got = pending.update { $0.append(m.header); return $0 }
            if got.count == 2 {
                ScriptedServer.readReply(c, to: got[1], size: 4096)
                ScriptedServer.readReply(c, to: got[0], size: 4096)
            }
        }
        defer { src.close() }
        let dst = try RunningServer(name: "ooo-dst")
        defer { dst.stop() }
        let ca = try VFIOUserClient(path: src.path, options: options(maxData: 4096, timeoutMS: 400)), cb = try VFIOUserClient(path: dst.path)
        defer { ca.close(); cb.close() }
        let t0 = monotonicNanoseconds()
        XCTAssertThrowsError(try ca.relayMigrationData(to: cb, depth: 4)) { e in
            XCTAssertTrue("\(e)".contains("MIG_DATA_READ replies out of order"), "\(e)")
            XCTAssertTrue("\(e)".contains("expected the reply to id"), "\(e)")
        }
        XCTAssertLessThan(Double(monotonicNanoseconds() - t0) / 1e9, 5, "bounded: no hang on the replies never sent")
        XCTAssertEqual(try cb.migrationState(), .running, "nothing was written to the destination, which is in step")
    }

    func testAMissingReplyTimesOutWithinTheBoundAndSaysWhich() throws {
        // Two of four pipelined reads are answered (full, so the relay goes on); then silence.
        let answered = Box(0)
        let src = try ScriptedServer(tag: "missing") { m, c in
            guard m.header.command == VFIOUserCommand.migDataRead.rawValue else { try? c.sendError(to: m.header, errno: .EINVAL); return }
            let n = answered.update { $0 += 1; return $0 }
            if n <= 2 { ScriptedServer.readReply(c, to: m.header, size: 4096) }
        }
        defer { src.close() }
        let sink = try ScriptedServer(tag: "missing-dst") { m, c in
            if m.header.command == VFIOUserCommand.deviceFeature.rawValue { ScriptedServer.stateReply(c, to: m.header, .running) } else { try? c.sendReply(to: m.header) }
        }
        defer { sink.close() }
        let ca = try VFIOUserClient(path: src.path, options: options(maxData: 4096, timeoutMS: 400))
        let cb = try VFIOUserClient(path: sink.path, options: options(maxData: 4096, timeoutMS: 400))
        defer { ca.close(); cb.close() }
        let t0 = monotonicNanoseconds()
        XCTAssertThrowsError(try ca.relayMigrationData(to: cb, depth: 4)) { e in
            XCTAssertEqual(e as? VFIOUserClientError, .timeout(command: .migDataRead, seconds: 0.4))
        }
        let took = Double(monotonicNanoseconds() - t0) / 1e9
        XCTAssertLessThan(took, 5, "the bound detects the missing reply")
        XCTAssertGreaterThanOrEqual(took, 0.35, "it waited for the bound")
        // The connection is out of step for good, and says so instead of misreading.
        XCTAssertThrowsError(try ca.migrationState()) { XCTAssertEqual($0 as? VFIOUserClientError, .timeout(command: .migDataRead, seconds: 0.4)) }
        XCTAssertEqual(try cb.migrationState(), .running, "the destination's write replies were drained: it is still in step")
    }

    func testAReplyClaimingMoreDataThanAskedIsRefusedBeforeAnyIsReceived() throws {
        let src = try ScriptedServer(tag: "liar") { m, c in
            if m.header.command == VFIOUserCommand.migDataRead.rawValue {
                // size says 8192 in a reply to a 4096-byte read.
                ScriptedServer.readReply(c, to: m.header, size: 4096, claimedSize: 8192)
            } else {
                ScriptedServer.stateReply(c, to: m.header, .stopCopy)
            }
        }
        defer { src.close() }
        let c = try VFIOUserClient(path: src.path, options: options(maxData: 4096, timeoutMS: 2000))
        defer { c.close() }
        let buf = UnsafeMutableRawBufferPointer.allocate(byteCount: 4096 + 64, alignment: 64)
        defer { buf.deallocate() }
        memset(buf.baseAddress!, 0xee, buf.count)
        XCTAssertThrowsError(try c.readMigrationData(into: UnsafeMutableRawBufferPointer(rebasing: buf[0..<4096]))) { e in
            XCTAssertTrue("\(e)".contains("MIG_DATA_READ returned size 8192"), "\(e)")
        }
        XCTAssertTrue(buf.allSatisfy { $0 == 0xee }, "nothing was received into the buffer")
        XCTAssertEqual(try c.migrationState(), .stopCopy, "the reply was drained: the connection is in step")
    }

    func testAPaddedReplyIsReadBySizeAsLibvfioUserSendsIt() throws {
        // libvfio-user pads every MIG_DATA_READ reply to the requested size (reference notes).
        let src = try ScriptedServer(tag: "pad") { m, c in
            ScriptedServer.readReply(c, to: m.header, size: 392, fill: 0x11, pad: 4096 - 392)
        }
        defer { src.close() }
        let c = try VFIOUserClient(path: src.path, options: options(maxData: 4096, timeoutMS: 2000))
        defer { c.close() }
        let d = try c.readMigrationData(max: 4096)
        XCTAssertEqual(d.count, 392)
        XCTAssertTrue(d.allSatisfy { $0 == 0x11 })
        let e = try c.readMigrationData(max: 4096)
        XCTAssertEqual(e.count, 392, "the padding was drained: the next reply is read from its header")
    }
}
