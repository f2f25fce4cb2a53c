import CVFIOLive
import Foundation
import Glibc
@testable import KernelVFIO
import SystemCalls
import VFIO
import XCTest

/// iommufd HWPT dirty tracking (issue 11 item 6e) against the lab kernel's IOMMUFD_TEST mock
/// domain, the only IOMMU with a dirty bit the lab can offer: its HWPTs run the kernel's real
/// dirty-bitmap code, and IOMMU_TEST_OP_DIRTY sets the bits a device's DMA would. The mock
/// does not depend on the lab's PCI device, so these run only in the `edu` boot.
final class HWPTDirtyTrackingTests: XCTestCase {
    /// An iommufd in the lab guest's edu boot whose kernel has the mock domain, else skip.
    func labIOMMUFD() throws -> IOMMUFD {
        let env = ProcessInfo.processInfo.environment
        guard env["VFIO_LIVE_LAB"] == "1" else { throw XCTSkip("runs in the kernel lab guest (bash scripts/lab.sh edu)") }
        guard env["VFIO_LIVE_LAB_DEVICE"] == "edu" else { throw XCTSkip("the mock domain does not depend on the lab's device: runs in the edu boot only") }
        guard access("/dev/iommu", F_OK) == 0 else { throw XCTSkip("no /dev/iommu (IOMMUFD is not in this kernel)") }
        return try IOMMUFD()
    }

    /// A mock device on a new IOAS, or skip when the kernel lacks IOMMUFD_TEST (ENOTTY).
    func mockOnNewIOAS(_ i: IOMMUFD, flags: UInt32 = 0) throws -> (ioas: UInt32, device: MockDevice) {
        let ioas = try i.allocateIOAS()
        // The selftest's choice: IO pages no larger than the CPU's, so one bit is one page.
        try i.setHugePages(ioas: ioas, false)
        do { return (ioas, try i.mockDevice(on: ioas, flags: flags)) } catch KernelVFIOError.ioctl(_, let e) where e == .ENOTTY {
            throw XCTSkip("this kernel has no IOMMUFD_TEST mock domain (IOMMU_TEST_CMD: ENOTTY)")
        }
    }

    let page: UInt64 = 4096
    let pages = 160  // three bitmap words, so word boundaries are crossed
    let iova = MOCK_APERTURE_START

