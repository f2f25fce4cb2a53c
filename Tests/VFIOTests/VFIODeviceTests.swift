import VFIO
import XCTest

/// The transport-neutral decoding of region capability chains (the kernel's layout, which
/// vfio-user reuses): what a kernel device's GET_REGION_INFO buffer is read with.
final class VFIODeviceTests: XCTestCase {
    func le32(_ v: UInt32) -> [UInt8] { (0..<4).map { UInt8(v >> (8 * UInt32($0)) & 0xff) } }
    func le64(_ v: UInt64) -> [UInt8] { (0..<8).map { UInt8(v >> (8 * UInt64($0)) & 0xff) } }
    func header(id: UInt16, next: UInt32) -> [UInt8] { [UInt8(id & 0xff), UInt8(id >> 8), 1, 0] + le32(next) }

    func testSparseAreasAndTypeAreDecoded() throws {
        var b = [UInt8](repeating: 0, count: 32)
        b += header(id: 1, next: 32 + 8 + 8 + 32) + le32(2) + le32(0) + le64(0) + le64(0x1000) + le64(0x2000) + le64(0x1000)
        b += header(id: 2, next: 0) + le32(3) + le32(1)
        let (areas, type) = try VFIORegionInfo.decodeCapabilities(b, first: 32)
        XCTAssertEqual(areas, [.init(offset: 0, size: 0x1000), .init(offset: 0x2000, size: 0x1000)])
        XCTAssertEqual(type?.0, 3); XCTAssertEqual(type?.1, 1)
        let r = VFIORegionInfo(index: 0, readable: true, writable: true, mappable: true, size: 0x3000, sparseAreas: areas)
        XCTAssertEqual(r.mappableAreas.count, 2)
        XCTAssertEqual(VFIORegionInfo(index: 0, readable: true, writable: false, mappable: true, size: 0x3000).mappableAreas,
                       [.init(offset: 0, size: 0x3000)], "no sparse cap: all of it")
    }

    func testHostileChainsAreRefused() {
        let pad = [UInt8](repeating: 0, count: 32)
        XCTAssertThrowsError(try VFIORegionInfo.decodeCapabilities(pad + header(id: 2, next: 32) + le32(0) + le32(0), first: 32), "loop")
        XCTAssertThrowsError(try VFIORegionInfo.decodeCapabilities(pad + header(id: 1, next: 0) + le32(1000) + le32(0), first: 32), "areas past the end")
        XCTAssertThrowsError(try VFIORegionInfo.decodeCapabilities(pad, first: 64), "first cap outside")
        XCTAssertThrowsError(try VFIORegionInfo.decodeCapabilities(pad + header(id: 9, next: 8), first: 32), "backwards")
        // An area past the region's end is never offered for mmap.
        let r = VFIORegionInfo(index: 0, readable: true, writable: true, mappable: true, size: 0x1000,
                               sparseAreas: [.init(offset: 0x800, size: 0x1000), .init(offset: 0, size: 0x800)])
        XCTAssertEqual(r.mappableAreas, [.init(offset: 0, size: 0x800)])
    }
}
