import Glibc
import XCTest
@testable import Devices
import SystemCalls
import VFIO
@testable import VFIOUser

/// The device-state fast path (issue 12 item 3): replies spliced socket → pipe → socket by the
/// client, MIG_DATA_WRITE received by the destination device straight into its memory, and
/// the plain paths these fall back to. Every size from a peer is still checked first, every
/// wait is bounded, and a failed load leaves the destination as it was.
final class DeviceStateFastPathTests: XCTestCase {
    var serverLog: [String] = []
    let logLock = Mutex()
    func logged(_ text: String) -> Bool { logLock.withLock { serverLog.contains { $0.contains(text) } } }

    override func setUp() {
        Log.level = .warning
        Log.sink = { [self] line in logLock.withLock { serverLog.append(line) } }
    }

    override func tearDown() {
        SpliceForwarder.refuseSendForTesting = false
        SpliceSender.refuseSendForTesting = false
        Log.sink = nil
        Log.level = .info
    }

    func options(maxData: UInt64 = Capabilities.defaultMaxDataXferSize, timeoutMS: Int32 = 10_000, splice: Bool = true) -> VFIOUserClient.Options {
        var o = VFIOUserClient.Options()
        o.maxDataXferSize = maxData
        o.timeoutMilliseconds = timeoutMS
        o.spliceRelay = splice
        return o
    }

    func fill(_ c: VFIOUserClient, size: UInt64, seed: UInt8) throws {
        var off: UInt64 = 0
        let block = (0..<(1 << 20)).map { UInt8(truncatingIfNeeded: $0 &* 13 &+ Int(seed)) }
        while off < size { try c.regionWrite(2, offset: off, block); off += UInt64(block.count) }
    }

    /// Relay a filled 8 MiB device to a fresh one and check the destination holds its state.
    func relayWhole(splice: Bool, maxData: UInt64, file: StaticString = #filePath, line: UInt = #line) throws {
        var so = VFIOUserServer.Options(); so.maxDataXferSize = maxData
        let a = try RunningServer(stateSize: 8 << 20, options: so, name: "fp-a"), b = try RunningServer(stateSize: 8 << 20, options: so, name: "fp-b")
        defer { a.stop(); b.stop() }
        let ca = try VFIOUserClient(path: a.path, options: options(maxData: maxData, splice: splice))
        let cb = try VFIOUserClient(path: b.path, options: options(maxData: maxData))
        defer { ca.close(); cb.close() }
        try fill(ca, size: 8 << 20, seed: 5)
        try ca.write32(0, DMAEngine.Reg.liveness, 0x77)
        let digest = a.device.stateDigest()
        try cb.setMigrationState(.resuming)
        XCTAssertEqual(b.device.load?.direct, true, "a fresh destination loads straight into device memory", file: file, line: line)
        try ca.setMigrationState(.stopCopy)
        let moved = try ca.relayMigrationData(to: cb, depth: 4)
        XCTAssertGreaterThan(moved, 8 << 20, file: file, line: line)
        try cb.setMigrationState(.stop)
        XCTAssertEqual(b.device.stateDigest(), digest, "the destination holds the source's state", file: file, line: line)
        XCTAssertEqual(try ca.migrationState(), .stopCopy, "source connection in step", file: file, line: line)
        XCTAssertEqual(try cb.migrationState(), .stop, "destination connection in step", file: file, line: line)
    }

    func testSplicedRelayInLargeMessagesMovesTheWholeState() throws {
        // 4 MiB messages: more than the 1 MiB pipe, so each is spliced in several steps.
        try relayWhole(splice: true, maxData: 4 << 20)
    }

    func testPlainRelayWithoutSpliceMovesTheSameState() throws {
        try relayWhole(splice: false, maxData: 1 << 20)
    }

    func testSpliceRefusedWithDataInThePipeFallsBackAndNothingIsLost() throws {
        // The kernel refusing pipe → socket after socket → pipe worked: the bytes in the pipe
        // go on by hand, the rest of the relay takes the plain path.
        SpliceForwarder.refuseSendForTesting = true
        try relayWhole(splice: true, maxData: 1 << 20)
    }

