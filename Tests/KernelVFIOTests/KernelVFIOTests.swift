import CVFIOLive
import Foundation
import Glibc
@testable import KernelVFIO
@testable import LiveUpdate
import Machine
import SystemCalls
import VFIO
import XCTest

/// Kernel VFIO against a real kernel and a real IOMMU: run inside the lab guest by
/// scripts/lab.sh, behind intel-iommu, against QEMU's edu device (QEMU 7.2) or against our own
/// dma-engine, served on the host over vfio-user and realized by QEMU 11.1's vfio-user-pci
/// (an edu superset with the same ids: every test runs on both). Elsewhere every test skips
/// and says why.
final class KernelVFIOTests: XCTestCase {
    var edu: PCIDevice!
    let ramSize: UInt64 = 16 << 20

    override func setUpWithError() throws {
        guard access("/dev/vfio/vfio", F_OK) == 0 else {
            throw XCTSkip("no /dev/vfio/vfio on this kernel: these tests run in the lab guest (bash scripts/lab.sh)")
        }
        guard let d = PCIDevice.find(vendor: Edu.vendor, device: Edu.device).first else {
            throw XCTSkip("no edu device (1234:11e8): start QEMU with -device edu (bash scripts/lab.sh does)")
        }
        try d.bindToVFIOPCI()
        edu = d
    }

    static var binary: String { ChildProcess.besideCurrentExecutable("vfio-live") }

    /// A legacy container with the edu device's group, guest RAM (a memfd) mapped at IOVA 0.
    func legacySetup() throws -> (Container, Group, Edu, GuestMemory) {
        guard let g = edu.iommuGroup else { throw XCTSkip("\(edu!) has no IOMMU group") }
        let container = try Container()
        XCTAssertFalse(container.checkExtension(VFIO_UPDATE_VADDR), "UPDATE_VADDR is reported only once an IOMMU is set")
        let group = try Group(id: g)
        XCTAssertTrue(group.isViable)
        try group.setContainer(container)
        try container.setIOMMU()
        XCTAssertTrue(container.checkExtension(VFIO_UPDATE_VADDR))
        XCTAssertTrue(container.checkExtension(VFIO_UNMAP_ALL))
        XCTAssertNil(container.liveUpdateBlocker)
        let ram = try GuestMemory(size: ramSize)
        try container.mapDMA(iova: 0, size: ramSize, vaddr: ram.base)
        let device = try group.device(edu.address)
        XCTAssertGreaterThanOrEqual(try device.info().regions, 1)
        let e = try Edu(device)
        XCTAssertTrue(try e.isAlive())
        return (container, group, e, ram)
    }

    /// Bytes per edu DMA (below its buffer's last byte: see Edu.dma).
    let n = 2048

    func fill(_ ram: GuestMemory, at off: Int, seed: UInt8) {
        for i in 0..<n { ram.base.storeBytes(of: UInt8(truncatingIfNeeded: i &* 7 &+ Int(seed)), toByteOffset: off + i, as: UInt8.self) }
    }
    func bytes(_ ram: GuestMemory, at off: Int) -> [UInt8] { Array(UnsafeRawBufferPointer(start: ram.base + off, count: n)) }

    /// Guest RAM → edu → guest RAM through the IOMMU; the bytes land in the memfd.
    func testLegacyContainerDMALandsInMemfdGuestRAM() throws {
        let (_, _, e, ram) = try legacySetup()
        fill(ram, at: 0x1000, seed: 3)
        try e.dma(iova: 0x1000, count: UInt64(n), toRAM: false)
        try e.dma(iova: 0x8000, count: UInt64(n), toRAM: true)
        XCTAssertEqual(bytes(ram, at: 0x8000), bytes(ram, at: 0x1000))
        XCTAssertNotEqual(bytes(ram, at: 0x8000), [UInt8](repeating: 0, count: n))
        // The same bytes through a second mapping of the memfd: it is the memfd that holds them.
        let view = try MappedRegion(fd: ram.fd, length: Int(ramSize))
        XCTAssertEqual(Array(UnsafeRawBufferPointer(start: view.base + 0x8000, count: n)), bytes(ram, at: 0x1000))
    }

