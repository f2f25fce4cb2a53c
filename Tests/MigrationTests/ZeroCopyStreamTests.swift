import Glibc
import Machine
@testable import Migration
import SystemCalls
import VFIO
import XCTest

/// The RAM path without extra passes: pages from guest RAM to the socket (sendmsg) and from the
/// socket into guest RAM (readv), with payload checksums a capability that is off by default
/// (QEMU keeps none). Headers, lengths and run tables are checked either way.
extension LiveMigrationTests {
    static var checkedPayload: MigrationParameters { var p = MigrationParameters(); p.payloadChecksum = true; return p }

    /// QEMU's default: no payload checksum. A running VM with its device moves and every page
    /// verifies on the destination (pages written while they were sent went again).
    func testRunningVMMigratesWithoutPayloadChecksum() throws {
        XCTAssertFalse(MigrationParameters().payloadChecksum, "off by default, as QEMU")
        try startSource()
        let wait = try startDestination()
        let m = try connectSource()
        try m.run()
        XCTAssertNil(wait())
        XCTAssertGreaterThan(m.stats.iterations, 0)
        usleep(200_000)
        let r = dst.vm.verify()
        XCTAssertTrue(r.ok, r.description)
        XCTAssertGreaterThan(r.pageWrites, 0)
    }

    func testRunningVMMigratesWithPayloadChecksum() throws {
        try startSource()
        let wait = try startDestination()
        let m = try connectSource(Self.checkedPayload)
        try m.run()
        XCTAssertNil(wait())
        usleep(200_000)
        let r = dst.vm.verify()
        XCTAssertTrue(r.ok, r.description)
    }

    /// Without payload checksums the run table is still covered: a corrupt RAM section is
    /// refused, the destination says which, and the source runs on.
    func testCorruptRunTableIsRefusedWithoutPayloadChecksum() throws {
        try startSource()
        let wait = try startDestination()
        let m = try connectSource()
        m.beforeSection = { t, id in if t == .ram && id == 6 { m.corruptNextSectionForTesting = true } }
        XCTAssertThrowsError(try m.run())
        try assertSourceRunsOn(m, status: .failed, reasonContains: "checksum mismatch")
        let e = "\(wait().map { "\($0)" } ?? "")"
        XCTAssertTrue(e.contains("RAM section 6"), "destination: \(e)")
        XCTAssertTrue(dst.vm.isPaused, "a corrupt stream never leaves the destination running")
    }

    /// The connection is cut during pre-copy after the second RAM section (a cut inside page
    /// data is ZeroCopyStreamTests.testAStreamCutInsidePageDataIsTruncated): both sides fail,
    /// the destination stays paused, and the source runs on.
    func testConnectionCutInPreCopyWithoutPayloadChecksum() throws {
        try startSource()
        let wait = try startDestination()
        let sock = try TCPSocket.connect(host: "127.0.0.1", port: listener.port)
        let m = try MigrationSource(vm: src.vm, to: sock, parameters: MigrationParameters(), policies: [.auto])
        var ramSections = 0
        m.afterSectionForTesting = { t, _ in
            if t == .ram { ramSections += 1; if ramSections == 2 { shutdown(sock.fd.rawValue, Int32(SHUT_RDWR)) } }
        }
        XCTAssertThrowsError(try m.run())
        XCTAssertEqual(ramSections, 2, "nothing went out after the cut")
        try assertSourceRunsOn(m, status: .failed, reasonContains: "channel")
        XCTAssertNotNil(wait())
        XCTAssertTrue(dst.vm.isPaused)
    }
}

/// The decoder on hand-made streams through a real socket pair (the readv path).
final class ZeroCopyStreamTests: XCTestCase {
    /// Guest RAM of `ramSize` bytes of 0xee, so that a page the decoder never wrote shows.
    static func sink() -> NullMigrationSink { NullMigrationSink(size: ramSize, fill: 0xee) }

    static let ramSize = 16 * 4096

    /// header, CONFIG, one RAM section of `runs` ({gpa, pages, zero}), END; page data is
    /// (gpa / 4096 + 1) repeated. `checked`: payload checksums on (no header flag).
    static func stream(runs: [(UInt64, UInt32, Bool)], checked: Bool, tamper: ((inout [UInt8]) -> Void)? = nil) -> [UInt8] {
        var e = MigrationStreamEncoder(flags: checked ? 0 : MigrationStream.flagUncheckedPayload)
        e.section(.config, MigrationStream.configPayload(ramSize: UInt64(ramSize), vcpus: 0, devices: 0))
        var table = BEWriter()
        table.u32(UInt32(runs.count))
        var data: [UInt8] = []
        for (gpa, pages, zero) in runs {
            table.u64(gpa); table.u32(pages); table.u32(zero ? 1 : 0)
            if !zero { data += [UInt8](repeating: UInt8(truncatingIfNeeded: gpa / 4096 + 1), count: Int(pages) * 4096) }
        }
        var sum = table.bytes.withUnsafeBytes { Checksum.update(Checksum.seed, $0) }
        if checked { sum = data.withUnsafeBytes { Checksum.update(sum, $0) } }
        var out = e.bytes
        out += MigrationStream.sectionHeader(.ram, id: 2, length: table.bytes.count + data.count)
        out += table.bytes
        var payload = data
        tamper?(&payload)
        out += payload
        var t = BEWriter(); t.u64(sum); out += t.bytes
        var end = MigrationStreamEncoder(flags: 0)
        end.section(.end, MigrationStream.endPayload(pagesSent: 0, sourceRunning: true))
        out += end.bytes.dropFirst(MigrationStream.headerSize)
        return out
    }

