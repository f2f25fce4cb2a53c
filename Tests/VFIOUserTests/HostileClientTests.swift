import Glibc
import XCTest
@testable import Devices
import SystemCalls
import VFIO
@testable import VFIOUser

/// Issue 13, items 1-4, 13-15: one message from a hostile client killed the server (overflow
/// traps, allocations sized from the client's numbers), or got a wrong answer. Each test talks
/// to a real server over a real socket and checks the server still serves afterwards.
final class HostileClientTests: XCTestCase {
    var server: RunningServer!
    override func setUpWithError() throws { server = try RunningServer(stateSize: 1 << 20, name: "hostile") }
    override func tearDown() { server.stop() }

    func assertError(_ m: Message, _ e: Errno, _ what: String = "", file: StaticString = #filePath, line: UInt = #line) {
        XCTAssertTrue(m.header.isReply && m.header.isError, "expected an error reply \(what)", file: file, line: line)
        XCTAssertEqual(m.header.errorNumber, UInt32(e.rawValue), "errno \(what)", file: file, line: line)
    }
    func assertOK(_ m: Message, _ what: String = "", file: StaticString = #filePath, line: UInt = #line) {
        XCTAssertFalse(m.header.isError, "expected success \(what) (errno \(m.header.errorNumber))", file: file, line: line)
    }
    func assertStillServing(_ p: RawPeer, file: StaticString = #filePath, line: UInt = #line) throws {
        let r = try p.call(.regionRead, RegionAccess(offset: 0, region: 0, count: 4).encode())
        XCTAssertFalse(r.header.isError, "server stopped serving", file: file, line: line)
    }
    func feature(_ p: RawPeer, _ index: UInt32, _ flags: UInt32, data: [UInt8], argsz: UInt32? = nil) throws -> Message {
        try p.call(.deviceFeature, DeviceFeature(argsz: argsz, flags: index | flags, data: data[...]).encode())
    }
    func u64s(_ v: [UInt64]) -> [UInt8] { var w = WireWriter(); for x in v { w.u64(x) }; return w.bytes }
    func mapRAM(_ p: RawPeer, _ ram: GuestRAM, iova: UInt64) throws {
        assertOK(try p.call(.dmaMap, DMAMapRequest(flags: [.read, .write], offset: 0, address: iova, size: ram.size).encode(), fds: [ram.fd.rawValue]), "DMA_MAP")
    }
    func startLogging(_ p: RawPeer, pageSize: UInt64, ranges: [(UInt64, UInt64)]) throws -> Message {
        var w = WireWriter(); w.u64(pageSize); w.u32(UInt32(ranges.count)); w.u32(0)
        for r in ranges { w.u64(r.0); w.u64(r.1) }
        return try feature(p, DeviceFeature.dmaLoggingStart, DeviceFeature.set, data: w.bytes)
    }

    /// Items 1, 2: DMA_LOGGING_REPORT with length 2^64-1 trapped (SIGILL); 2^50 aborted
    /// allocating 32 GiB. Both are refused now, logging started or not.
    func testLoggingReportWithHugeLengthIsRefused() throws {
        let p = try RawPeer(path: server.path); defer { p.close() }
        let ram = try GuestRAM(size: 1 << 20)
        try mapRAM(p, ram, iova: 0x10_0000)
        assertError(try feature(p, DeviceFeature.dmaLoggingReport, DeviceFeature.get, data: u64s([0, UInt64.max, 4096]), argsz: 1 << 20), .EINVAL, "length 2^64-1, logging off")
        assertError(try feature(p, DeviceFeature.dmaLoggingReport, DeviceFeature.get, data: u64s([0, 1 << 50, 4096]), argsz: 1 << 20), .EINVAL, "length 2^50, logging off")
        assertOK(try startLogging(p, pageSize: 4096, ranges: [(0x10_0000, ram.size)]))
        assertError(try feature(p, DeviceFeature.dmaLoggingReport, DeviceFeature.get, data: u64s([0x10_0000, UInt64.max, 4096]), argsz: 1 << 20), .EINVAL, "wraps")
        assertError(try feature(p, DeviceFeature.dmaLoggingReport, DeviceFeature.get, data: u64s([0x10_0000, 1 << 50, 4096]), argsz: 1 << 20), .E2BIG, "2^50: bitmap larger than a message")
        assertError(try feature(p, DeviceFeature.dmaLoggingReport, DeviceFeature.get, data: u64s([0x10_0000, 1 << 30, 4096]), argsz: 1 << 20), .EINVAL, "not fully mapped")
        // A sane report still works.
        let ok = try feature(p, DeviceFeature.dmaLoggingReport, DeviceFeature.get, data: u64s([0x10_0000, ram.size, 4096]), argsz: 8 + 24 + 32)
        assertOK(ok); XCTAssertEqual(ok.payload.count, 8 + 24 + 32)
        try assertStillServing(p)
    }