    /// The device is our dma-engine rather than QEMU's edu: both answer identification
    /// 0x010000ed, but only dma-engine has the memory-size and data-window registers (edu reads
    /// all ones there).
    func isDMAEngine(_ e: Edu) throws -> Bool {
        let size = try e.device.read(e.bar0, 0x110, as: UInt64.self)
        let window = try e.device.read(e.bar0, 0x118, as: UInt64.self)
        return size >= 128 << 10 && size <= 1 << 32 && window == size - 65536
    }

    /// dma-engine only (edu's buffer is 4 KiB): a 1 MiB job each way between guest RAM and device
    /// memory, each ending in MSI. Through QEMU 11.1 every byte goes from the guest's vfio-pci
    /// through intel-iommu and QEMU's vfio-user client to our server, and back into guest RAM
    /// (by the DMA_MAP fd with shared guest RAM, by DMA_READ/WRITE messages without).
    func testDMAEngineMovesAMebibyteEachWayWithMSIThroughQEMUsVFIOUserClient() throws {
        let (_, _, e, ram) = try legacySetup()
        guard try isDMAEngine(e) else { throw XCTSkip("QEMU's edu has a 4 KiB buffer: this test is for dma-engine (bash scripts/lab.sh dma-engine-shared)") }
        let size = 1 << 20
        for i in 0..<size { ram.base.storeBytes(of: UInt8(truncatingIfNeeded: (i >> 12) &* 31 &+ i &* 7), toByteOffset: 0x10_0000 + i, as: UInt8.self) }
        let msi = try EventFD(nonBlocking: true)
        try e.device.setIRQs(index: 1, eventfds: [msi])
        defer { try? e.device.disableIRQs(index: 1) }
        func job(from: UInt64, to: UInt64, toRAM: Bool) throws {
            try e.device.write(e.bar0, 0x80, from)
            try e.device.write(e.bar0, 0x88, to)
            try e.device.write(e.bar0, 0x90, UInt64(size))
            try e.device.write(e.bar0, 0x98, UInt64(1 | 4 | (toRAM ? 2 : 0)))  // start, interrupt when done
            XCTAssertTrue(try Poll.waitReadable(msi.fd, timeoutMilliseconds: 60_000), "the job's MSI reached the eventfd")
            _ = try msi.consume()
            try e.acknowledgeInterrupt(0x100)
            XCTAssertEqual(try e.device.read(e.bar0, 0x98, as: UInt64.self) & 1, 0, "the engine is idle after its interrupt")
        }
        try job(from: 0x10_0000, to: Edu.buffer, toRAM: false)
        try job(from: Edu.buffer, to: 0x40_0000, toRAM: true)
        XCTAssertTrue(memcmp(ram.base + 0x10_0000, ram.base + 0x40_0000, size) == 0, "1 MiB went to the device and came back intact")
        XCTAssertEqual(try e.device.read(e.bar0, 0x108, as: UInt32.self), 0, "last job status: success")
    }

    /// MSI through an eventfd (VFIO_DEVICE_SET_IRQS), then off again; the device's reset.
    func testMSIArrivesOnTheEventfd() throws {
        let (_, _, e, _) = try legacySetup()
        XCTAssertGreaterThanOrEqual(try e.device.irqCount(1), 1, "edu has an MSI vector")
        let msi = try EventFD(nonBlocking: true)
        try e.device.setIRQs(index: 1, eventfds: [msi])
        try e.raiseInterrupt()
        XCTAssertTrue(try Poll.waitReadable(msi.fd, timeoutMilliseconds: 10_000), "the MSI reached the eventfd")
        XCTAssertEqual(try msi.consume(), 1)
        try e.acknowledgeInterrupt()
        try e.device.disableIRQs(index: 1)
        try e.raiseInterrupt()
        XCTAssertFalse(try Poll.waitReadable(msi.fd, timeoutMilliseconds: 300), "no signal once MSI is off")
        try e.acknowledgeInterrupt()
        // edu has no function-level reset: VFIO says so in the device flags, and refuses.
        if try e.device.info().flags & VFIO_DEVICE_FLAGS_RESET != 0 { XCTAssertNoThrow(try e.device.reset()) } else {
            XCTAssertThrowsError(try e.device.reset()) { err in XCTAssertTrue("\(err)".contains("VFIO_DEVICE_RESET"), "\(err)") }
        }
        XCTAssertTrue(try e.isAlive())
    }

