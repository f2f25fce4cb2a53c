import Glibc
import XCTest
@testable import Devices
import SystemCalls
import VFIO
@testable import VFIOUser

/// The device layout QEMU's vfio-pci (and so QEMU 11.1's vfio-user-pci) expects: the kernel
/// vfio-pci's. QEMU refused our server with "unexpected number of irqs 2" (issue 14).
final class PCILayoutTests: XCTestCase {
    var server: RunningServer!
    override func setUpWithError() throws { server = try RunningServer(stateSize: 1 << 20, name: "pci-layout") }
    override func tearDown() { server.stop() }

    func assertError(_ m: Message, _ e: Errno, file: StaticString = #filePath, line: UInt = #line) {
        XCTAssertTrue(m.header.isReply && m.header.isError, "expected an error reply", file: file, line: line)
        XCTAssertEqual(m.header.errorNumber, UInt32(e.rawValue), "errno", file: file, line: line)
    }

    /// QEMU's vfio-pci: five IRQ indexes as the kernel reports them (INTx, MSI, MSI-X, ERR, REQ),
    /// count 0 for those the dma-engine lacks, flags EVENTFD|NORESIZE as the kernel gives them.
    func testFiveIRQIndexesAsKernelVFIOPCIReportsThem() throws {
        let c = try VFIOUserClient(path: server.path); defer { c.close() }
        let info = try c.deviceInfo()
        XCTAssertEqual(info.irqCount, 5, "num_irqs as vfio-pci has it")
        XCTAssertNotEqual(info.flags & DeviceInfo.flagPCI, 0)
        let irqs = try (0..<5).map { try c.irqInfo(UInt32($0)) }
        XCTAssertEqual(irqs.map(\.index), [0, 1, 2, 3, 4])
        XCTAssertEqual(irqs.map(\.count), [1, 1, 0, 0, 0], "INTx and MSI have one vector; MSI-X, ERR, REQ none")
        for q in irqs[2...] { XCTAssertEqual(q.flags, [.eventfd, .noresize], "index \(q.index)") }
        XCTAssertThrowsError(try c.irqInfo(5), "there is no sixth index")
    }

    /// SET_IRQS on an index with no vectors: eventfds, masks and BOOL triggers are refused
    /// (EINVAL) and their fds closed; the spec's index-wide disable is accepted.
    func testSetIRQsOnCountZeroIndexRefusedExceptDisable() throws {
        let p = try RawPeer(path: server.path); defer { p.close() }
        let before = openFDCount()
        for index: UInt32 in [2, 3, 4] {
            do {
                let e = try EventFD()
                assertError(try p.call(.deviceSetIRQs, SetIRQsRequest(flags: [.dataEventFD, .actionTrigger], index: index, start: 0, count: 1).encode(), fds: [e.fd.rawValue]), .EINVAL)
            }
            assertError(try p.call(.deviceSetIRQs, SetIRQsRequest(flags: [.dataNone, .actionMask], index: index, start: 0, count: 0).encode()), .EINVAL)
            assertError(try p.call(.deviceSetIRQs, SetIRQsRequest(flags: [.dataNone, .actionTrigger], index: index, start: 0, count: 1).encode()), .EINVAL)
            let off = try p.call(.deviceSetIRQs, SetIRQsRequest(flags: [.dataNone, .actionTrigger], index: index, start: 0, count: 0).encode())
            XCTAssertFalse(off.header.isError, "DATA_NONE|TRIGGER count 0 (disable) on index \(index)")
        }
        XCTAssertFalse(server.server.irqs.hasTrigger(index: 2))
        XCTAssertLessThanOrEqual(openFDCount(), before, "refused eventfds were closed")
    }

    /// Regions: at least the nine fixed vfio-pci indexes, config (7) 256 bytes, VGA (8) and the
    /// unused BARs and ROM answered with size 0, the v1 migration region at 9.
    func testRegionLayoutAsVFIOPCI() throws {
        let c = try VFIOUserClient(path: server.path); defer { c.close() }
        let info = try c.deviceInfo()
        XCTAssertGreaterThanOrEqual(info.regionCount, 9)
        XCTAssertEqual(try c.regionInfo(7).info.size, 256, "config space")
        XCTAssertEqual(try c.regionInfo(0).info.size, DMAEngine.bar0Size)
        for i: UInt32 in [1, 3, 5, 6, 8] {
            let r = try c.regionInfo(i).info
            XCTAssertEqual(r.size, 0, "region \(i) absent"); XCTAssertEqual(r.flags, [], "region \(i)")
        }
        let v1 = try c.regionInfo(9).info
        XCTAssertEqual(v1.type?.type, 3); XCTAssertEqual(v1.type?.subtype, 1)
    }

    /// Our own client (as MicroVM connects: MSI on index 1) still gets its interrupt.
    func testOwnClientMSIStillWorks() throws {
        let ram = try GuestRAM(size: 1 << 20)
        let c = try VFIOUserClient(path: server.path); defer { c.close() }
        try c.mapDMA(iova: 0x10_0000, size: ram.size, local: ram.map.base, fd: ram.fd)
        let msi = try EventFD()
        try c.setIRQs(index: 1, eventfds: [msi])
        // Enable MSI in config space, as the guest driver would.
        let cap = PCIConfigSpace.msiCapabilityOffset
        XCTAssertEqual(try c.regionRead(7, offset: UInt64(cap), count: 1), [0x05], "MSI capability")
        let ctl = try c.regionRead(7, offset: UInt64(cap + 2), count: 2)
        try c.regionWrite(7, offset: UInt64(cap + 2), [ctl[0] | 1, ctl[1]])
        ram.fill(offset: 0, count: 4096, seed: 3)
        try runJob(c, source: 0x10_0000, destination: DMAEngine.deviceMemoryBase, count: 4096, toRAM: false, irq: msi)
        XCTAssertEqual(try c.read64(0, DMAEngine.Reg.lastJobStatus), 0)
        try c.disableIRQs(index: 1)
    }
}
