import Glibc
import Machine
@testable import Migration
import SystemCalls
import XCTest

/// Zero runs at the destination clear only pages that are not zero already (as QEMU's
/// ram_handle_zero does); whatever the destination's RAM held, it ends equal to the source's.
extension LiveMigrationTests {
    func testZeroPagesClearWhateverTheDestinationHeldThere() throws {
        try src.vm.start(); try dst.vm.start()
        // The top 4 MiB of guest RAM: nothing of the guest's lives there, so the source's is zero.
        let size = Int(src.vm.memory.size), top = size - (4 << 20)
        func zeroPages(_ m: GuestMemory) -> Int {
            stride(from: top, to: size, by: 4096).filter { GuestMemory.isZeroPage(m.base + $0) }.count
        }
        XCTAssertEqual(zeroPages(src.vm.memory), 1024, "the source's top 4 MiB is zero")
        // The destination holds garbage there: whole pages, and pages with one byte set at
        // their start, their middle or their very end, beside pages that are zero.
        memset(dst.vm.memory.base + top, 0xa5, 1 << 20)
        for (k, at) in stride(from: top + (1 << 20), to: size, by: 8192).enumerated() {
            dst.vm.memory.base.storeBytes(of: UInt8(k % 255 + 1), toByteOffset: at + [0, 2048, 4095][k % 3], as: UInt8.self)
        }
        XCTAssertEqual(zeroPages(dst.vm.memory), 384)
        let wait = try startDestination()
        try connectSource().run()
        XCTAssertNil(wait())
        XCTAssertEqual(zeroPages(dst.vm.memory), 1024, "every page the source had zero is zero at the destination")
        XCTAssertEqual(memcmp(src.vm.memory.base + top, dst.vm.memory.base + top, size - top), 0, "the destination's RAM there is the source's")
    }
}