    /// type1 dirty tracking: with a device that cannot report its own writes, every mapped
    /// page is dirty; unmap can return the bitmap too.
    func testDirtyPagesReportEveryMappedPage() throws {
        let (container, _, e, _) = try legacySetup()
        XCTAssertTrue(container.supportsDirtyPageTracking())
        XCTAssertFalse(e.device.supportsDMALogging, "edu has no DMA logging")
        XCTAssertEqual(try DirtyTrackingMethod.choose(deviceLogging: [e.device.supportsDMALogging], iommuDirtyTracking: container.supportsDirtyPageTracking(),
                                                      allowUntracked: false), .iommu, "type1 tracks for the device")
        XCTAssertNil(try e.device.migrationCapabilities(), "edu has no migration driver")
        try container.startDirtyTracking()
        try e.dma(iova: 0x8000, count: UInt64(n), toRAM: true)
        let bits = try container.dirtyBitmap(iova: 0, size: ramSize)
        let pages = Int(ramSize / 4096)
        XCTAssertEqual(bits.reduce(0) { $0 + $1.nonzeroBitCount }, pages, "all \(pages) pinned pages are reported dirty")
        let onUnmap = try container.unmapDMA(iova: 0, size: ramSize, dirtyPageSize: 4096)
        XCTAssertEqual(onUnmap.count, bits.count)
        try container.stopDirtyTracking()
        XCTAssertTrue(container.mappings.isEmpty)
    }

    /// Live-update semantics of the legacy container in one process: with the addresses
    /// invalidated the device still DMAs; a second mapping of the memfd (a new process's view)
    /// takes over the addresses; an UNMAP_ALL of addresses already invalid is refused.
    func testVADDRInvalidateKeepsDMAAndRestoreTakesANewAddress() throws {
        let (container, _, e, ram) = try legacySetup()
        fill(ram, at: 0x1000, seed: 9)
        try e.dma(iova: 0x1000, count: UInt64(n), toRAM: false)
        try container.invalidateVirtualAddresses()
        try e.dma(iova: 0x3000, count: UInt64(n), toRAM: true)
        XCTAssertEqual(bytes(ram, at: 0x3000), bytes(ram, at: 0x1000), "DMA goes on while the addresses are invalid")
        XCTAssertThrowsError(try container.invalidateVirtualAddresses(), "already invalid")
        let view = try MappedRegion(fd: ram.fd, length: Int(ramSize))
        XCTAssertTrue(container.restoreVirtualAddresses { _ in view.base }.isEmpty)
        XCTAssertEqual(container.mappings.first?.vaddr, UInt64(UInt(bitPattern: view.base)))
        XCTAssertNoThrow(try container.invalidateVirtualAddresses(), "valid again, so it can be invalidated again")
        XCTAssertTrue(container.restoreVirtualAddresses { _ in ram.base }.isEmpty)
        try e.dma(iova: 0x5000, count: UInt64(n), toRAM: true)
        XCTAssertEqual(bytes(ram, at: 0x5000), bytes(ram, at: 0x1000))
    }

