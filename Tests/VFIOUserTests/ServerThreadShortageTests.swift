import Glibc
import SystemCalls
@testable import VFIOUser
import XCTest

/// A command that may wait on the device (DEVICE_RESET, DMA_MAP, ...) runs on a helper thread
/// beside the socket reader. When that thread cannot be had the server refuses the command with
/// EAGAIN and the cause, rather than run it on the reader (where it could wait 10 s for a DMA
/// reply only the reader hands over), and serves on: the next one succeeds.
final class ServerThreadShortageTests: XCTestCase {
    func testACommandWhoseHelperCannotStartIsRefusedWithEAGAINAndTheServerServesOn() throws {
        let server = try RunningServer(name: "helper-shortage")
        defer { server.stop() }
        let client = try VFIOUserClient(path: server.path)
        defer { client.close() }
        OSThread.refuseForTesting = { $0 == "vfu-command" }
        defer { OSThread.refuseForTesting = nil }
        XCTAssertThrowsError(try client.reset()) { e in
            XCTAssertEqual((e as? VFIOUserClientError)?.errno, .EAGAIN, "\(e)")
        }
        XCTAssertNoThrow(try client.deviceInfo(), "commands that need no helper are served meanwhile")
        OSThread.refuseForTesting = nil
        XCTAssertNoThrow(try client.reset(), "the next reset gets its helper and succeeds")
        XCTAssertEqual(server.server.resetsReceived, 1, "only the reset that ran counts")
    }
}
