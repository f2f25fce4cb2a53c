import CVFIOLive
import KernelVFIO
import SystemCalls

/// Test-only: the IOMMUFD_TEST mock domain (a kernel with CONFIG_IOMMUFD_TEST; the lab's has
/// it). IOMMU_TEST_CMD creates mock devices behind a mock IOMMU whose HWPTs have a dirty bit,
/// and IOMMU_TEST_OP_DIRTY plays the hardware that sets it. Facts from the kernel's
/// drivers/iommu/iommufd/iommufd_test.h and its selftest (fixture iommufd_dirty_tracking).
struct MockDevice {
    /// The selftest object (IOMMU_DESTROY removes the device).
    var stdevID: UInt32
    /// The page table the kernel attached it to.
    var hwptID: UInt32
    /// Its iommufd device id: what HWPT_ALLOC and GET_HW_INFO take.
    var idevID: UInt32
}

extension IOMMUFD {
    private func testCommand(_ c: inout iommu_test_cmd, _ what: String) throws {
        c.size = UInt32(MemoryLayout<iommu_test_cmd>.size)
        do { _ = try fd.ioctl(VL_IOMMU_TEST_CMD, &c) } catch let e as Errno { throw KernelVFIOError.ioctl("IOMMU_TEST_CMD(\(what))", e) }
    }

    /// A mock device attached to `pageTable` (an IOAS or a HWPT), with MOCK_FLAGS_DEVICE_* `flags`.
    func mockDevice(on pageTable: UInt32, flags: UInt32 = 0) throws -> MockDevice {
        var c = iommu_test_cmd()
        c.id = pageTable
        if flags == 0 {
            c.op = IOMMU_TEST_OP_MOCK_DOMAIN
            try testCommand(&c, "MOCK_DOMAIN on \(pageTable)")
            return MockDevice(stdevID: c.u.mock_domain.out_stdev_id, hwptID: c.u.mock_domain.out_hwpt_id, idevID: c.u.mock_domain.out_idev_id)
        }
        c.op = IOMMU_TEST_OP_MOCK_DOMAIN_FLAGS
        c.u.mock_domain_flags.dev_flags = flags
        try testCommand(&c, "MOCK_DOMAIN_FLAGS(\(flags)) on \(pageTable)")
        return MockDevice(stdevID: c.u.mock_domain_flags.out_stdev_id, hwptID: c.u.mock_domain_flags.out_hwpt_id, idevID: c.u.mock_domain_flags.out_idev_id)
    }

    /// IOMMU_TEST_OP_DIRTY: the mock IOMMU marks dirty every `pageSize` page of
    /// [iova, iova+length) whose bit is set in `bitmap`; returns how many it marked.
    func mockSetDirty(hwpt: UInt32, iova: UInt64, length: UInt64, pageSize: UInt64, bitmap: [UInt64]) throws -> UInt64 {
        precondition(UInt64(bitmap.count) * 64 >= length / pageSize, "bitmap too short")
        var b = bitmap
        return try b.withUnsafeMutableBufferPointer { w in
            var c = iommu_test_cmd()
            c.op = IOMMU_TEST_OP_DIRTY
            c.id = hwpt
            c.u.dirty.iova = iova; c.u.dirty.length = length; c.u.dirty.page_size = pageSize
            c.u.dirty.uptr = UInt64(UInt(bitPattern: w.baseAddress))
            try testCommand(&c, "DIRTY on HWPT \(hwpt)")
            return c.u.dirty.out_nr_dirty
        }
    }
}

/// Page numbers → bitmap words (bit p of word p/64), for `pages` pages.
func bitmapWords(setting bits: [Int], pages: Int) -> [UInt64] {
    var w = [UInt64](repeating: 0, count: (pages + 63) / 64)
    for b in bits { w[b / 64] |= 1 << UInt64(b % 64) }
    return w
}

/// The set bits of a bitmap, in order.
func setBits(_ words: [UInt64]) -> [Int] {
    var out: [Int] = []
    for (i, w) in words.enumerated() where w != 0 { for b in 0..<64 where w & (1 << UInt64(b)) != 0 { out.append(i * 64 + b) } }
    return out
}
