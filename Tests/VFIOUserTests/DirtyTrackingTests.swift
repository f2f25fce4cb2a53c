import Glibc
import XCTest
@testable import Devices
import SystemCalls
import VFIO
@testable import VFIOUser

/// Dirty tracking of what the device writes into guest memory.
final class DirtyTrackingTests: XCTestCase {
    let iovaA: UInt64 = 0x1000_0000, iovaB: UInt64 = 0x1010_0000  // two adjacent 1 MiB mappings

    func withDevice(_ mode: DMAMapTable.DirtyTrackingMode = .precise, fds: Bool = true,
                    _ body: (VFIOUserClient, GuestRAM) throws -> Void) throws {
        var o = VFIOUserServer.Options(); o.dirtyTracking = mode
        let s = try RunningServer(options: o, name: "dirty")
        defer { s.stop() }
        let c = try VFIOUserClient(path: s.path)
        defer { c.close() }
        let ram = try GuestRAM(size: 2 << 20)
        try c.mapDMA(iova: iovaA, size: 1 << 20, local: ram.map.base, fd: fds ? ram.fd : nil, offset: 0)
        try c.mapDMA(iova: iovaB, size: 1 << 20, local: ram.map.base + (1 << 20), fd: fds ? ram.fd : nil, offset: 1 << 20)
        try body(c, ram)
    }

    func pages(_ words: [UInt64]) -> [Int] {
        var out: [Int] = []
        for (i, w) in words.enumerated() { for b in 0..<64 where w & (1 << UInt64(b)) != 0 { out.append(i * 64 + b) } }
        return out
    }

    func testDeviceWritesAreLoggedExactlyAndReadClears() throws {
        try withDevice { c, ram in
            XCTAssertThrowsError(try c.dmaLoggingReport(iova: iovaA, length: 1 << 20, pageSize: 4096), "REPORT before START")
            try c.startDMALogging(pageSize: 4096, ranges: [(iovaA, 2 << 20)])
            // Device → RAM: 3 pages starting 1 KiB into page 10 touch pages 10...13.
            try runJob(c, source: DMAEngine.deviceMemoryBase, destination: iovaA + 10 * 4096 + 1024, count: 3 * 4096, toRAM: true)
            // Device reads (RAM → device) are not writes: not logged.
            try runJob(c, source: iovaA + 100 * 4096, destination: DMAEngine.deviceMemoryBase, count: 8192, toRAM: false)
            XCTAssertEqual(pages(try c.dmaLoggingReport(iova: iovaA, length: 1 << 20, pageSize: 4096)), [10, 11, 12, 13])
            XCTAssertEqual(pages(try c.dmaLoggingReport(iova: iovaA, length: 1 << 20, pageSize: 4096)), [], "read-and-clear")
            _ = ram
        }
    }

    func testReportSpanningTwoMappingsAndOtherPageSizes() throws {
        try withDevice { c, _ in
            try c.startDMALogging(pageSize: 4096, ranges: [(iovaA, 2 << 20)])
            // The job crosses from mapping A into mapping B.
            try runJob(c, source: DMAEngine.deviceMemoryBase, destination: iovaB - 4096, count: 8192, toRAM: true)
            // libvfio-user answers this with an empty success; we report both pages.
            XCTAssertEqual(pages(try c.dmaLoggingReport(iova: iovaA, length: 2 << 20, pageSize: 4096)), [255, 256])
            try runJob(c, source: DMAEngine.deviceMemoryBase, destination: iovaA + 3 * 4096, count: 4096, toRAM: true)
            // At 2 MiB report pages the whole range is one bit.
            XCTAssertEqual(try c.dmaLoggingReport(iova: iovaA, length: 2 << 20, pageSize: 2 << 20), [1])
            XCTAssertThrowsError(try c.dmaLoggingReport(iova: iovaA, length: 4 << 20, pageSize: 4096), "unmapped tail")
            XCTAssertThrowsError(try c.dmaLoggingReport(iova: iovaA, length: 1 << 20, pageSize: 3000), "not a power of two")
        }
    }

