import Glibc
import XCTest
@testable import Devices
import SystemCalls
import VFIO
@testable import VFIOUser

/// A region the server offers mmap-able but not writable (the dma-engine's BAR4, a read-only
/// view of device memory) is mapped without PROT_WRITE. A write to it must go to the server as
/// REGION_WRITE, which refuses it: the client once stored through its read-only mapping and died
/// of SIGSEGV, taking the VMM with it.
final class ReadOnlyMappingTests: XCTestCase {
    func testWriteToAReadOnlyMappedRegionIsRefusedNotACrash() throws {
        let server = try RunningServer(stateSize: 1 << 20, name: "ro-map")
        defer { server.stop() }
        let c = try VFIOUserClient(path: server.path); defer { c.close() }
        let m = try XCTUnwrap(try c.mapRegion(4), "BAR4 is offered with an fd")
        XCTAssertFalse(m.writable)
        XCTAssertThrowsError(try c.regionWrite(4, offset: 0, [1, 2, 3, 4]), "the server refuses writes to a read-only region")
        // Reads still come straight from the mapping, and the device is unharmed.
        try c.regionWrite(2, offset: 0, [9, 8, 7, 6])
        XCTAssertEqual(try c.regionRead(4, offset: 0, count: 4), [9, 8, 7, 6])
    }
}