    /// Item 3: DMA_UNMAP with GET_DIRTY_BITMAP and size 2^64-1 trapped before the lookup.
    func testUnmapWithBitmapAndHugeSizeIsRefused() throws {
        let p = try RawPeer(path: server.path); defer { p.close() }
        for size in [UInt64.max, UInt64.max - 4095, 1 << 63] {
            let u = DMAUnmapRequest(argsz: 40, flags: .getDirtyBitmap, address: 0x1000, size: size, bitmap: .init(pageSize: 4096, size: UInt64.max))
            assertError(try p.call(.dmaUnmap, u.encode()), .EINVAL, "size 0x\(String(size, radix: 16))")
        }
        let u = DMAUnmapRequest(argsz: 40, flags: .getDirtyBitmap, address: 0x1000, size: 4096, bitmap: .init(pageSize: UInt64.max, size: 8))
        assertError(try p.call(.dmaUnmap, u.encode()), .EINVAL, "page size 2^64-1")
        try assertStillServing(p)
    }

    /// Item 4: the old DIRTY_PAGES GET_BITMAP with size 0 and page size 0 trapped.
    func testDirtyPagesGetBitmapWithZeroSizesIsRefused() throws {
        let p = try RawPeer(path: server.path); defer { p.close() }
        for (size, ps) in [(UInt64(0), UInt64(0)), (UInt64.max, UInt64(0)), (UInt64.max, UInt64(4096)), (UInt64(4096), UInt64.max)] {
            let d = DirtyPagesRequest(argsz: 4096, flags: DirtyPagesRequest.getBitmap, range: (0, size, ps, 4096))
            let r = try p.call(.dirtyPages, d.encode())
            XCTAssertTrue(r.header.isError, "size \(size) page size \(ps)")
        }
        try assertStillServing(p)
    }

    /// Item 13: a mapping ending at 2^64 has end == 0, and the overlap went unseen.
    func testDMAMapOverlapAtTopOfAddressSpaceIsSeen() throws {
        let p = try RawPeer(path: server.path); defer { p.close() }
        let top = UInt64.max - 8191  // [2^64 - 8 KiB, 2^64)
        assertOK(try p.call(.dmaMap, DMAMapRequest(flags: [.read, .write], offset: 0, address: top, size: 8192).encode()))
        assertError(try p.call(.dmaMap, DMAMapRequest(flags: [.read, .write], offset: 0, address: top + 4096, size: 4096).encode()), .EEXIST, "inside")
        assertError(try p.call(.dmaMap, DMAMapRequest(flags: [.read, .write], offset: 0, address: top - 4096, size: 8192).encode()), .EEXIST, "below, overlapping")
        assertOK(try p.call(.dmaMap, DMAMapRequest(flags: [.read, .write], offset: 0, address: top - 4096, size: 4096).encode()), "adjacent below")
        XCTAssertEqual(server.server.dma.count, 2)
        assertOK(try p.call(.dmaUnmap, DMAUnmapRequest(address: top, size: 8192).encode()))
        try assertStillServing(p)
    }