    /// Start `vfio-live lab take-over` (the new VMM) on a fresh cpr socket.
    /// (posix_spawn, not Foundation's Process: the lab guest is a bare initramfs.)
    func startSuccessor(backend: String, iova: UInt64, fault: String? = nil) throws -> (pid_t, String) {
        guard access(Self.binary, X_OK) == 0 else { throw XCTSkip("vfio-live is not built at \(Self.binary)") }
        let path = "/tmp/vfio-live-lab-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).cpr"
        let pid = try ChildProcess.spawn(Self.binary, [Self.binary, "lab", "take-over", "--cpr", path, "--backend", backend, "--iova", "\(iova)", "--count", "\(n)"],
                                         extraEnvironment: fault.map { ["VFIO_LIVE_CPR_FAULT=\($0)"] } ?? [])
        let deadline = monotonicNanoseconds() + 120_000_000_000
        while access(path, F_OK) != 0 && monotonicNanoseconds() < deadline && ChildProcess.exitStatus(pid) == nil { usleep(10_000) }
        return (pid, path)
    }

    /// cpr-transfer of a process holding the edu device through a legacy container: the state
    /// goes to a second process, which restores the addresses (VFIO_DMA_MAP_FLAG_VADDR) and has
    /// the device DMA into guest RAM; the bytes land in the memfd both processes share. A first
    /// attempt whose successor dies after receiving the state is rolled back: addresses
    /// restored, DMA working, and the second attempt (which UNMAP_ALL would refuse if any
    /// address had stayed invalid) succeeds.
    func testLiveUpdateOfAProcessHoldingEduThroughALegacyContainer() throws {
        let (container, group, e, ram) = try legacySetup()
        fill(ram, at: 0x1000, seed: 42)
        try e.dma(iova: 0x1000, count: UInt64(n), toRAM: false)
        let cpr = LegacyContainerCPR(container: container, group: group, device: e.device, memoryBase: ram.base, memorySize: ram.size)
        XCTAssertNil(cpr.cprBlocker())

        func handover(fault: String?) throws -> Result<String, Error> {
            let (p, path) = try startSuccessor(backend: "legacy", iova: 0x9000, fault: fault)
            defer { reap(p) }
            var state = CPRState()
            state.save(CPRNames.guestRAM, ram.fd)
            try cpr.cprSave(into: &state)
            let s = try UnixSocket.connect(path: path)
            defer { s.close() }
            try cpr.cprFreeze()
            // The device keeps DMAing while no process holds valid addresses.
            try e.dma(iova: 0x2000, count: UInt64(n), toRAM: true)
            XCTAssertEqual(bytes(ram, at: 0x2000), bytes(ram, at: 0x1000))
            try state.send(over: s)
            do { return .success(try CPRMessage.expect(.done, from: s, timeoutMilliseconds: 60_000)) } catch {
                cpr.cprThaw()
                return .failure(error)
            }
        }

        if case .success = try handover(fault: "after-state") { XCTFail("the successor was told to die") }
        try e.dma(iova: 0x4000, count: UInt64(n), toRAM: true)
        XCTAssertEqual(bytes(ram, at: 0x4000), bytes(ram, at: 0x1000), "rolled back: the old process drives the device")

        switch try handover(fault: nil) {
        case let .success(text):
            let expected = Checksum.of(UnsafeRawBufferPointer(start: ram.base + 0x1000, count: n))
            XCTAssertTrue(text.contains("\"checksum\":\(expected)"), text)
            XCTAssertEqual(bytes(ram, at: 0x9000), bytes(ram, at: 0x1000), "the new process's DMA landed in guest RAM")
        case let .failure(error):
            XCTFail("handover failed: \(error)")
        }
    }

