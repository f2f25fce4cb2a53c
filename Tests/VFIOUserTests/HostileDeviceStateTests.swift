import Foundation
import Glibc
import XCTest
@testable import Devices
import SystemCalls
import VFIO
@testable import VFIOUser

/// Hostile peers of the device-state relay (hostile pass, round 2).
final class HostileDeviceStateTests: XCTestCase {
    func options(timeoutMS: Int32, splice: Bool = true) -> VFIOUserClient.Options {
        var o = VFIOUserClient.Options()
        o.timeoutMilliseconds = timeoutMS
        o.spliceRelay = splice
        o.offerTwinSocket = false
        return o
    }

    /// Before: a destination that stopped reading mid-message failed the relay with the
    /// *source* connection marked broken too (spliced path), or with the source's next reply
    /// eaten by a drain of bytes already received (plain path): the source device could not be
    /// moved back to RUNNING, a live migration's failure lost the source device. Now the
    /// source's rest of the reply (and the replies in flight) are read off and dropped.
    func testADestinationThatStopsReadingLeavesTheSourceDeviceUsable() throws {
        for splice in [true, false] {
            let a = try RunningServer(stateSize: 16 << 20, name: "nr-src")
            defer { a.stop() }
            let ca = try VFIOUserClient(path: a.path, options: options(timeoutMS: 2000, splice: splice))
            defer { ca.close() }
            var off: UInt64 = 0
            let block = (0..<(1 << 20)).map { UInt8(truncatingIfNeeded: $0 &* 11) }
            while off < 16 << 20 { try ca.regionWrite(2, offset: off, block); off += 1 << 20 }
            try ca.setMigrationState(.stopCopy)
            // Answers VERSION, then never reads again (a SIGSTOPped or wedged server): the
            // relay's sends to it fill the socket and time out.
            let dst = try SilentServer(tag: "nr-dst", answerVersion: true)
            defer { dst.close() }
            let cb = try VFIOUserClient(path: dst.path, options: options(timeoutMS: 400))
            defer { cb.close() }
            let t0 = monotonicNanoseconds()
            XCTAssertThrowsError(try ca.relayMigrationData(to: cb, depth: 16)) { e in
                XCTAssertTrue("\(e)".contains("MIG_DATA_WRITE"), "splice \(splice): \(e)")
            }
            XCTAssertLessThan(Double(monotonicNanoseconds() - t0) / 1e9, 10, "bounded (splice \(splice))")
            XCTAssertEqual(try ca.migrationState(), .stopCopy, "the source connection is in step (splice \(splice))")
            try ca.setMigrationState(.running)
            XCTAssertEqual(try ca.read32(0, 0), 0x010000ed, "and the device answers (splice \(splice))")
        }
    }
}
