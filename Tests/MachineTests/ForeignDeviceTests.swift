import Devices
import Foundation
import Glibc
@testable import Machine
import SystemCalls
import VFIO
import VFIOUser
import XCTest

/// A vfio-user server the project did not write (Tests/Fixtures/foreign_vfio_user_server.py,
/// Python, written from the protocol), run as its own process.
final class ForeignServer {
    static var script: String {
        let tests = ((#filePath as NSString).deletingLastPathComponent as NSString).deletingLastPathComponent
        return (tests as NSString).appendingPathComponent("Fixtures/foreign_vfio_user_server.py")
    }
    let path: String
    let pid: pid_t

    init(_ tag: String, _ options: [String] = []) throws {
        path = "/tmp/vfio-live-foreign-\(getpid())-\(tag).sock"
        unlink(path)
        pid = try ChildProcess.spawn("/usr/bin/env", ["env", "python3", Self.script, path] + options)
        let deadline = monotonicNanoseconds() + 10_000_000_000
        while access(path, F_OK) != 0 {
            if let st = ChildProcess.exitStatus(pid) { throw XCTSkip("the foreign server exited (status \(st)): is python3 installed?") }
            guard monotonicNanoseconds() < deadline else { kill(pid, SIGKILL); _ = ChildProcess.wait(pid); throw Errno.ETIMEDOUT }
            usleep(10_000)
        }
    }

    func stop() {
        kill(pid, SIGTERM)
        _ = ChildProcess.wait(pid)
        unlink(path)
    }
}

/// PCI attach with no assumed layout (issue 11 items 2 and 7): the VMM learns config space,
/// capabilities, BARs and interrupts from the device, as QEMU's vfio-pci does.
final class ForeignDeviceTests: XCTestCase {
    override func setUp() { Log.level = .error }
    override func tearDown() { Log.level = .info }

    func workload() -> WorkloadConfig {
        var w = WorkloadConfig()
        w.workingSet = 8 << 20
        w.dmaEvery = 4  // asked for, but a device that is not edu-compatible gets no DMA rounds
        return w
    }

    func waitFor(_ what: String, _ cond: () -> Bool) {
        let deadline = monotonicNanoseconds() + 5_000_000_000
        while !cond() {
            if monotonicNanoseconds() > deadline { XCTFail("timed out waiting: \(what)"); return }
            usleep(5_000)
        }
    }

    func u32(_ b: [UInt8]) -> UInt32 { b.enumerated().reduce(UInt32(0)) { $0 | UInt32($1.element) << (8 * UInt32($1.offset)) } }
    func bytes(_ v: UInt32) -> [UInt8] { (0..<4).map { UInt8(v >> (8 * UInt32($0)) & 0xff) } }

    /// Today's regression: MSI on index 1 and a capability at 0x40 were assumed, so a device with
    /// MSI-X at 0x80 was refused (SET_IRQS EINVAL on index 1, then REGION_WRITE at 0x40).
    func testForeignMSIXDeviceAttachesAndItsRegistersAndInterruptWork() throws {
        let s = try ForeignServer("msix", ["--irq", "msix"])
        defer { s.stop() }
        let c = try VFIOUserClient(path: s.path)
        let vm = try MicroVM(memorySize: 32 << 20, workload: workload(), devices: [c])
        defer { vm.stop() }
        let d = vm.devices[0]
        let a = try XCTUnwrap(d.pci)
        XCTAssertEqual(a.vendorID, 0x1b36)
        XCTAssertEqual(a.capabilities, [PCICapability(id: 0x11, offset: 0x80), PCICapability(id: 0x10, offset: 0x48)], "the list is walked from 0x34")
        XCTAssertEqual(a.interrupt, .msix(capability: 0x80), "MSI-X preferred, as QEMU does")
        XCTAssertEqual(a.bars.map(\.index), [0])
        XCTAssertEqual(a.bars.first?.size, 4096, "sized from region info")
        XCTAssertEqual(d.bar0, GuestLayout.deviceBAR0(0))
        XCTAssertTrue(a.dmaMapped)
        XCTAssertNil(a.eduBufferSize, "not edu-compatible")
        XCTAssertEqual(try c.regionRead(7, offset: 0x83, count: 1)[0] & 0xc0, 0x80, "MSI-X enabled, function unmasked")
        XCTAssertEqual(try c.regionRead(7, offset: 4, count: 2)[0] & 0x6, 0x6, "memory decoding and bus master on")
        XCTAssertEqual(d.configStateRanges.last, 0x82..<0x84, "a migration carries the MSI-X control, not bytes at 0x40")
        XCTAssertTrue(d.device.deviceName.hasPrefix("socket fd") || d.device.deviceName == s.path, d.device.deviceName)

        try vm.start(); vm.resume()
        // Trapped BAR0 through the guest's route: scratch registers and the doorbell.
        try vm.mmioWrite(d.bar0 + 4, bytes(0xdead_beef))
        XCTAssertEqual(u32(try vm.mmioRead(d.bar0 + 4, count: 4)), 0xdead_beef)
        XCTAssertEqual(u32(try vm.mmioRead(d.bar0, count: 4)), 0xf0e1_0001, "the id register")
        try vm.mmioWrite(d.bar0 + 0x0c, bytes(1))
        waitFor("the MSI-X vector is counted") { vm.interruptsCounted[0] >= 1 }
        usleep(200_000)
        vm.pause()
        XCTAssertNil(vm.failure)
        XCTAssertGreaterThan(vm.pagesWritten, 0, "the guest runs")
        XCTAssertEqual(vm.dmaRoundsOK, 0, "no DMA rounds against a device that is not edu-compatible")
        let r = vm.verify()
        XCTAssertTrue(r.ok, r.description)
        XCTAssertThrowsError(try vm.mmioRead(d.bar0 + 4096, count: 4), "nothing past the 4 KiB BAR")
    }

    func testINTxOnlyDeviceGetsINTxAndIsUnmaskedAfterEachInterrupt() throws {
        let s = try ForeignServer("intx", ["--irq", "intx"])
        defer { s.stop() }
        let vm = try MicroVM(memorySize: 32 << 20, workload: workload(), devices: [VFIOUserClient(path: s.path)])
        defer { vm.stop() }
        let d = vm.devices[0]
        XCTAssertEqual(d.pci?.interrupt, .intx(automasked: true))
        XCTAssertEqual(d.pci?.capabilities, [PCICapability(id: 0x10, offset: 0x48)])
        try vm.startInterruptCounting()
        for n in 1...3 {
            try vm.mmioWrite(d.bar0 + 0x0c, bytes(1))
            waitFor("INTx \(n) counted") { vm.interruptsCounted[0] >= UInt64(n) }
        }
    }

    /// A refused choice falls through to the next, as vfio-pci's fallbacks do: MSI-X refused,
    /// no MSI, so INTx, and the device signals it.
    func testRefusedMSIXFallsBackToINTx() throws {
        let s = try ForeignServer("msix-refused", ["--irq", "msix", "--refuse-irq", "2"])
        defer { s.stop() }
        let c = try VFIOUserClient(path: s.path)
        let vm = try MicroVM(memorySize: 32 << 20, workload: workload(), devices: [c])
        defer { vm.stop() }
        let d = vm.devices[0]
        XCTAssertEqual(d.pci?.interrupt, .intx(automasked: true))
        XCTAssertEqual(try c.regionRead(7, offset: 0x83, count: 1)[0] & 0x80, 0, "MSI-X was not enabled")
        try vm.startInterruptCounting()
        try vm.mmioWrite(d.bar0 + 0x0c, bytes(1))
        waitFor("INTx counted") { vm.interruptsCounted[0] >= 1 }
    }

    /// Hostile config space: a capability list that loops is refused, bounded, with the reason.
    func testLoopingCapabilityListIsRefused() throws {
        let s = try ForeignServer("cap-loop", ["--irq", "msi", "--cap-loop"])
        defer { s.stop() }
        XCTAssertThrowsError(try MicroVM(memorySize: 32 << 20, workload: workload(), devices: [VFIOUserClient(path: s.path)])) { e in
            XCTAssertTrue("\(e)".contains("the capability list loops"), "\(e)")
        }
    }

    func testDeviceWithoutUsableInterruptOrDMAStillAttaches() throws {
        let s = try ForeignServer("none", ["--irq", "none", "--refuse-dma"])
        defer { s.stop() }
        let vm = try MicroVM(memorySize: 32 << 20, workload: workload(), devices: [VFIOUserClient(path: s.path)])
        defer { vm.stop() }
        let a = try XCTUnwrap(vm.devices[0].pci)
        guard case .none = a.interrupt else { return XCTFail("interrupt \(a.interrupt)") }
        XCTAssertFalse(a.dmaMapped)
        XCTAssertTrue(a.dmaRefusal?.contains("DMA_MAP") == true, a.dmaRefusal ?? "")
        try vm.start(); vm.resume()
        try vm.mmioWrite(vm.devices[0].bar0 + 8, bytes(7))
        XCTAssertEqual(u32(try vm.mmioRead(vm.devices[0].bar0 + 8, count: 4)), 7)
        usleep(100_000)
        vm.pause()
        XCTAssertNil(vm.failure)
        XCTAssertTrue(vm.verify().ok)
    }

    /// The dma-engine keeps its layout (MSI at 0x40 on index 1, BAR0 at its slot) found, not
    /// assumed; its DMA rounds are sized to its data window, its mmap'd BAR4 routed directly.
    func testDMAEngineLayoutIsDiscoveredAndItsMmapBARIsRoutedDirectly() throws {
        let server = try InProcessServer(path: InProcessServer.temporaryPath("attach-dma"), stateSize: 1 << 20, name: "attach-dma")
        defer { server.stop() }
        let c = try VFIOUserClient(path: server.path)
        var w = workload()
        w.dmaLength = 64 << 10
        let vm = try MicroVM(memorySize: 32 << 20, workload: w, devices: [c])
        defer { vm.stop() }
        let a = try XCTUnwrap(vm.devices[0].pci)
        XCTAssertTrue(a.isEduCompatible)
        XCTAssertEqual(a.interrupt, .msi(capability: 0x40))
        XCTAssertEqual(vm.devices[0].configStateRanges.last, 0x42..<0x4e, "the dma-engine's MSI control, address and data")
        XCTAssertNoThrow(try vm.devices[0].rewireInterrupt())
        XCTAssertEqual(a.eduBufferSize, (1 << 20) - (64 << 10), "the dma-engine's data window (BAR0+0x118)")
        XCTAssertEqual(vm.memory.load64(GuestLayout.controlBlock(0) + UInt64(GuestLayout.CB.dmaLength)), 64 << 10)
        XCTAssertEqual(vm.memory.load64(GuestLayout.controlBlock(0) + UInt64(GuestLayout.CB.dmaEnabled)), 1)
        XCTAssertEqual(vm.memory.load64(GuestLayout.controlBlock(0) + UInt64(GuestLayout.CB.dmaStatus)), 0x108, "the dma-engine's job status is checked")
        let bar4 = try XCTUnwrap(a.bar(4))
        XCTAssertFalse(bar4.mappableAreas.isEmpty)
        let gpa = try XCTUnwrap(bar4.guestAddress)
        // Device memory written through trapped BAR2 reads back through the mmap'd BAR4 route.
        try c.regionWrite(2, offset: 0x100, [1, 2, 3, 4])
        XCTAssertEqual(try vm.mmioRead(gpa + 0x100, count: 4), [1, 2, 3, 4])
        XCTAssertThrowsError(try vm.mmioWrite(gpa + 0x100, [9]), "BAR4 is read-only: the store is trapped and refused")
        try vm.start(); vm.resume()
        waitFor("DMA rounds") { vm.dmaRoundsOK >= 2 }
        vm.pause()
        XCTAssertTrue(vm.verify().ok)
    }

    /// The guest's DMA rounds need their edu device: an edu-compatible device that refuses
    /// DMA_MAP is an attach error when the workload DMAs, and attaches when it does not.
    func testEduDeviceRefusingDMAIsAnAttachErrorOnlyWhenTheGuestNeedsIt() throws {
        let s = try ForeignServer("edu-nodma", ["--irq", "msi", "--edu-id", "--refuse-dma"])
        defer { s.stop() }
        XCTAssertThrowsError(try MicroVM(memorySize: 32 << 20, workload: workload(), devices: [VFIOUserClient(path: s.path)])) { e in
            guard case PCIAttachError.dmaRefused = e else { return XCTFail("\(e)") }
        }
        var w = workload()
        w.dmaEvery = 0
        let vm = try MicroVM(memorySize: 32 << 20, workload: w, devices: [VFIOUserClient(path: s.path)])
        defer { vm.stop() }
        XCTAssertEqual(vm.devices[0].pci?.eduBufferSize, 4096, "edu's buffer, as the device reports no data window")
        XCTAssertNil(vm.devices[0].pci?.eduStatusRegister)
        XCTAssertEqual(vm.devices[0].pci?.eduTransferLimit, 4088, "below the last byte, which QEMU's edu refuses")
        XCTAssertEqual(vm.devices[0].pci?.dmaMapped, false)
        XCTAssertEqual(vm.memory.load64(GuestLayout.controlBlock(0) + UInt64(GuestLayout.CB.dmaEnabled)), 0)
    }

    func testMMIOAllocatorPlacesBAR0AtItsSlotAndTheRestAlignedAboveTheDoorbell() {
        var m = MMIOAllocator()
        XCTAssertEqual(m.place(slot: 3, bar: 0, size: 4096), GuestLayout.deviceBAR0(3))
        let a = m.place(slot: 0, bar: 2, size: 16 << 20)
        XCTAssertEqual(a.map { $0 % (16 << 20) }, 0)
        XCTAssertGreaterThan(a ?? 0, GuestLayout.doorbell)
        let b = m.place(slot: 0, bar: 4, size: 3000)
        XCTAssertEqual(b.map { $0 % 4096 }, 0)
        XCTAssertGreaterThanOrEqual(b ?? 0, (a ?? 0) + (16 << 20), "no overlap")
        XCTAssertNil(m.place(slot: 0, bar: 2, size: 1 << 30), "larger than the window: not placed")
    }
}