    /// A source that answers its first MIG_DATA_READ with a reply header promising
    /// `promised` bytes, sends the first `sent` of `stream` and then nothing more.
    func stallingSource(stream: [UInt8], promised: Int, sent: Int) throws -> ScriptedServer {
        let reads = Box(0)
        return try ScriptedServer(tag: "stall") { m, c in
            if m.header.command == VFIOUserCommand.migDataRead.rawValue {
                guard reads.update({ $0 += 1; return $0 }) == 1 else { return }
                let header = MessageHeader(messageID: m.header.messageID, command: m.header.command,
                                           messageSize: UInt32(MessageHeader.size + 8 + promised), flags: MessageHeader.typeReply, errorNumber: 0).bytes
                var w = WireWriter(); w.u32(UInt32(8 + promised)); w.u32(UInt32(promised))
                let bytes = header + w.bytes + Array(stream[0..<sent])
                try? bytes.withUnsafeBytes { try c.socket.send([$0]) }
            } else {
                ScriptedServer.stateReply(c, to: m.header, .stopCopy)
            }
        }
    }

    func testASourceThatStopsMidPayloadIsBoundedAndTheDestinationKeepsNothing() throws {
        // The start of a real 1 MiB dma-engine stream: its header record, then a chunk cut
        // 936 bytes into its data (which the destination has put in device memory).
        let gen = try RunningServer(stateSize: 1 << 20, name: "gen")
        let cg = try VFIOUserClient(path: gen.path)
        try fill(cg, size: 1 << 20, seed: 4)
        try cg.setMigrationState(.stopCopy)
        let stream = try cg.readMigrationData(max: 4096)
        cg.close(); gen.stop()
        for splice in [true, false] {
            let src = try stallingSource(stream: stream, promised: 4096, sent: 1000)
            defer { src.close() }
            var so = VFIOUserServer.Options(); so.peerTimeoutSeconds = 30
            let b = try RunningServer(stateSize: 1 << 20, options: so, name: "stall-dst")
            defer { b.stop() }
            let before = b.device.stateDigest()
            let ca = try VFIOUserClient(path: src.path, options: options(maxData: 4096, timeoutMS: 400, splice: splice))
            defer { ca.close() }
            let cb = try VFIOUserClient(path: b.path, options: options(maxData: 4096, timeoutMS: 400))
            try cb.setMigrationState(.resuming)
            let t0 = monotonicNanoseconds()
            XCTAssertThrowsError(try ca.relayMigrationData(to: cb, depth: 1)) { e in
                XCTAssertEqual(e as? VFIOUserClientError, .timeout(command: .migDataRead, seconds: 0.4), "splice \(splice): \(e)")
            }
            XCTAssertLessThan(Double(monotonicNanoseconds() - t0) / 1e9, 5, "bounded (splice \(splice))")
            XCTAssertThrowsError(try ca.migrationState()) { XCTAssertEqual($0 as? VFIOUserClientError, .timeout(command: .migDataRead, seconds: 0.4)) }
            if splice {
                // The MIG_DATA_WRITE had begun: that stream stopped mid-message too, and says so.
                XCTAssertThrowsError(try cb.migrationState()) { e in
                    XCTAssertTrue("\(e)".contains("MIG_DATA_WRITE cut part-way (1000 of 4096 bytes sent)"), "\(e)")
                }
            } else {
                // The plain path sends a message only once it has all its data: nothing went out.
                XCTAssertEqual(try cb.migrationState(), .resuming)
            }
            // The destination server sees the cut message end with the connection: the load is
            // dropped and what it had put in device memory is zeroed.
            cb.close()
            let again = try VFIOUserClient(path: b.path, options: options())
            defer { again.close() }
            try again.reset()
            XCTAssertEqual(try again.migrationState(), .running)
            XCTAssertEqual(b.device.stateDigest(), before, "nothing of the cut stream stayed in the destination (splice \(splice))")
        }
    }