    /// Start, harvest, stop through the tracker: exactly the pages the mock IOMMU marked come
    /// back dirty, once (the kernel clears what it reports), and a NO_CLEAR look leaves them.
    func testPagesTheMockIOMMUMarksAreHarvestedOnceThenClear() throws {
        let i = try labIOMMUFD()
        let (ioas, probe) = try mockOnNewIOAS(i)
        XCTAssertTrue(try i.hardwareInfo(deviceID: probe.idevID).canTrackDirtyPages, "the mock IOMMU reports IOMMU_HW_CAP_DIRTY_TRACKING")
        // The same choice a kernel device gets: a dirty-capable IOMMU puts it on a dirty-tracking HWPT.
        var attached: MockDevice?
        let a = try IOMMUFDAttachment.attach(deviceID: probe.idevID, name: "mock", iommufd: i, ioas: ioas) { pt in
            attached = try i.mockDevice(on: pt)
            return attached!.hwptID
        }
        let tracker = try XCTUnwrap(a.tracker, a.trackerUnavailable ?? "")
        XCTAssertNil(a.trackerUnavailable)
        XCTAssertEqual(a.pageTableID, tracker.hwpt.id, "the device is on the dirty-tracking HWPT, not the IOAS's automatic domain")
        XCTAssertEqual(attached?.hwptID, tracker.hwpt.id)

        let size = UInt64(pages) * page
        let buffer = try MappedRegion(anonymous: Int(size), populate: true)
        try i.map(ioas: ioas, iova: iova, length: size, vaddr: buffer.base)
        XCTAssertThrowsError(try tracker.dirtyBitmap(iova: iova, size: size, pageSize: page), "a harvest before start is refused") { e in
            guard case KernelVFIOError.invalid = e else { return XCTFail("refused by the kernel, not before the ioctl: \(e)") }
        }
        try tracker.startDirtyTracking()
        XCTAssertTrue(tracker.isTracking)
        XCTAssertEqual(setBits(try tracker.dirtyBitmap(iova: iova, size: size, pageSize: page)), [], "nothing is dirty right after start")

        // The mock IOMMU works in 2 KiB IO pages: mark the first half of each chosen CPU page.
        let dirty = [0, 1, 5, 63, 64, 100, 128, 159]
        let ioPages = Int(size / UInt64(MOCK_PAGE_SIZE))
        let marked = try i.mockSetDirty(hwpt: tracker.hwpt.id, iova: iova, length: size, pageSize: UInt64(MOCK_PAGE_SIZE),
                                        bitmap: bitmapWords(setting: dirty.map { $0 * 2 }, pages: ioPages))
        XCTAssertEqual(marked, UInt64(dirty.count))

        XCTAssertEqual(setBits(try tracker.harvest(iova: iova, size: size, pageSize: page, clear: false)), dirty, "NO_CLEAR shows them")
        // A part of the range, starting at page 64: bits are relative to its start.
        XCTAssertEqual(setBits(try tracker.harvest(iova: iova + 64 * page, size: 64 * page, pageSize: page, clear: false)), [0, 36])
        XCTAssertEqual(setBits(try tracker.dirtyBitmap(iova: iova, size: size, pageSize: page)), dirty, "exactly the marked pages, no others")
        XCTAssertEqual(setBits(try tracker.dirtyBitmap(iova: iova, size: size, pageSize: page)), [], "the harvest cleared them")

        // New marks after a harvest come back on the next one.
        _ = try i.mockSetDirty(hwpt: tracker.hwpt.id, iova: iova, length: size, pageSize: UInt64(MOCK_PAGE_SIZE),
                               bitmap: bitmapWords(setting: [7 * 2], pages: ioPages))
        XCTAssertEqual(setBits(try tracker.dirtyBitmap(iova: iova, size: size, pageSize: page)), [7])

        try tracker.stopDirtyTracking()
        XCTAssertFalse(tracker.isTracking)
        XCTAssertThrowsError(try tracker.dirtyBitmap(iova: iova, size: size, pageSize: page), "a harvest after stop is refused") { e in
            guard case KernelVFIOError.invalid = e else { return XCTFail("\(e)") }
        }
        // Start again: a clean slate, bits marked while stopped are gone (enabling clears them).
        try tracker.startDirtyTracking()
        XCTAssertEqual(setBits(try tracker.dirtyBitmap(iova: iova, size: size, pageSize: page)), [])
        try tracker.stopDirtyTracking()

        try i.unmap(ioas: ioas, iova: iova, length: size)
        try i.destroy(attached!.stdevID)
        try tracker.hwpt.destroy()
        try i.destroy(probe.stdevID)
    }

