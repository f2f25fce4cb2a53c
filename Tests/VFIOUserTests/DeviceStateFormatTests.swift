import CVFIOLive
import Glibc
import XCTest
@testable import Devices
import SystemCalls
import VFIO
@testable import VFIOUser

/// dma-engine state format 3 (issue 12 item 3): the 3-lane CRC32C record checksum, the version
/// check, chunk checksums as a declared option of the stream (off by default, as QEMU relies on
/// the transport for device state), and the source's spliced (by reference) gathered replies.
final class DeviceStateFormatTests: XCTestCase {
    override func tearDown() { SpliceSender.refuseSendForTesting = false }

    func testCRC32CGivesTheStandardCheckValueInHardwareAndInTheTable() {
        // CRC-32C("123456789") = 0xE3069283 (RFC 3720 / the Castagnoli check value).
        let v = Array("123456789".utf8)
        v.withUnsafeBytes { b in
            XCTAssertEqual(~vl_crc32c_raw(~0, b.baseAddress, b.count), 0xE306_9283)
            XCTAssertEqual(~vl_crc32c_raw_portable(~0, b.baseAddress, b.count), 0xE306_9283)
        }
        #if arch(x86_64)
        XCTAssertEqual(vl_crc32c_hardware(), 1, "this machine has SSE4.2: the fast path is the one measured")
        #endif
    }

    func testTheFastRecordChecksumEqualsThePortableOneAtEverySizeAndAlignment() {
        let data = (0..<(3 * 65_536 + 101)).map { UInt8(truncatingIfNeeded: $0 &* 2_654_435_761 >> 7) }
        data.withUnsafeBytes { b in
            for n in Array(0...100) + [4095, 4096, 65_536, 65_536 + 7, 3 * 65_536] {
                for start in [0, 1, 3, 8, 13] {
                    let p = b.baseAddress! + start
                    XCTAssertEqual(vl_crc3x64(0x1234 &+ UInt64(n), p, n), vl_crc3x64_portable(0x1234 &+ UInt64(n), p, n), "n \(n) at +\(start)")
                }
            }
            // And it sees a single flipped bit, the offset seeds a chunk's checksum.
            let whole = UnsafeRawBufferPointer(rebasing: b[0..<65_536])
            var copy = Array(whole); copy[40_000] ^= 0x08
            XCTAssertNotEqual(copy.withUnsafeBytes { DMAEngineStateFormat.chunkChecksum(offset: 0, data: $0) },
                              DMAEngineStateFormat.chunkChecksum(offset: 0, data: whole))
            XCTAssertNotEqual(DMAEngineStateFormat.chunkChecksum(offset: 0, data: whole), DMAEngineStateFormat.chunkChecksum(offset: 65_536, data: whole))
        }
    }

    /// The whole stop-copy stream of a filled 1 MiB device.
    func stream(_ ca: VFIOUserClient) throws -> [UInt8] {
        var all: [UInt8] = []
        while true { let d = try ca.readMigrationData(max: 1 << 20); all += d; if d.count < 1 << 20 { break } }
        return all
    }

