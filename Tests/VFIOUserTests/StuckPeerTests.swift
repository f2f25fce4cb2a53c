import Glibc
import XCTest
@testable import Devices
import SystemCalls
import VFIO
@testable import VFIOUser

/// A peer written from the spec that misbehaves on the DMA channel: the server never waits on
/// it for longer than its peer timeout, keeps reading commands meanwhile (the spec forbids
/// stalling command processing on the other channel), and stops promptly when told to.
/// Issue 13 items 6, 7 and 12.
final class StuckPeerTests: XCTestCase {
    /// A hand-driven client: VERSION with or without a twin socket, fd-less DMA mappings.
    final class Peer {
        let sock: UnixSocket
        let conn: VFIOUserConnection
        var twin: UnixSocket?
        init(path: String, twin wantTwin: Bool) throws {
            sock = try UnixSocket.connect(path: path)
            conn = VFIOUserConnection(socket: sock, maxReceiveFDs: 8, maxMessageSize: 64 << 20)
            var caps = Capabilities()
            if wantTwin { caps.twinSocket = .init(supported: true) }
            try conn.send(id: 1, command: VFIOUserCommand.version.rawValue, flags: 0, payload: VersionPayload(major: 0, minor: 2, capabilities: caps).encode())
            let r = try conn.receive()
            XCTAssertFalse(r.header.isError)
            // The twin socket, if the server agreed (a --no-twin-socket server does not).
            if wantTwin, r.fds.count == 1 { twin = UnixSocket(adopting: r.fds[0]) } else { r.closeFDs() }
        }
        func send(_ cmd: VFIOUserCommand, _ payload: [UInt8], id: UInt16, fds: [Int32] = []) throws {
            try conn.send(id: id, command: cmd.rawValue, flags: 0, payload: payload, fds: fds)
        }
        /// The next message, or nil after `seconds`.
        func next(within seconds: Double) throws -> Message? {
            guard try Poll.waitReadable(sock.fd, timeoutMilliseconds: Int32(seconds * 1000)) else { return nil }
            return try conn.receive()
        }
        /// Wait for the reply with `id`, answering DMA_READ/WRITE commands on the way if asked.
        func reply(id: UInt16, within seconds: Double, serveDMA: Bool) throws -> Message? {
            let deadline = monotonicNanoseconds() + UInt64(seconds * 1e9)
            while monotonicNanoseconds() < deadline {
                guard let m = try next(within: Double(deadline - monotonicNanoseconds()) / 1e9) else { return nil }
                if m.header.isReply && m.header.messageID == id { return m }
                if m.header.isCommand, serveDMA { try answerDMA(m, on: conn) }
            }
            return nil
        }
        func write64(_ offset: UInt64, _ v: UInt64, id: UInt16) throws {
            var d = WireWriter(); d.u64(v)
            try send(.regionWrite, RegionAccess(offset: offset, region: 0, count: 8, data: d.bytes[...]).encode(), id: id)
        }
        func close() { twin?.close(); conn.close() }
    }

    static func answerDMA(_ m: Message, on c: VFIOUserConnection) throws {
        let a = try DMAAccess(decoding: m.payload[...], context: "DMA command")
        if m.header.command == VFIOUserCommand.dmaRead.rawValue {
            var w = WireWriter(); w.u64(a.address); w.u64(a.count); w.zeros(Int(a.count))
            try c.sendReply(to: m.header, payload: w.bytes)
        } else {
            try c.sendReply(to: m.header, payload: DMAAccess(address: a.address, count: a.count).encode())
        }
    }
    func answerDMA(_ m: Message, on c: VFIOUserConnection) throws { try Self.answerDMA(m, on: c) }

    func server(timeout: Double) throws -> RunningServer {
        var o = VFIOUserServer.Options(); o.peerTimeoutSeconds = timeout
        return try RunningServer(stateSize: 1 << 20, options: o, name: "stuck")
    }

    /// Map 1 MiB without an fd and start a 256 KiB job from it (each 64 KiB step is DMA_READs).
    func startFDlessJob(_ p: Peer) throws {
        try p.send(.dmaMap, DMAMapRequest(flags: [.read, .write], offset: 0, address: 0x10_0000, size: 1 << 20).encode(), id: 2)
        try p.write64(DMAEngine.Reg.dmaSource, 0x10_0000, id: 3)
        try p.write64(DMAEngine.Reg.dmaDestination, DMAEngine.deviceMemoryBase, id: 4)
        try p.write64(DMAEngine.Reg.dmaCount, 256 << 10, id: 5)
        try p.write64(DMAEngine.Reg.dmaCommand, DMAEngine.dmaCommandStart, id: 6)
    }