    func testStartRulesAndStop() throws {
        try withDevice { c, _ in
            // num_ranges 0 means "log everything" (the kernel uAPI), not an error.
            try c.startDMALogging(pageSize: 4096, ranges: [])
            try c.stopDMALogging()
            XCTAssertThrowsError(try c.startDMALogging(pageSize: 4096, ranges: [(iovaA + 1, 4096)]), "unaligned range")
            XCTAssertThrowsError(try c.startDMALogging(pageSize: 4096, ranges: [(iovaA, 8192), (iovaA + 4096, 8192)]), "overlap")
            XCTAssertTrue(c.probeFeature(DeviceFeature.dmaLoggingStart, get: false))
            XCTAssertFalse(c.probeFeature(DeviceFeature.dmaLoggingStart, get: true))
            XCTAssertTrue(c.probeFeature(DeviceFeature.dmaLoggingReport, get: true))
            try c.startDMALogging(pageSize: 8192, ranges: [(iovaA, 2 << 20)])
            // page_size is a hint the device answers with its choice (the uAPI): a second START
            // while logging keeps the running size and says so.
            var w = WireWriter(); w.u64(4096); w.u32(0); w.u32(0)
            let reply = try c.feature(DeviceFeature.dmaLoggingStart, flags: DeviceFeature.set, data: w.bytes)
            var r = WireReader(reply, context: "DMA_LOGGING_START reply")
            XCTAssertEqual(try r.u64(), 8192, "the running page size is returned")
            try c.stopDMALogging()
            XCTAssertThrowsError(try c.dmaLoggingReport(iova: iovaA, length: 1 << 20, pageSize: 4096), "REPORT after STOP")
        }
    }

    func testUnmapWithDirtyBitmapReturnsTheRangesBits() throws {
        try withDevice { c, _ in
            try c.startDMALogging(pageSize: 4096, ranges: [(iovaA, 2 << 20)])
            try runJob(c, source: DMAEngine.deviceMemoryBase, destination: iovaB + 7 * 4096, count: 4096, toRAM: true)
            let bits = try XCTUnwrap(try c.unmapDMA(iova: iovaB, size: 1 << 20, dirtyPageSize: 4096))
            XCTAssertEqual(pages(bits), [7])
            XCTAssertEqual(bits.count, 4, "256 pages → 4 words")
        }
    }

    func testPinnedPagesModeReportsEveryMappedPage() throws {
        try withDevice(.pinnedPages) { c, _ in
            try c.startDMALogging(pageSize: 4096, ranges: [(iovaA, 2 << 20)])
            XCTAssertEqual(pages(try c.dmaLoggingReport(iova: iovaA, length: 1 << 20, pageSize: 4096)).count, 256)
            XCTAssertEqual(pages(try c.dmaLoggingReport(iova: iovaA, length: 1 << 20, pageSize: 4096)).count, 256, "always all dirty")
        }
    }

    func testMessageBasedWritesAreLoggedByTheClient() throws {
        try withDevice(fds: false) { c, _ in
            try c.startDMALogging(pageSize: 4096, ranges: [(iovaA, 2 << 20)])
            try runJob(c, source: DMAEngine.deviceMemoryBase, destination: iovaA + 40 * 4096, count: 4096, toRAM: true)
            XCTAssertGreaterThan(c.dmaMessagesServed, 0)
            XCTAssertEqual(pages(try c.dmaLoggingReport(iova: iovaA, length: 1 << 20, pageSize: 4096)), [40])
        }
    }

    func testSeedEraDirtyPagesCommand() throws {
        try withDevice { c, _ in
            _ = try c.call(.dirtyPages, DirtyPagesRequest(flags: DirtyPagesRequest.start).encode())
            try runJob(c, source: DMAEngine.deviceMemoryBase, destination: iovaA + 4096, count: 4096, toRAM: true)
            let req = DirtyPagesRequest(argsz: 48 + 32, flags: DirtyPagesRequest.getBitmap, range: (iovaA, 1 << 20, 4096, 32))
            let r = try c.call(.dirtyPages, req.encode())
            XCTAssertEqual(r.payload.count, 48 + 32)
            XCTAssertEqual(pages([UInt64](littleEndianBitmap: r.payload[48...])), [1])
            _ = try c.call(.dirtyPages, DirtyPagesRequest(flags: DirtyPagesRequest.stop).encode())
        }
    }
}