    /// Decode `bytes` written into a socket pair (the writer closes after `limit` bytes).
    static func decode(_ bytes: [UInt8], limit: Int? = nil, sink: NullMigrationSink) throws {
        let (a, b) = try UnixSocket.pair()
        let n = min(limit ?? bytes.count, bytes.count)
        let writer = try OSThread(name: "writer") {
            _ = try? bytes.withUnsafeBytes { try a.send([UnsafeRawBufferPointer(rebasing: $0[0..<n])]) }
            a.close()
        }
        defer { writer.join(); b.close() }
        MigrationSource.setPeerTimeout(b, ms: 5000)
        try MigrationStreamDecoder(source: ChannelSource(b, timeoutMS: 5000), sink: sink).run()
    }

    func testPagesLandAtTheirAddressesThroughReadv() throws {
        let sink = Self.sink()
        try Self.decode(Self.stream(runs: [(0, 2, false), (2 * 4096, 3, true), (8 * 4096, 4, false)], checked: false), sink: sink)
        XCTAssertTrue(sink.ended)
        XCTAssertEqual(sink.zeroed, 3)
        XCTAssertEqual(sink.ram[0], 1); XCTAssertEqual(sink.ram[2 * 4096 - 1], 1)
        XCTAssertEqual(sink.ram[8 * 4096], 9); XCTAssertEqual(sink.ram[12 * 4096 - 1], 9)
        XCTAssertEqual(sink.ram[12 * 4096], 0xee, "nothing written past the last run")
    }

    /// QEMU's choice: without the capability page data is not checksummed, so a flipped byte
    /// in it is applied; with the capability the same flip is refused, naming the section.
    func testPayloadChecksumCatchesAFlippedPageByteOnlyWhenOn() throws {
        let flip: (inout [UInt8]) -> Void = { $0[4100] ^= 0x40 }
        XCTAssertNoThrow(try Self.decode(Self.stream(runs: [(0, 2, false)], checked: false, tamper: flip), sink: Self.sink()))
        XCTAssertThrowsError(try Self.decode(Self.stream(runs: [(0, 2, false)], checked: true, tamper: flip), sink: Self.sink())) {
            XCTAssertEqual($0 as? StreamError, .checksumMismatch(.ram, id: 2, offset: 60))
        }
    }

    /// Run tables are checked before any data is read, with or without payload checksums.
    func testARunOutsideGuestRAMIsRefusedWithoutPayloadChecksum() throws {
        let sink = Self.sink()
        XCTAssertThrowsError(try Self.decode(Self.stream(runs: [(15 * 4096, 2, false)], checked: false), sink: sink)) {
            XCTAssertTrue("\($0)".contains("lies outside guest RAM"), "\($0)")
        }
        XCTAssertEqual(sink.ram[15 * 4096], 0xee, "nothing of the bad section was written")
    }

    func testALengthThatDisagreesWithTheRunsIsRefused() throws {
        var s = Self.stream(runs: [(0, 1, false)], checked: false)
        // The RAM section's length field (after header 16 + CONFIG 16+20+8): one byte more.
        let at = 16 + 44 + 8 + 7
        s[at] &+= 1
        XCTAssertThrowsError(try Self.decode(s, sink: Self.sink())) {
            XCTAssertTrue("\($0)".contains("does not match its runs"), "\($0)")
        }
    }

    /// The writer stops in the middle of a run's data: a truncated stream at a precise offset.
    func testAStreamCutInsidePageDataIsTruncated() throws {
        let s = Self.stream(runs: [(0, 4, false)], checked: false)
        XCTAssertThrowsError(try Self.decode(s, limit: 16 + 44 + 16 + 20 + 5000, sink: Self.sink())) {
            XCTAssertEqual($0 as? StreamError, .truncated(offset: 16 + 44 + 16 + 20))
        }
    }

    func testAnUnknownHeaderFlagIsRefused() throws {
        var s = Self.stream(runs: [(0, 1, false)], checked: false)
        s[15] |= 0x80
        XCTAssertThrowsError(try Self.decode(s, sink: Self.sink())) {
            XCTAssertTrue("\($0)".contains("unknown stream flags"), "\($0)")
        }
    }
}