    /// A device a live update hands over keeps its HWPT dirty tracker (it had none before: the
    /// successor knew only the ids). The successor rebuilds the attachment from the CPR
    /// record's ids (devid, IOAS, HWPT) on its own copy of the iommufd descriptor, with no
    /// BIND, ATTACH or HWPT_ALLOC, and the tracker harvests what the mock IOMMU marks.
    func testAnAttachmentRebuiltFromTheCPRRecordsIdsKeepsItsHWPTDirtyTracker() throws {
        let i = try labIOMMUFD()
        let (ioas, probe) = try mockOnNewIOAS(i)
        var attached: MockDevice?
        let before = try IOMMUFDAttachment.attach(deviceID: probe.idevID, name: "mock", iommufd: i, ioas: ioas) { pt in
            attached = try i.mockDevice(on: pt)
            return attached!.hwptID
        }
        let original = try XCTUnwrap(before.tracker, before.trackerUnavailable ?? "")
        let device = try XCTUnwrap(attached)
        // What the successor holds: the iommufd descriptor as SCM_RIGHTS gives it (a new fd
        // for the same file) and the record's ids.
        let handed = IOMMUFD(adopting: try i.fd.duplicate())
        defer { handed.fd.close() }
        let after = IOMMUFDAttachment.adopted(deviceID: device.idevID, name: "mock", iommufd: handed, ioas: ioas, pageTableID: before.pageTableID)
        let tracker = try XCTUnwrap(after.tracker, after.trackerUnavailable ?? "")
        XCTAssertNil(after.trackerUnavailable)
        XCTAssertEqual(after.pageTableID, before.pageTableID)
        XCTAssertEqual(tracker.hwpt.id, original.hwpt.id, "the predecessor's HWPT, not a new one")

        let size = UInt64(pages) * page
        let buffer = try MappedRegion(anonymous: Int(size), populate: true)
        try i.map(ioas: ioas, iova: iova, length: size, vaddr: buffer.base)
        try tracker.startDirtyTracking()
        let dirty = [2, 64, 131]
        _ = try i.mockSetDirty(hwpt: tracker.hwpt.id, iova: iova, length: size, pageSize: UInt64(MOCK_PAGE_SIZE),
                               bitmap: bitmapWords(setting: dirty.map { $0 * 2 }, pages: Int(size / UInt64(MOCK_PAGE_SIZE))))
        XCTAssertEqual(setBits(try tracker.dirtyBitmap(iova: iova, size: size, pageSize: page)), dirty, "through the rebuilt tracker")
        try tracker.stopDirtyTracking()

        // A device the predecessor attached to the IOAS itself (an mdev): no tracker, and why.
        let onIOAS = IOMMUFDAttachment.adopted(deviceID: probe.idevID, name: "mdev", iommufd: handed, ioas: ioas, pageTableID: ioas)
        XCTAssertNil(onIOAS.tracker)
        XCTAssertTrue(onIOAS.trackerUnavailable?.contains("IOAS \(ioas) itself") == true, onIOAS.trackerUnavailable ?? "no reason")

        try i.unmap(ioas: ioas, iova: iova, length: size)
        try i.destroy(device.stdevID)
        try original.hwpt.destroy()
        try i.destroy(probe.stdevID)
    }

    /// Ranges the kernel would refuse, or that would size a huge bitmap, are refused by the
    /// tracker before any allocation or ioctl (`invalid`, never `ioctl`).
    func testBadHarvestRangesAreRefusedBeforeTheIoctl() throws {
        let i = try labIOMMUFD()
        let (ioas, probe) = try mockOnNewIOAS(i)
        let hwpt = try HWPT(iommufd: i, deviceID: probe.idevID, ioas: ioas, dirtyTracking: true)
        let dev = try i.mockDevice(on: hwpt.id)
        let tracker = try HWPTDirtyTracker(hwpt: hwpt)
        try tracker.startDirtyTracking()
        let bad: [(String, UInt64, UInt64, UInt64)] = [
            ("unaligned iova", iova + 512, 4 * page, page),
            ("unaligned size", iova, 4 * page + 1, page),
            ("empty", iova, 0, page),
            ("page size not a power of two", iova, 3 * 3000, 3000),
            ("page size 0", iova, 4 * page, 0),
            ("wraps past 2^64", UInt64.max - page + 1, 2 * page, page),
            ("oversized bitmap", 0, (HWPT.maxBitmapPages + 1) * page, page),
        ]
        for (what, start, size, ps) in bad {
            XCTAssertThrowsError(try tracker.dirtyBitmap(iova: start, size: size, pageSize: ps), what) { e in
                guard case KernelVFIOError.invalid = e else { return XCTFail("\(what): reached the kernel: \(e)") }
            }
        }
        // The largest range allowed still reaches the kernel, whose answer is its own.
        XCTAssertEqual(try HWPT.bitmapPages(iova: 0, size: HWPT.maxBitmapPages * page, pageSize: page), HWPT.maxBitmapPages)
        try tracker.stopDirtyTracking()
        try i.destroy(dev.stdevID)
        try hwpt.destroy()
        try i.destroy(probe.stdevID)
    }

