import LiveUpdate
import Machine
import VFIO
import XCTest

/// The records a live update carries for a kernel VFIO device and for any device's attach
/// result: they come from another process, so every field is checked before it is used.
final class KernelCPRRecordTests: XCTestCase {
    let ram: UInt64 = 16 << 20

    func testLegacyAndIOMMUFDRecordsRoundTrip() throws {
        let legacy = KernelDeviceCPRRecord(name: "0000:00:03.0", backend: .legacy(group: 7, mappings: [.init(iova: 0, size: ram, ramOffset: 0, writable: true)]))
        XCTAssertEqual(try KernelDeviceCPRRecord(decoding: legacy.encode(), ramSize: ram), legacy)
        let iommufd = KernelDeviceCPRRecord(name: "83b8f4f2-509f-382f-3c1e-e6bfe0fa1001", backend: .iommufd(device: 1, ioas: 2, hwpt: 3))
        XCTAssertEqual(try KernelDeviceCPRRecord(decoding: iommufd.encode(), ramSize: ram), iommufd)
    }

    /// A mapping the record places outside guest RAM would make the new VMM attach an address
    /// it does not own (MAP with VADDR): refused, with the IOVA named.
    func testAMappingOutsideGuestRAMIsRefused() {
        for m in [KernelDeviceCPRRecord.Mapping(iova: 0, size: ram, ramOffset: 4096, writable: true),
                  .init(iova: 0, size: 4096, ramOffset: ram, writable: true),
                  .init(iova: ~0 - 100, size: 4096, ramOffset: 0, writable: true),
                  .init(iova: 0x1000, size: 0, ramOffset: 0, writable: true)] {
            let r = KernelDeviceCPRRecord(name: "0000:00:03.0", backend: .legacy(group: 7, mappings: [m]))
            XCTAssertThrowsError(try KernelDeviceCPRRecord(decoding: r.encode(), ramSize: ram)) { e in
                XCTAssertTrue("\(e)".contains("IOVA"), "\(e)")
            }
        }
    }

    /// Every truncation, a trailing byte, a device name with a path in it, an unknown backend.
    func testTruncatedOrForeignRecordsAreRefused() {
        let good = KernelDeviceCPRRecord(name: "0000:00:03.0", backend: .legacy(group: 7, mappings: [.init(iova: 0, size: 4096, ramOffset: 0, writable: true)])).encode()
        for n in 0..<good.count { XCTAssertThrowsError(try KernelDeviceCPRRecord(decoding: Array(good[..<n]), ramSize: ram), "cut at \(n)") }
        XCTAssertThrowsError(try KernelDeviceCPRRecord(decoding: good + [0], ramSize: ram))
        var backend = good; backend[4] = 9
        XCTAssertThrowsError(try KernelDeviceCPRRecord(decoding: backend, ramSize: ram)) { XCTAssertTrue("\($0)".contains("backend"), "\($0)") }
        let path = KernelDeviceCPRRecord(name: "../../dev/mem", backend: .iommufd(device: 1, ioas: 2, hwpt: 3)).encode()
        XCTAssertThrowsError(try KernelDeviceCPRRecord(decoding: path, ramSize: ram))
    }

    func attachment() -> PCIAttachment {
        var a = try! PCIAttachment(decodingRecord: PCIAttachmentFixture.edu)
        a.interrupt = .msi(capability: 0x40)
        return a
    }

    /// The attach result the new VMM adopts instead of probing the device.
    func testTheAttachResultRoundTrips() throws {
        let a = attachment()
        let b = try PCIAttachment(decodingRecord: a.encodeRecord())
        XCTAssertEqual(b.description, a.description)
        XCTAssertEqual(b.interrupt, .msi(capability: 0x40))
        XCTAssertEqual(b.bar(0)?.guestAddress, GuestLayout.deviceBAR0(0))
        XCTAssertEqual(b.eduBufferSize, 4096)
        XCTAssertNil(b.eduStatusRegister)
        XCTAssertEqual(b.allBARsTrapped.bars.map(\.mappableAreas.isEmpty), [true])
    }

    /// A BAR the record puts outside the MMIO window (over guest RAM, say) is refused: the new
    /// VMM would route guest accesses there to the device.
    func testABAROutsideTheMMIOWindowIsRefused() throws {
        var bytes = attachment().encodeRecord()
        // version 1, vendor 2, device 2, config size 8, irq count 4, caps count 1 + 1 cap × 2,
        // BAR count 1, index 4, size 8, flags 1: the guest address follows.
        let gpa = 1 + 2 + 2 + 8 + 4 + 1 + 2 + 1 + 4 + 8 + 1
        for i in 0..<8 { bytes[gpa + i] = 0 }
        XCTAssertThrowsError(try PCIAttachment(decodingRecord: bytes)) { XCTAssertTrue("\($0)".contains("MMIO window"), "\($0)") }
        let good = attachment().encodeRecord()
        for n in 0..<good.count { XCTAssertThrowsError(try PCIAttachment(decodingRecord: Array(good[..<n])), "cut at \(n)") }
    }
}

/// edu as PCI attach finds it: 1234:11e8, MSI at 0x40, BAR0 1 MiB mmap-able at device 0's slot.
enum PCIAttachmentFixture {
    static var edu: [UInt8] {
        var b: [UInt8] = [1]
        func le<T: FixedWidthInteger>(_ v: T) { withUnsafeBytes(of: v.littleEndian) { b += $0 } }
        le(UInt16(0x1234)); le(UInt16(0x11e8)); le(UInt64(256)); le(UInt32(5))
        b += [1, 0x05, 0x40]
        b += [1]; le(UInt32(0)); le(UInt64(1 << 20)); b += [8 | 16]; le(GuestLayout.deviceBAR0(0))
        le(UInt16(1)); le(UInt64(0)); le(UInt64(1 << 20))
        b += [0, 0]
        b += [1]; le(UInt64(4096)); le(~UInt64(0))
        return b
    }
}