    func setState(_ p: Peer, _ st: MigrationState, id: UInt16) throws {
        var w = WireWriter(); w.u32(st.rawValue); w.i32(-1)
        try p.send(.deviceFeature, DeviceFeature(flags: DeviceFeature.migDeviceState | DeviceFeature.set, data: w.bytes[...]).encode(), id: id)
    }

    /// Drain replies 2-6 (map + register writes), stopping at the first DMA command.
    func firstDMACommand(_ p: Peer, on c: VFIOUserConnection? = nil) throws -> Message? {
        let deadline = monotonicNanoseconds() + 5_000_000_000
        while monotonicNanoseconds() < deadline {
            if let c, c !== p.conn {
                guard try Poll.waitReadable(c.socket.fd, timeoutMilliseconds: 5000) else { return nil }
                // Main-socket replies may wait; the twin carries the DMA.
                return try c.receive()
            }
            guard let m = try p.next(within: 5) else { return nil }
            if m.header.isCommand { return m }
            XCTAssertFalse(m.header.isError, "setup reply \(m.header.messageID) errno \(m.header.errorNumber)")
        }
        return nil
    }

    /// Item 6: without a twin socket, a DMA job into an fd-less mapping plus SET STOP deadlocked
    /// the server: quiesce waited on the worker, which waited on a reply that only the blocked
    /// connection thread could read. Now the connection thread keeps reading and hands it over.
    func testNoTwinSocketDMAThenStopDoesNotDeadlock() throws {
        let s = try server(timeout: 60)  // the long timeout must not be what saves us
        defer { s.stop() }
        let p = try Peer(path: s.path, twin: false); defer { p.close() }
        try startFDlessJob(p)
        let first = try XCTUnwrap(try firstDMACommand(p), "the worker sent a DMA_READ")
        XCTAssertEqual(first.header.command, VFIOUserCommand.dmaRead.rawValue)
        try setState(p, .stop, id: 50)  // while our DMA reply is still owed
        try answerDMA(first, on: p.conn)
        let r = try XCTUnwrap(try p.reply(id: 50, within: 10, serveDMA: true), "SET STOP answered (no deadlock)")
        XCTAssertFalse(r.header.isError, "errno \(r.header.errorNumber)")
        XCTAssertEqual(s.server.migration?.state, .stop)
        // And back to RUNNING: the job completes.
        try setState(p, .running, id: 51)
        XCTAssertNotNil(try p.reply(id: 51, within: 10, serveDMA: true))
    }

    /// Item 7: a twin socket negotiated but never serviced stalled SET STOP for good. The DMA
    /// now fails after the peer timeout (ETIMEDOUT for the job) and STOP completes.
    func testUnservicedTwinSocketBoundsStop() throws {
        let s = try server(timeout: 1)
        defer { s.stop() }
        let p = try Peer(path: s.path, twin: true); defer { p.close() }
        XCTAssertNotNil(p.twin, "twin socket negotiated")
        try startFDlessJob(p)
        for id: UInt16 in 2...6 { XCTAssertNotNil(try p.reply(id: id, within: 5, serveDMA: false), "setup reply \(id)") }
        try setState(p, .stop, id: 50)
        let r = try XCTUnwrap(try p.reply(id: 50, within: 10, serveDMA: false), "SET STOP answered within the bound")
        XCTAssertFalse(r.header.isError, "errno \(r.header.errorNumber)")
        try p.send(.regionRead, RegionAccess(offset: DMAEngine.Reg.lastJobStatus, region: 0, count: 8).encode(), id: 52)
        let st = try XCTUnwrap(try p.reply(id: 52, within: 5, serveDMA: false))
        XCTAssertEqual(Array(st.payload[16..<20]), [UInt8(ETIMEDOUT), 0, 0, 0], "the job failed with ETIMEDOUT")
    }