    /// A client's fd-less mapping of 8 TiB (memory it never backed) got a 256 MiB dirty bitmap
    /// when logging started; the client logs its message writes itself, so none is kept.
    func testFDlessMappingGetsNoDirtyBitmap() throws {
        let p = try RawPeer(path: server.path); defer { p.close() }
        assertOK(try p.call(.dmaMap, DMAMapRequest(flags: [.read, .write], offset: 0, address: 0, size: 1 << 43).encode()), "8 TiB fd-less")
        assertOK(try startLogging(p, pageSize: 4096, ranges: []))
        XCTAssertFalse(server.server.dma.hasDirtyBitmap(iova: 0))
        assertOK(try p.call(.dmaMap, DMAMapRequest(flags: [.read, .write], offset: 0, address: 1 << 44, size: 1 << 43).encode()), "mapped while logging")
        XCTAssertFalse(server.server.dma.hasDirtyBitmap(iova: 1 << 44))
        let r = try feature(p, DeviceFeature.dmaLoggingReport, DeviceFeature.get, data: u64s([0, 1 << 20, 4096]), argsz: 8 + 24 + 32)
        assertOK(r, "a report over it is all clean"); XCTAssertEqual(Array(r.payload[32...]), [UInt8](repeating: 0, count: 32))
        let ram = try GuestRAM(size: 1 << 20)
        try mapRAM(p, ram, iova: 1 << 50)
        XCTAssertTrue(server.server.dma.hasDirtyBitmap(iova: 1 << 50), "an fd mapping is logged by the server")
    }

    /// Item 14: truncated DEVICE_FEATURE data was answered EIO; it is EINVAL (the kernel's).
    func testTruncatedFeatureDataIsEINVAL() throws {
        let p = try RawPeer(path: server.path); defer { p.close() }
        assertError(try feature(p, DeviceFeature.migDeviceState, DeviceFeature.set, data: [2, 0], argsz: 16), .EINVAL, "MIG_DEVICE_STATE, 2 bytes")
        assertError(try feature(p, DeviceFeature.migDeviceState, DeviceFeature.set, data: [2, 0, 0, 0], argsz: 16), .EINVAL, "MIG_DEVICE_STATE, 4 bytes")
        assertError(try feature(p, DeviceFeature.dmaLoggingReport, DeviceFeature.get, data: [1, 2, 3, 4], argsz: 64), .EINVAL, "LOGGING_REPORT")
        assertError(try feature(p, DeviceFeature.dmaLoggingStart, DeviceFeature.set, data: [0, 16, 0, 0], argsz: 64), .EINVAL, "LOGGING_START")
        XCTAssertEqual(server.server.migration?.state, .running, "nothing moved")
        try assertStillServing(p)
    }

    /// Item 15, the uAPI's DMA_LOGGING_START: num_ranges 0 logs everything, and page_size is a
    /// hint the device answers with its choice.
    func testLoggingStartWithNoRangesAndPageSizeHint() throws {
        let p = try RawPeer(path: server.path); defer { p.close() }
        let ram = try GuestRAM(size: 1 << 20)
        try mapRAM(p, ram, iova: 0x10_0000)
        let r = try startLogging(p, pageSize: 1000, ranges: [])
        assertOK(r, "num_ranges 0, hint 1000")
        XCTAssertEqual(r.payload.count, 8 + 16)
        var rd = WireReader(r.payload[8...], context: "reply")
        XCTAssertEqual(try rd.u64(), 4096, "the chosen page size is returned")
        XCTAssertEqual(server.server.dma.loggingPageSize, 4096)
        let again = try startLogging(p, pageSize: 65536, ranges: [])
        assertOK(again)
        var rd2 = WireReader(again.payload[8...], context: "reply")
        XCTAssertEqual(try rd2.u64(), 4096, "a running log keeps its size")
    }

    /// Item 15: replies never exceed the request's argsz (the kernel's argsz < minsz → EINVAL),
    /// and nothing is done before the refusal.
    func testRepliesNeverLongerThanArgsz() throws {
        let p = try RawPeer(path: server.path); defer { p.close() }
        var gi = DeviceInfo(flags: 0, regionCount: 0, irqCount: 0); gi.argsz = 8
        assertError(try p.call(.deviceGetInfo, gi.encode()), .EINVAL, "GET_INFO argsz 8")
        var qi = IRQInfo(flags: [], index: 0, count: 0); qi.argsz = 4
        assertError(try p.call(.deviceGetIRQInfo, qi.encode()), .EINVAL, "GET_IRQ_INFO argsz 4")
        assertError(try p.call(.deviceGetRegionInfo, RegionInfo(argsz: 16, flags: [], index: 0, size: 0).encodeRequest()), .EINVAL, "GET_REGION_INFO argsz 16")
        assertError(try feature(p, DeviceFeature.migration, DeviceFeature.get, data: [], argsz: 8), .EINVAL, "MIGRATION GET: 16-byte reply, argsz 8")
        // DMA_UNMAP with argsz < 24 is refused before unmapping.
        assertOK(try p.call(.dmaMap, DMAMapRequest(flags: [.read], offset: 0, address: 0x4000, size: 4096).encode()))
        assertError(try p.call(.dmaUnmap, DMAUnmapRequest(argsz: 8, address: 0x4000, size: 4096).encode()), .EINVAL, "UNMAP argsz 8")
        XCTAssertEqual(server.server.dma.count, 1, "the refused unmap did nothing")
        // Every successful reply fits.
        let ok = try feature(p, DeviceFeature.migration, DeviceFeature.get, data: [], argsz: 16)
        assertOK(ok); XCTAssertLessThanOrEqual(ok.payload.count, 16)
        try assertStillServing(p)
    }