    /// Wait for a successor to end; if it does not within 20 s, say where it is stuck and kill it.
    func reap(_ pid: pid_t) {
        let deadline = monotonicNanoseconds() + 20_000_000_000
        while ChildProcess.exitStatus(pid) == nil {
            guard monotonicNanoseconds() < deadline else {
                let info = ["status", "wchan", "stack"].map { f -> String in
                    guard let h = fopen("/proc/\(pid)/\(f)", "r") else { return "" }
                    defer { fclose(h) }
                    var buf = [CChar](repeating: 0, count: 8192)
                    let n = fread(&buf, 1, buf.count - 1, h)
                    return String(decoding: buf[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
                }.joined(separator: "\n")
                XCTFail("successor \(pid) did not exit: \(info)")
                kill(pid, SIGKILL)
                ChildProcess.wait(pid)
                return
            }
            usleep(10_000)
        }
    }

    /// A freeze that fails after invalidating (as a partial UNMAP_ALL would) is recovered.
    func testRecoveryAfterAFailedFreeze() throws {
        let (container, group, e, ram) = try legacySetup()
        let cpr = LegacyContainerCPR(container: container, group: group, device: e.device, memoryBase: ram.base, memorySize: ram.size)
        cpr.failFreezeForTesting = true
        XCTAssertThrowsError(try cpr.cprFreeze())
        cpr.cprThaw()
        XCTAssertNoThrow(try container.invalidateVirtualAddresses(), "every address was restored")
        XCTAssertTrue(container.restoreVirtualAddresses { _ in ram.base }.isEmpty)
    }

    /// iommufd with the device cdev: IOAS, bind, attach, MAP_FILE of the memfd, DMA; then the
    /// iommufd and the device go to a second process, which calls CHANGE_PROCESS and DMAs.
    func testIOMMUFDMapFileAndChangeProcess() throws {
        guard access("/dev/iommu", F_OK) == 0 else { throw XCTSkip("no /dev/iommu (IOMMUFD is not in this kernel)") }
        guard let cdevPath = edu.cdev else { throw XCTSkip("\(edu!) has no VFIO device cdev (VFIO_DEVICE_CDEV is not in this kernel)") }
        let iommufd = try IOMMUFD()
        let ioas = try iommufd.allocateIOAS()
        let raw = open(cdevPath, O_RDWR | O_CLOEXEC)
        XCTAssertGreaterThanOrEqual(raw, 0, "open \(cdevPath): \(Errno.current)")
        let device = KernelDevice(name: edu.address, fd: FileDescriptor(adopting: raw))
        let devid = try device.bind(iommufd)
        let hwpt = try device.attach(pageTable: ioas)
        let ram = try GuestMemory(size: ramSize)
        try iommufd.mapFile(ioas: ioas, iova: 0, length: ramSize, file: ram.fd)
        let e = try Edu(device)
        fill(ram, at: 0x1000, seed: 77)
        try e.dma(iova: 0x1000, count: UInt64(n), toRAM: false)
        try e.dma(iova: 0x6000, count: UInt64(n), toRAM: true)
        XCTAssertEqual(bytes(ram, at: 0x6000), bytes(ram, at: 0x1000))
        let hwDirty = iommufd.supportsDirtyTracking(deviceID: devid, ioas: ioas)
        XCTAssertFalse(hwDirty, "QEMU's intel-iommu (7.2, and 11.1 as the lab runs it) has no dirty bit")
        XCTAssertThrowsError(try DirtyTrackingMethod.choose(deviceLogging: [device.supportsDMALogging], iommuDirtyTracking: hwDirty, allowUntracked: false)) { e in
            XCTAssertTrue("\(e)".contains("migration blocked"), "\(e)")
        }
        XCTAssertEqual(try DirtyTrackingMethod.choose(deviceLogging: [false], iommuDirtyTracking: hwDirty, allowUntracked: true), .allDirty)
        let cpr = IOMMUFDCPR(iommufd: iommufd, device: device, deviceID: devid, ioasID: ioas, hwptID: hwpt)
        XCTAssertNil(cpr.cprBlocker(), "CHANGE_PROCESS is supported")

        let (p, path) = try startSuccessor(backend: "iommufd", iova: 0xa000)
        defer { ChildProcess.wait(p) }
        var state = CPRState()
        state.save(CPRNames.guestRAM, ram.fd)
        try cpr.cprSave(into: &state)
        let s = try UnixSocket.connect(path: path)
        defer { s.close() }
        try state.send(over: s)
        let text = try CPRMessage.expect(.done, from: s, timeoutMilliseconds: 120_000)
        XCTAssertTrue(text.contains("checksum"), text)
        XCTAssertEqual(bytes(ram, at: 0xa000), bytes(ram, at: 0x1000), "DMA by the new process, through file mappings it took over")
    }
}