    func pair(_ tag: String, checksums: Bool) throws -> (RunningServer, RunningServer, VFIOUserClient, VFIOUserClient) {
        let a = try RunningServer(stateSize: 1 << 20, name: "\(tag)-a"), b = try RunningServer(stateSize: 1 << 20, name: "\(tag)-b")
        a.device.stateChecksums = checksums
        let ca = try VFIOUserClient(path: a.path), cb = try VFIOUserClient(path: b.path)
        let block = (0..<(1 << 20)).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ 3) }
        try ca.regionWrite(2, offset: 0, block)
        try ca.setMigrationState(.stopCopy)
        try cb.setMigrationState(.resuming)
        return (a, b, ca, cb)
    }

    func refusal(_ all: [UInt8], _ cb: VFIOUserClient) -> String {
        var why = ""
        XCTAssertThrowsError(try all.withUnsafeBytes { try cb.writeMigrationData($0) }) { why = "\($0)" }
        return why
    }

    func testAVersion2StreamIsRefusedByItsNumber() throws {
        let (a, b, ca, cb) = try pair("v2", checksums: true)
        defer { ca.close(); cb.close(); a.stop(); b.stop() }
        var all = try stream(ca)
        XCTAssertEqual(UInt16(all[4]) | UInt16(all[5]) << 8, 3, "this build writes format 3")
        all[4] = 2
        XCTAssertEqual(refusal(all, cb).contains("EINVAL"), true)
        XCTAssertTrue(b.device.memoryIsAllZero(), "nothing was loaded")
        let log = (try? cb.migrationState()) ?? .error
        XCTAssertEqual(log, .resuming, "in step after the refusal")
    }

    func testChunkChecksumsAreOffByDefaultAndTheStreamSaysSo() throws {
        let (a, b, ca, cb) = try pair("off", checksums: false)
        defer { ca.close(); cb.close(); a.stop(); b.stop() }
        let all = try stream(ca)
        let hs = DMAEngineStateFormat.headerSize
        // The header record's flags, then the first chunk record's checksum field.
        XCTAssertEqual(all.withUnsafeBytes { $0.loadUnaligned(fromByteOffset: hs + 12, as: UInt32.self) }, 0)
        let chunk = hs + 16
        XCTAssertEqual(all.withUnsafeBytes { $0.loadUnaligned(fromByteOffset: chunk + 6, as: UInt16.self) }, DMAEngineStateFormat.RecordType.chunk.rawValue)
        XCTAssertEqual(all.withUnsafeBytes { $0.loadUnaligned(fromByteOffset: chunk + 12, as: UInt64.self) }, 0)
        // Without checksums the stream still loads whole.
        try all.withUnsafeBytes { try cb.writeMigrationData($0) }
        try cb.setMigrationState(.stop)
        XCTAssertEqual(b.device.stateDigest(), a.device.stateDigest())
    }

    func testDeclaredChecksumsCatchAFlippedBitThatAnUndeclaredStreamCannot() throws {
        let (a, b, ca, cb) = try pair("on", checksums: true)
        defer { ca.close(); cb.close(); a.stop(); b.stop() }
        var all = try stream(ca)
        let hs = DMAEngineStateFormat.headerSize
        XCTAssertEqual(all.withUnsafeBytes { $0.loadUnaligned(fromByteOffset: hs + 12, as: UInt32.self) }, DMAEngineStateFormat.flagChunkChecksums)
        all[hs + 16 + hs + 8 + 1000] ^= 0x10  // a byte of the first chunk's data
        let why = refusal(all, cb)
        XCTAssertTrue(why.contains("EINVAL"), why)
        XCTAssertTrue(b.device.memoryIsAllZero(), "the fresh destination's memory was zeroed again")
    }

    func testAChunkChecksumInAStreamThatDeclaredNoneIsRefused() throws {
        let (a, b, ca, cb) = try pair("undeclared", checksums: false)
        defer { ca.close(); cb.close(); a.stop(); b.stop() }
        var all = try stream(ca)
        let chunk = DMAEngineStateFormat.headerSize + 16
        all[chunk + 12] = 1
        XCTAssertTrue(refusal(all, cb).contains("EINVAL"))
        let e = DMAEngineStateError.undeclaredChecksum(0)
        XCTAssertTrue(e.description.contains("declared none"))
    }

    func testUnknownHeaderFlagsAreRefused() throws {
        let (a, b, ca, cb) = try pair("flags", checksums: false)
        defer { ca.close(); cb.close(); a.stop(); b.stop() }
        var all = try stream(ca)
        let hs = DMAEngineStateFormat.headerSize
        all[hs + 12] = 0x02
        // The header record's own checksum covers its payload: recompute it, so the flag is what is refused.
        let sum = all.withUnsafeBytes { DMAEngineStateFormat.recordChecksum(UnsafeRawBufferPointer(rebasing: $0[hs..<hs + 16])) }
        withUnsafeBytes(of: sum.littleEndian) { for i in 0..<8 { all[12 + i] = $0[i] } }
        XCTAssertTrue(refusal(all, cb).contains("EINVAL"))
        XCTAssertTrue(DMAEngineStateError.badFlags(2).description.contains("unknown bits"))
    }

    func testBytesAfterTheEndRecordInTheSameWriteAreRefusedAtOnce() throws {
        // A header is received with the 8 bytes after it (one receive per chunk record fewer):
        // after the end record those bytes are data after the end, refused by that write.
        let (a, b, ca, cb) = try pair("after-end", checksums: false)
        defer { ca.close(); cb.close(); a.stop(); b.stop() }
        let all = try stream(ca) + [UInt8](repeating: 0xee, count: 8)
        XCTAssertTrue(refusal(all, cb).contains("EINVAL"))
        XCTAssertTrue(b.device.memoryIsAllZero(), "nothing of the stream was kept")
    }

    /// The relay of a stopped source whose replies are spliced by reference; `refuse` makes the
    /// kernel step fail so the bytes already in the pipe go by hand and the rest by sendmsg.
    func relay(refuse: Bool) throws {
        SpliceSender.refuseSendForTesting = refuse
        let a = try RunningServer(stateSize: 4 << 20, name: "ref-a"), b = try RunningServer(stateSize: 4 << 20, name: "ref-b")
        defer { a.stop(); b.stop() }
        a.device.stateChecksums = true  // a byte out of place in the splice would fail its chunk
        let ca = try VFIOUserClient(path: a.path), cb = try VFIOUserClient(path: b.path)
        defer { ca.close(); cb.close() }
        let block = (0..<(1 << 20)).map { UInt8(truncatingIfNeeded: $0 &* 13 &+ 9) }
        for i in 0..<4 { try ca.regionWrite(2, offset: UInt64(i) << 20, block) }
        let digest = a.device.stateDigest()
        try cb.setMigrationState(.resuming)
        try ca.setMigrationState(.stopCopy)
        XCTAssertGreaterThan(try ca.relayMigrationData(to: cb, depth: 4), 4 << 20)
        try cb.setMigrationState(.stop)
        XCTAssertEqual(b.device.stateDigest(), digest)
        XCTAssertEqual(try ca.migrationState(), .stopCopy, "source connection in step")
    }

    func testSplicedGatheredRepliesMoveTheWholeState() throws { try relay(refuse: false) }
    func testSpliceRefusedByTheKernelMidReplyFallsBackAndNothingIsLost() throws { try relay(refuse: true) }

    func testAClientThatHangsUpMidSplicedReplyLeavesTheServerServing() throws {
        // splice(2) to a socket does not take MSG_NOSIGNAL: the server must not die of SIGPIPE.
        let a = try RunningServer(stateSize: 8 << 20, name: "hup")
        defer { a.stop() }
        let ca = try VFIOUserClient(path: a.path)
        try ca.setMigrationState(.stopCopy)
        var w = WireWriter(capacity: 8); w.u32(8 + (1 << 20)); w.u32(1 << 20)
        for _ in 0..<4 {
            try w.bytes.withUnsafeBytes { try ca.connection.send(id: ca.connection.allocateID(), command: VFIOUserCommand.migDataRead.rawValue, flags: MessageHeader.typeCommand, payload: [$0]) }
        }
        ca.close()
        usleep(200_000)
        let again = try VFIOUserClient(path: a.path)
        defer { again.close() }
        XCTAssertEqual(try again.read32(0, DMAEngine.Reg.identification) != 0, true, "the server still answers")
    }
}
