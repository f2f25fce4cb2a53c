import Devices
import Glibc
import Machine
@testable import Migration
import SystemCalls
import VFIO
import XCTest

/// A stranger on the migration listener: stray, duplicate, late and silent connections, hellos
/// of another migration, SYNCs out of order, channel sections outside guest RAM or too large,
/// a channel that goes silent. The destination refuses each with its reason, within its peer
/// timeout, its device back out of RESUMING and no descriptor left open; strays never hold up
/// the real channels.
extension LiveMigrationTests {
    static let ram: UInt64 = 64 << 20

    /// The main connection of a hand-made multifd stream: header, CONFIG (this test's VMs),
    /// MULTIFD with `nonce`.
    func rawMain(channels: Int, nonce: UInt64) throws -> TCPSocket {
        let s = try TCPSocket.connect(host: "127.0.0.1", port: listener.port)
        var e = MigrationStreamEncoder(flags: MigrationStream.flagMultifd)
        e.section(.config, MigrationStream.configPayload(ramSize: Self.ram, vcpus: 2, devices: 1))
        e.section(.multifd, Multifd.announcePayload(channels: channels, nonce: nonce))
        try s.send(e.bytes)
        return s
    }

    /// Sections without the stream header (a channel's, or more of the main stream).
    static func sections(_ list: [(MigrationStream.SectionType, [UInt8])]) -> [UInt8] {
        var e = MigrationStreamEncoder(flags: 0)
        for (t, p) in list { e.section(t, p) }
        return Array(e.bytes.dropFirst(MigrationStream.headerSize))
    }

    func rawChannel(index: Int, channels: Int, nonce: UInt64) throws -> TCPSocket {
        let s = try TCPSocket.connect(host: "127.0.0.1", port: listener.port)
        try s.send(Multifd.hello(index: index, channels: channels, nonce: nonce))
        return s
    }

    static func sync(_ seq: UInt64, last: Bool = true) -> (MigrationStream.SectionType, [UInt8]) { (.sync, Multifd.syncPayload(sequence: seq, last: last)) }

    /// Whether the peer closed `s` within `ms` (reads and drops whatever comes first).
    static func closedByPeer(_ s: StreamSocket, within ms: Int32 = 3000) -> Bool {
        let deadline = monotonicNanoseconds() + UInt64(ms) * 1_000_000
        var b = [UInt8](repeating: 0, count: 4096)
        while monotonicNanoseconds() < deadline {
            guard (try? Poll.waitReadable(s.fd, timeoutMilliseconds: 100)) == true else { continue }
            let n = recv(s.fd.rawValue, &b, b.count, 0)
            if n <= 0 { return true }
        }
        return false
    }