    /// A source server whose every MIG_DATA_READ reply is `size` bytes of data claiming
    /// `claimedSize`, relayed to a real destination by 4096-byte reads: the relay must refuse it
    /// with `expected`, leave both connections in step, and bring no data to the destination.
    private func assertRelayRefusesReply(tag: String, size: Int, claimedSize: Int? = nil, expected: String,
                                         file: StaticString = #filePath, line: UInt = #line) throws {
        let src = try ScriptedServer(tag: tag) { m, c in
            if m.header.command == VFIOUserCommand.migDataRead.rawValue {
                ScriptedServer.readReply(c, to: m.header, size: size, claimedSize: claimedSize)
            } else {
                ScriptedServer.stateReply(c, to: m.header, .stopCopy)
            }
        }
        defer { src.close() }
        let b = try RunningServer(stateSize: 1 << 20, name: "\(tag)-dst")
        defer { b.stop() }
        let ca = try VFIOUserClient(path: src.path, options: options(maxData: 4096, timeoutMS: 2000))
        let cb = try VFIOUserClient(path: b.path, options: options(maxData: 4096, timeoutMS: 2000))
        defer { ca.close(); cb.close() }
        try cb.setMigrationState(.resuming)
        XCTAssertThrowsError(try ca.relayMigrationData(to: cb, depth: 1), file: file, line: line) { e in
            XCTAssertTrue("\(e)".contains(expected), "\(e)", file: file, line: line)
        }
        XCTAssertEqual(try ca.migrationState(), .stopCopy, "the reply was drained: the source connection is in step", file: file, line: line)
        XCTAssertEqual(try cb.migrationState(), .resuming, "nothing was written: the destination connection is in step", file: file, line: line)
        XCTAssertEqual(b.device.load?.received.contains(true) ?? false, false, "no data reached the destination device", file: file, line: line)
    }

    func testAReplyLargerThanAskedIsRefusedByTheRelayBeforeAnyDataMoves() throws {
        try assertRelayRefusesReply(tag: "big", size: 8192, expected: "MIG_DATA_READ reply of 8200 bytes for a 4096-byte read")
    }

    func testATruncatedReplyWhoseSizeExceedsItsPayloadIsRefused() throws {
        // size says 2000 bytes of data, the message carries 1000.
        try assertRelayRefusesReply(tag: "trunc", size: 1000, claimedSize: 2000,
                                    expected: "MIG_DATA_READ returned size 2000 (argsz 1008) in a 1008-byte reply to a 4096-byte read")
    }

    func testACorruptStreamIntoADestinationThatHeldDataLeavesItUnchanged() throws {
        // A destination whose memory is not all zeros stages the load (device memory cannot be
        // given back otherwise); a corrupt record leaves it exactly as it was.
        let a = try RunningServer(stateSize: 2 << 20, name: "held-a"), b = try RunningServer(stateSize: 2 << 20, name: "held-b")
        defer { a.stop(); b.stop() }
        let ca = try VFIOUserClient(path: a.path), cb = try VFIOUserClient(path: b.path)
        defer { ca.close(); cb.close() }
        a.device.stateChecksums = true  // the stream declares chunk checksums: corruption is seen
        try fill(ca, size: 2 << 20, seed: 1)
        try fill(cb, size: 2 << 20, seed: 2)
        let before = b.device.stateDigest()
        try cb.setMigrationState(.resuming)
        XCTAssertEqual(b.device.load?.direct, false, "a destination holding data stages the load")
        try ca.setMigrationState(.stopCopy)
        b.device.corruptNextWriteForTesting = true
        XCTAssertThrowsError(try ca.relayMigrationData(to: cb, depth: 2)) { XCTAssertEqual(($0 as? VFIOUserClientError)?.errno, .EINVAL, "\($0)") }
        XCTAssertTrue(logged("is corrupt: checksum"), "\(serverLog)")
        XCTAssertEqual(try cb.migrationState(), .resuming, "the refused writes were drained: in step")
        try cb.reset()
        XCTAssertEqual(b.device.stateDigest(), before, "nothing was applied")
        try ca.setMigrationState(.running)
    }

    func testACorruptStreamIntoAFreshDestinationLeavesItsMemoryZero() throws {
        let a = try RunningServer(stateSize: 2 << 20, name: "fresh-a"), b = try RunningServer(stateSize: 2 << 20, name: "fresh-b")
        defer { a.stop(); b.stop() }
        let ca = try VFIOUserClient(path: a.path), cb = try VFIOUserClient(path: b.path)
        defer { ca.close(); cb.close() }
        a.device.stateChecksums = true
        try fill(ca, size: 2 << 20, seed: 3)
        let before = b.device.stateDigest()
        try cb.setMigrationState(.resuming)
        XCTAssertEqual(b.device.load?.direct, true)
        try ca.setMigrationState(.stopCopy)
        // Corrupt the third write (or the second, if the server is still on it): the first
        // write's chunks are in device memory by then (its reply came back).
        var writes = 0
        var sawData = false
        XCTAssertThrowsError(try ca.relayMigrationData(to: cb, chunk: 512 * 1024, depth: 1, beforeWrite: {
            writes += 1
            if writes == 3 {
                sawData = !b.device.memoryIsAllZero()
                b.device.corruptNextWriteForTesting = true
            }
        }))
        XCTAssertTrue(sawData, "chunks had landed in device memory before the corrupt write")
        XCTAssertTrue(logged("is corrupt: checksum"), "\(serverLog)")
        XCTAssertTrue(b.device.memoryIsAllZero(), "the chunks written before the corrupt one were zeroed again")
        try cb.reset()
        XCTAssertEqual(b.device.stateDigest(), before)
        try ca.setMigrationState(.running)
    }