    /// stop() (what SIGTERM does in `device serve`) returns promptly while a DMA is owed by a
    /// client that never answers, with or without a twin socket, in the middle of SET STOP.
    func testStopIsHonouredWhileWaitingOnAStuckPeer() throws {
        for twin in [false, true] {
            let s = try server(timeout: 60)
            let p = try Peer(path: s.path, twin: twin); defer { p.close() }
            try startFDlessJob(p)
            if !twin { XCTAssertNotNil(try firstDMACommand(p), "a DMA_READ is owed") }
            else { usleep(100_000) }
            try setState(p, .stop, id: 50)
            usleep(100_000)
            let stopped = EventFD.make()
            let t0 = monotonicNanoseconds()
            let th = try OSThread(name: "stopper") { s.stop(); try? stopped.signal() }
            XCTAssertGreaterThan(try stopped.wait(timeoutMilliseconds: 5000), 0, "stop() returned within 5 s (twin \(twin))")
            th.join()
            XCTAssertLessThan(monotonicNanoseconds() - t0, 5_000_000_000)
        }
    }

    /// Item 12: reply-typed messages matching no request were kept until the connection closed
    /// (2,000 fds pinned on one connection). They are dropped and their fds closed.
    func testUnmatchedRepliesAreDroppedWithTheirFDs() throws {
        let s = try server(timeout: 5)
        defer { s.stop() }
        let p = try Peer(path: s.path, twin: false); defer { p.close() }
        let before = openFDCount()
        for i in 0..<200 {
            let e = try EventFD()
            try p.conn.send(id: UInt16(1000 + i), command: VFIOUserCommand.dmaRead.rawValue, flags: MessageHeader.typeReply,
                            payload: [UInt8](repeating: 0, count: 4096), fds: [e.fd.rawValue])
        }
        try p.send(.regionRead, RegionAccess(offset: 0, region: 0, count: 4).encode(), id: 9)
        XCTAssertNotNil(try p.reply(id: 9, within: 5, serveDMA: false), "still serving")
        XCTAssertLessThanOrEqual(openFDCount(), before + 2, "the server closed the fds of 200 unmatched replies")
    }

    /// A client that stops in the middle of a message loses its connection after the peer
    /// timeout; the next client is served.
    func testClientStalledMidMessageIsDropped() throws {
        let s = try server(timeout: 1)
        defer { s.stop() }
        let p = try Peer(path: s.path, twin: false); defer { p.close() }
        let h = MessageHeader(messageID: 3, command: VFIOUserCommand.regionRead.rawValue, messageSize: 16 + 16, flags: 0, errorNumber: 0).bytes
        try p.sock.send(h + [1, 2, 3])  // 13 payload bytes short, forever
        let c = try XCTUnwrap(try? VFIOUserClient(path: s.path), "the next client is served")
        defer { c.close() }
        XCTAssertEqual(try c.read32(0, 0), 0x010000ed)
    }
}

extension EventFD {
    static func make() -> EventFD { try! EventFD() }
}

extension StuckPeerTests.Peer {
    /// Map 1 MiB without an fd and start a 256 KiB job from it (the DMA goes out as messages).
    func startFDlessJob() throws {
        try send(.dmaMap, DMAMapRequest(flags: [.read, .write], offset: 0, address: 0x10_0000, size: 1 << 20).encode(), id: 2)
        try write64(DMAEngine.Reg.dmaSource, 0x10_0000, id: 3)
        try write64(DMAEngine.Reg.dmaDestination, DMAEngine.deviceMemoryBase, id: 4)
        try write64(DMAEngine.Reg.dmaCount, 256 << 10, id: 5)
        try write64(DMAEngine.Reg.dmaCommand, DMAEngine.dmaCommandStart, id: 6)
    }
    func setState(_ st: MigrationState, id: UInt16) throws {
        var w = WireWriter(); w.u32(st.rawValue); w.i32(-1)
        try send(.deviceFeature, DeviceFeature(flags: DeviceFeature.migDeviceState | DeviceFeature.set, data: w.bytes[...]).encode(), id: id)
    }
    /// The first command the server sends on the main socket (setup replies skipped).
    func firstDMACommand() throws -> Message? {
        let deadline = monotonicNanoseconds() + 5_000_000_000
        while monotonicNanoseconds() < deadline {
            guard let m = try next(within: 5) else { return nil }
            if m.header.isCommand { return m }
        }
        return nil
    }
}