    static func openFDs() -> Int { (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd").count) ?? -1 }

    /// Run a hand-made source against a destination with a 1 s peer timeout: its error, how long
    /// it took, and whether the device left RESUMING and no descriptor stayed open.
    func againstRawSource(_ body: () throws -> [StreamSocket]) throws -> (String, Double) {
        try dst.vm.start()
        let fds = Self.openFDs()
        let wait = try startMultifdDestination { $0.peerTimeoutMS = 1000 }
        let t0 = monotonicNanoseconds()
        let socks = try body()
        let e = wait()
        let took = Double(monotonicNanoseconds() - t0) / 1e9
        for s in socks { s.fd.close() }
        XCTAssertEqual(try dst.client.migrationState(), .running, "the destination device was reset out of RESUMING")
        XCTAssertTrue(dst.vm.isPaused, "the destination guest never ran")
        XCTAssertLessThanOrEqual(Self.openFDs(), fds, "the destination closed every connection it took")
        return (e.map { "\($0)" } ?? "no error", took)
    }

    // MARK: SYNC

    /// A channel's SYNC ahead of its pass. Before, it was taken: the main channel's SYNC 1 let
    /// the barrier open with channel 0 at "pass 3", so the ordering of passes meant nothing.
    func testHostileChannelSyncAheadOfItsPassIsRefused() throws {
        let (why, took) = try againstRawSource {
            let m = try rawMain(channels: 2, nonce: 42)
            let c0 = try rawChannel(index: 0, channels: 2, nonce: 42), c1 = try rawChannel(index: 1, channels: 2, nonce: 42)
            try c0.send(Self.sections([Self.sync(3)]))
            try c1.send(Self.sections([Self.sync(1)]))
            try m.send(Self.sections([Self.sync(1), (.end, MigrationStream.endPayload(pagesSent: 0, sourceRunning: true))]))
            return [m, c0, c1]
        }
        XCTAssertTrue(why.contains("multifd channel 0") && why.contains("pass 3 out of order (pass 1 expected)"), why)
        XCTAssertLessThan(took, 10)
    }

    func testHostileChannelSyncRepeatedIsRefused() throws {
        let (why, _) = try againstRawSource {
            let m = try rawMain(channels: 1, nonce: 7)
            let c0 = try rawChannel(index: 0, channels: 1, nonce: 7)
            try c0.send(Self.sections([Self.sync(1, last: false), Self.sync(1)]))
            try m.send(Self.sections([Self.sync(1, last: false)]))
            return [m, c0]
        }
        XCTAssertTrue(why.contains("pass 1 out of order (pass 2 expected)"), why)
    }

    func testHostileMainSyncOutOfOrderIsRefused() throws {
        let (why, _) = try againstRawSource {
            let m = try rawMain(channels: 1, nonce: 9)
            let c0 = try rawChannel(index: 0, channels: 1, nonce: 9)
            try m.send(Self.sections([Self.sync(UInt64.max, last: false)]))
            return [m, c0]
        }
        XCTAssertTrue(why.contains("pass 18446744073709551615 out of order on the main channel (pass 1 expected)"), why)
    }

    // MARK: channel sections

    func testHostileChannelRAMOutsideGuestRAMIsRefused() throws {
        var run = BEWriter(); run.u32(1); run.u64(Self.ram - 4096); run.u32(2); run.u32(1)  // zero pages, one past the end
        let (why, _) = try againstRawSource {
            let m = try rawMain(channels: 1, nonce: 1)
            let c0 = try rawChannel(index: 0, channels: 1, nonce: 1)
            try c0.send(Self.sections([(.ram, run.bytes)]))
            return [m, c0]
        }
        XCTAssertTrue(why.contains("multifd channel 0") && why.contains("lies outside guest RAM"), why)
    }

    func testHostileChannelHugeSectionLengthIsRefused() throws {
        let (why, _) = try againstRawSource {
            let m = try rawMain(channels: 1, nonce: 1)
            let c0 = try rawChannel(index: 0, channels: 1, nonce: 1)
            try c0.send(MigrationStream.sectionHeader(.device, id: 1, length: 0) .enumerated().map { $0.offset >= 8 ? 0xff : $0.element })
            return [m, c0]
        }
        XCTAssertTrue(why.contains("multifd channel 0") && why.contains("exceeds the"), why)
    }

    func testHostileChannelSectionsOnlyTheMainChannelCarries() throws {
        let (why, _) = try againstRawSource {
            let m = try rawMain(channels: 1, nonce: 1)
            let c0 = try rawChannel(index: 0, channels: 1, nonce: 1)
            try c0.send(Self.sections([(.end, MigrationStream.endPayload(pagesSent: 0, sourceRunning: true))]))
            return [m, c0]
        }
        XCTAssertTrue(why.contains("only RAM, DEVICE and SYNC travel there"), why)
    }

    /// A channel that says hello and then nothing: the main channel's SYNC waits for it within
    /// the peer timeout, not forever.
    func testHostileChannelThatGoesSilentIsBounded() throws {
        let (why, took) = try againstRawSource {
            let m = try rawMain(channels: 2, nonce: 5)
            let c0 = try rawChannel(index: 0, channels: 2, nonce: 5), c1 = try rawChannel(index: 1, channels: 2, nonce: 5)
            try c1.send(Self.sections([Self.sync(1)]))
            try m.send(Self.sections([Self.sync(1)]))
            return [m, c0, c1]
        }
        XCTAssertTrue(why.contains("multifd channel 0"), why)
        XCTAssertLessThan(took, 6, "within the 1 s peer timeout and a margin")
    }

    // MARK: hellos

    /// Strays of every kind before and between the real channels: each is closed with its
    /// reason, the real channels are taken, and the stream goes on to its end.
    func testHostileHellosAreClosedAndTheRealChannelsTaken() throws {
        var strays: [TCPSocket] = []
        let (why, _) = try againstRawSource {
            let m = try rawMain(channels: 2, nonce: 77)
            let port = listener.port
            func raw(_ bytes: [UInt8]) throws -> TCPSocket { let s = try TCPSocket.connect(host: "127.0.0.1", port: port); if !bytes.isEmpty { try s.send(bytes) }; return s }
            strays.append(try raw(Multifd.hello(index: 0, channels: 2, nonce: 78)))            // another attempt's
            strays.append(try raw(Multifd.hello(index: 5, channels: 2, nonce: 77)))            // index out of range
            strays.append(try raw(Multifd.hello(index: 1, channels: 3, nonce: 77)))            // wrong count
            strays.append(try raw(Array("GET / HTTP/1.1\r\nHost: x\r\n\r\n".utf8)))           // not a hello
            let closed = try raw([]); closed.fd.close()                                        // closed before its hello
            strays.append(try raw(Array(Multifd.helloMagic)))                                  // half a hello, then silence
            strays.append(try raw([]))                                                         // silent
            let c0 = try rawChannel(index: 0, channels: 2, nonce: 77)
            usleep(100_000)
            strays.append(try rawChannel(index: 0, channels: 2, nonce: 77))                    // a duplicate of channel 0
            let c1 = try rawChannel(index: 1, channels: 2, nonce: 77)
            for (k, s) in strays.prefix(4).enumerated() { XCTAssertTrue(Self.closedByPeer(s), "stray \(k) was closed") }
            try c0.send(Self.sections([Self.sync(1)]))
            try c1.send(Self.sections([Self.sync(1)]))
            try m.send(Self.sections([Self.sync(1), (.end, MigrationStream.endPayload(pagesSent: 0, sourceRunning: true))]))
            return [m, c0, c1] + strays
        }
        // Past the channel setup and the SYNC: what fails now is the empty device image.
        XCTAssertFalse(why.contains("channels did not connect") || why.contains("out of order") || why.contains("multifd"), why)
    }

    /// With the real engine: a silent stray, a closed one and half a hello reach the listener
    /// before the channels. Before, the destination read hellos one after the other, and the
    /// silent stray used up its whole peer timeout (5 s): "2 of 2 channels did not connect".
    func testHostileSilentStraysBeforeTheChannelsDoNotFailAMigration() throws {
        try startSource()
        let wait = try startMultifdDestination()
        let m = try connectSource(Self.multifdParameters(2))
        let port = listener.port
        var strays: [TCPSocket] = []
        var opened = 0
        m.openChannel = {
            opened += 1
            if opened == 1 {
                strays.append(try TCPSocket.connect(host: "127.0.0.1", port: port))
                let c = try TCPSocket.connect(host: "127.0.0.1", port: port); c.fd.close()
                let h = try TCPSocket.connect(host: "127.0.0.1", port: port); try h.send(Array(Multifd.helloMagic)); strays.append(h)
                usleep(200_000)  // they are accepted first
            }
            return try TCPSocket.connect(host: "127.0.0.1", port: port)
        }
        try m.run()
        XCTAssertNil(wait())
        for s in strays { XCTAssertTrue(Self.closedByPeer(s), "the destination closed the stray"); s.fd.close() }
        usleep(200_000)
        let r = dst.vm.verify()
        XCTAssertTrue(r.ok, r.description)
    }
}