    /// Item 15: the VERSION reply's capabilities are a subset of the client's (the spec).
    func testVersionReplyEchoesOnlyProposedCapabilities() throws {
        let p = try RawPeer(path: server.path, negotiate: false); defer { p.close() }
        let json = #"{"capabilities":{"max_msg_fds":4}}"#
        let r = try p.call(.version, [0, 0, 2, 0] + Array(json.utf8) + [0])
        assertOK(r)
        let v = try VersionPayload(decoding: r.payload[...])
        XCTAssertEqual(v.capabilities.present, ["max_msg_fds"], "reply JSON: \(v.rawJSON ?? "")")
        // No capabilities at all: none back.
        let q = try RawPeer(path: server.path, negotiate: false); defer { q.close() }
        p.close()
        let r2 = try q.call(.version, [0, 0, 2, 0])
        assertOK(r2)
        XCTAssertEqual(try VersionPayload(decoding: r2.payload[...]).capabilities.present, [])
    }

    /// Item 15: an unsupported major version gets an error reply, then the connection is
    /// closed (the spec); the server serves the next client.
    func testUnsupportedMajorVersionClosesTheConnection() throws {
        let p = try RawPeer(path: server.path, negotiate: false); defer { p.close() }
        assertError(try p.call(.version, VersionPayload(major: 1, minor: 0, capabilities: Capabilities()).encode()), .ENOTSUP)
        XCTAssertTrue(try Poll.waitReadable(p.sock.fd, timeoutMilliseconds: 5000), "the server closed the connection")
        XCTAssertThrowsError(try p.conn.receive(), "EOF after the error reply")
        p.close()
        let q = try RawPeer(path: server.path); defer { q.close() }
        try assertStillServing(q)
    }
}

/// Item 15: server→client DMA messages honour a peer max_data_xfer_size below 4096.
final class SmallTransferPeerTests: XCTestCase {
    func testDMAMessagesHonourSmallPeerMaxDataXferSize() throws {
        for twin in [true, false] {
            let server = try RunningServer(stateSize: 1 << 20, name: "small-xfer")
            defer { server.stop() }
            var o = VFIOUserClient.Options(); o.maxDataXferSize = 1024; o.offerTwinSocket = twin
            let c = try VFIOUserClient(path: server.path, options: o); defer { c.close() }
            let ram = try GuestRAM(size: 1 << 20)
            try c.mapDMA(iova: 0x10_0000, size: ram.size, local: ram.map.base, fd: nil)
            ram.fill(offset: 0, count: 8192, seed: 9)
            try runJob(c, source: 0x10_0000, destination: DMAEngine.deviceMemoryBase, count: 8192, toRAM: false)
            XCTAssertEqual(try c.read64(0, DMAEngine.Reg.lastJobStatus), 0, "twin \(twin)")
            XCTAssertGreaterThanOrEqual(c.dmaMessagesServed, 8, "8 KiB in chunks of at most 1 KiB (twin \(twin))")
            try runJob(c, source: DMAEngine.deviceMemoryBase, destination: 0x10_0000 + 0x4000, count: 8192, toRAM: true)
            XCTAssertEqual(ram.bytes(offset: 0x4000, count: 8192), ram.bytes(offset: 0, count: 8192), "round trip (twin \(twin))")
        }
    }
}