    /// An IOMMU without a dirty bit (a mock device with MOCK_FLAGS_DEVICE_NO_DIRTY, as QEMU
    /// 7.2's intel-iommu): no capability, HWPT_ALLOC with DIRTY_TRACKING is EOPNOTSUPP, the
    /// device goes on the IOAS with the reason, and the per-device choice falls back.
    func testAnIOMMUWithoutADirtyBitGetsNoTrackerAndSaysWhy() throws {
        let i = try labIOMMUFD()
        let (ioas, probe) = try mockOnNewIOAS(i, flags: MOCK_FLAGS_DEVICE_NO_DIRTY)
        XCTAssertFalse(try i.hardwareInfo(deviceID: probe.idevID).canTrackDirtyPages)
        XCTAssertThrowsError(try HWPT(iommufd: i, deviceID: probe.idevID, ioas: ioas, dirtyTracking: true)) { e in
            guard case let KernelVFIOError.ioctl(_, errno) = e else { return XCTFail("\(e)") }
            XCTAssertEqual(errno, Errno(Glibc.EOPNOTSUPP), "the kernel's answer for an IOMMU without IOMMU_CAP_DIRTY_TRACKING")
        }
        var attached: MockDevice?
        let a = try IOMMUFDAttachment.attach(deviceID: probe.idevID, name: "mock", iommufd: i, ioas: ioas) { pt in
            attached = try i.mockDevice(on: pt, flags: MOCK_FLAGS_DEVICE_NO_DIRTY)
            return attached!.hwptID
        }
        XCTAssertNil(a.tracker)
        XCTAssertTrue(a.trackerUnavailable?.contains("IOMMU_HW_CAP_DIRTY_TRACKING") == true, a.trackerUnavailable ?? "no reason")
        XCTAssertNotEqual(a.pageTableID, ioas, "the kernel's automatic domain for the IOAS")
        XCTAssertThrowsError(try DirtyTrackingMethod.choose(deviceLogging: [false], iommuDirtyTracking: a.tracker != nil, allowUntracked: false))
        XCTAssertEqual(try DirtyTrackingMethod.choose(deviceLogging: [false], iommuDirtyTracking: a.tracker != nil, allowUntracked: true), .allDirty)
        try i.destroy(attached!.stdevID)
        try i.destroy(probe.stdevID)
    }

    /// edu behind QEMU 7.2's intel-iommu, opened as `vfio-pci,iommufd=on` would be: the IOMMU
    /// has no dirty bit, so the device offers no IOMMU tracker and says why.
    func testEduThroughIOMMUFDOffersNoTrackerAndSaysWhy() throws {
        _ = try labIOMMUFD()
        guard let edu = PCIDevice.find(vendor: Edu.vendor, device: Edu.device).first else { throw XCTSkip("no edu device (1234:11e8)") }
        try edu.bindToVFIOPCI()
        guard edu.cdev != nil else { throw XCTSkip("\(edu) has no VFIO device cdev") }
        let d = try AssignedKernelDevice.open(pciAddress: edu.address, backend: .iommufd)
        XCTAssertNil(d.iommuDirtyTracker)
        let why = try XCTUnwrap(d.iommuDirtyTrackerUnavailable)
        XCTAssertTrue(why.contains(edu.address), why)
        XCTAssertEqual(try DirtyTrackingMethod.choose(deviceLogging: [d.supportsDMALogging], iommuDirtyTracking: d.iommuDirtyTracker != nil, allowUntracked: true), .allDirty)
    }

    /// The range checks alone (no kernel needed).
    func testBitmapPagesCountsAlignedRanges() throws {
        XCTAssertEqual(try HWPT.bitmapPages(iova: 1 << 24, size: 160 * 4096, pageSize: 4096), 160)
        XCTAssertEqual(try HWPT.bitmapPages(iova: 0, size: 2048, pageSize: 2048), 1)
        XCTAssertEqual(try HWPT.bitmapPages(iova: UInt64.max - 4095, size: 4096, pageSize: 4096), 1, "the last page of the IOVA space")
        XCTAssertThrowsError(try HWPT.bitmapPages(iova: UInt64.max - 4095, size: 8192, pageSize: 4096))
        XCTAssertThrowsError(try HWPT.bitmapPages(iova: 4096, size: 4096, pageSize: 4096 * 3))
    }
}
