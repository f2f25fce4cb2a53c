import Glibc
import XCTest
@testable import Devices
import SystemCalls
import VFIO
@testable import VFIOUser

final class DMAEngineJobTests: XCTestCase {
    func testIdentificationLivenessAndFactorial() throws {
        let s = try RunningServer()
        defer { s.stop() }
        let c = try VFIOUserClient(path: s.path)
        defer { c.close() }
        XCTAssertEqual(try c.read32(0, DMAEngine.Reg.identification), DMAEngine.identificationValue)
        try c.write32(0, DMAEngine.Reg.liveness, 0x1234_5678)
        XCTAssertEqual(try c.read32(0, DMAEngine.Reg.liveness), ~UInt32(0x1234_5678))
        try c.write32(0, DMAEngine.Reg.factorial, 10)
        XCTAssertEqual(try c.read32(0, DMAEngine.Reg.factorial), 3_628_800)
        // Config space: edu's ids, BAR sizing.
        let ids = try c.read32(7, 0)
        XCTAssertEqual(ids, 0x11e8_1234)
        try c.write32(7, 0x10, 0xffff_ffff)
        XCTAssertEqual(try c.read32(7, 0x10), ~UInt32(DMAEngine.bar0Size - 1))
    }

    func testDMAJobBothDirectionsWithMSI() throws {
        let s = try RunningServer(stateSize: 1 << 20)
        defer { s.stop() }
        let c = try VFIOUserClient(path: s.path)
        defer { c.close() }
        let ram = try GuestRAM(size: 4 << 20)
        try c.mapDMA(iova: 0x1000_0000, size: ram.size, local: ram.map.base, fd: ram.fd)
        let msi = try EventFD()
        try c.setIRQs(index: 1, eventfds: [msi])
        try c.write32(7, 0x40, 0x0081_0005)  // enable MSI in config space
        let count = 300 * 1024 + 123  // not a multiple of the 64 KiB step
        ram.fill(offset: 0x1000, count: count, seed: 7)
        try runJob(c, source: 0x1000_1000, destination: DMAEngine.deviceMemoryBase + 0x100, count: UInt64(count), toRAM: false, irq: msi)
        XCTAssertEqual(try c.read64(0, DMAEngine.Reg.lastJobStatus), 0)
        // Device memory seen through the read-only mmap view (BAR4) and through BAR2 messages.
        let view = try XCTUnwrap(try c.mapRegion(4))
        let p = try XCTUnwrap(view.pointer(offset: 0x100, count: count))
        XCTAssertEqual(Array(UnsafeRawBufferPointer(start: p, count: count)), ram.bytes(offset: 0x1000, count: count))
        XCTAssertEqual(try c.regionRead(2, offset: 0x100, count: 4096), ram.bytes(offset: 0x1000, count: 4096))
        // And back into a different place of guest RAM.
        try runJob(c, source: DMAEngine.deviceMemoryBase + 0x100, destination: 0x1020_0000, count: UInt64(count), toRAM: true, irq: msi)
        XCTAssertEqual(ram.bytes(offset: 0x20_0000, count: count), ram.bytes(offset: 0x1000, count: count))
        XCTAssertEqual(try c.read64(0, DMAEngine.Reg.jobsCompleted), 2)
    }

    func testDMAOutsideMappedRangeFailsTheJobNotTheServer() throws {
        let s = try RunningServer()
        defer { s.stop() }
        let c = try VFIOUserClient(path: s.path)
        defer { c.close() }
        let ram = try GuestRAM(size: 1 << 20)
        try c.mapDMA(iova: 0x10_0000, size: ram.size, local: ram.map.base, fd: ram.fd)
        // The job's RAM range runs 4 KiB past the end of the mapping.
        try runJob(c, source: 0x10_0000 + ram.size - 8192, destination: DMAEngine.deviceMemoryBase, count: 12288, toRAM: false)
        XCTAssertEqual(try c.read64(0, DMAEngine.Reg.lastJobStatus), UInt64(EFAULT))
        // Server still serves.
        XCTAssertEqual(try c.read32(0, DMAEngine.Reg.identification), DMAEngine.identificationValue)
    }

    func testMessageBasedDMAOverTwinSocketAndMainSocket() throws {
        for twin in [true, false] {
            let s = try RunningServer()
            defer { s.stop() }
            var o = VFIOUserClient.Options()
            o.offerTwinSocket = twin
            let c = try VFIOUserClient(path: s.path, options: o)
            defer { c.close() }
            XCTAssertEqual(c.twinSocketActive, twin)
            let ram = try GuestRAM(size: 1 << 20)
            // No fd: the server must use DMA_READ / DMA_WRITE messages that we serve.
            try c.mapDMA(iova: 0x4000_0000, size: ram.size, local: ram.map.base, fd: nil)
            ram.fill(offset: 0, count: 200_000, seed: 3)
            try runJob(c, source: 0x4000_0000, destination: DMAEngine.deviceMemoryBase, count: 200_000, toRAM: false)
            try runJob(c, source: DMAEngine.deviceMemoryBase, destination: 0x4008_0000, count: 200_000, toRAM: true)
            XCTAssertEqual(ram.bytes(offset: 0x8_0000, count: 200_000), ram.bytes(offset: 0, count: 200_000), "twin=\(twin)")
            XCTAssertGreaterThan(c.dmaMessagesServed, 0)
        }
    }
}