    func testAWriteInTheWrongStateIsRefusedAndTheConnectionStaysInStep() throws {
        let b = try RunningServer(stateSize: 1 << 20, name: "state-dst")
        defer { b.stop() }
        let cb = try VFIOUserClient(path: b.path)
        defer { cb.close() }
        let data = [UInt8](repeating: 0x41, count: 100_000)
        XCTAssertThrowsError(try data.withUnsafeBytes { try cb.writeMigrationData($0) }) { XCTAssertEqual(($0 as? VFIOUserClientError)?.errno, .EINVAL) }
        XCTAssertTrue(logged("MIG_DATA_WRITE in state RUNNING"), "\(serverLog)")
        XCTAssertEqual(try cb.migrationState(), .running, "the 100 000 refused bytes were drained")
    }

    func testARecordCutAcrossWritesOfAnySizeIsReassembled() throws {
        // The stream written in odd pieces (1, 7, 19, 28 bytes... through the whole stream):
        // records cut anywhere, including inside a header and a chunk's offset.
        let a = try RunningServer(stateSize: 1 << 20, name: "cut-a"), b = try RunningServer(stateSize: 1 << 20, name: "cut-b")
        defer { a.stop(); b.stop() }
        let ca = try VFIOUserClient(path: a.path), cb = try VFIOUserClient(path: b.path)
        defer { ca.close(); cb.close() }
        try fill(ca, size: 1 << 20, seed: 8)
        let digest = a.device.stateDigest()
        try ca.setMigrationState(.stopCopy)
        var all: [UInt8] = []
        while true { let d = try ca.readMigrationData(max: 1 << 20); all += d; if d.count < 1 << 20 { break } }
        try cb.setMigrationState(.resuming)
        let sizes = [1, 7, 19, 28, 65_536 + 3, 5, 200_000]
        var at = 0, k = 0
        while at < all.count {
            let n = min(sizes[k % sizes.count], all.count - at); k += 1
            try all[at..<at + n].withUnsafeBytes { try cb.writeMigrationData($0) }
            at += n
        }
        try cb.setMigrationState(.stop)
        XCTAssertEqual(b.device.stateDigest(), digest)
        try ca.setMigrationState(.stop)
    }
}

/// The stopped device's gathered MIG_DATA_READ (memory sent where it lies) and the running
/// device's copying one produce the same bytes.
final class DeviceStateGatherTests: XCTestCase {
    func testTheGatheredStopCopyStreamIsTheCopiedPreCopyStream() throws {
        let a = try RunningServer(stateSize: 1 << 20, name: "g-a"), b = try RunningServer(stateSize: 1 << 20, name: "g-b")
        defer { a.stop(); b.stop() }
        let ca = try VFIOUserClient(path: a.path), cb = try VFIOUserClient(path: b.path)
        defer { ca.close(); cb.close() }
        let block = (0..<(1 << 20)).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ 1) }
        try ca.regionWrite(2, offset: 0, block); try cb.regionWrite(2, offset: 0, block)
        try ca.setMigrationState(.preCopy)   // running: the copying path
        try cb.setMigrationState(.stopCopy)  // stopped: the gathered path
        XCTAssertNil(try a.device.readMigrationDataPieces(scratch: UnsafeMutableRawBufferPointer(start: nil, count: 0)), "no gather while running")
        let sizes = [100_000, 65_536 + 28, 7, 1 << 20, 4096]
        var copied: [UInt8] = [], gathered: [UInt8] = []
        var k = 0
        while true { let n = sizes[k % sizes.count]; k += 1; let d = try ca.readMigrationData(max: n); copied += d; if d.count < n { break } }
        k = 0
        while gathered.count < copied.count { let n = sizes[k % sizes.count]; k += 1; gathered += try cb.readMigrationData(max: n) }
        XCTAssertGreaterThan(copied.count, 1 << 20, "header and every chunk")
        XCTAssertTrue(Array(gathered[0..<copied.count]) == copied, "same bytes")
        try ca.setMigrationState(.running); try cb.setMigrationState(.running)
    }
}
