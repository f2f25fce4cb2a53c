import Glibc
import XCTest
@testable import VFIOUser

/// splice(2) takes no MSG_NOSIGNAL: a relay whose destination has hung up must see EPIPE, not
/// have its process killed by SIGPIPE (a VMM or test runner need not ignore SIGPIPE; only the
/// `device` command does).
final class SplicePeerHangUpTests: XCTestCase {
    func testTheForwarderSeesEPIPEAndTheProcessLivesWhenTheDestinationHungUp() throws {
        guard let forwarder = SpliceForwarder() else { throw XCTSkip("splice(2) or pipe2(2) is not available here") }
        defer { forwarder.close() }
        let previous = signal(SIGPIPE, SIG_DFL)  // the default action: the process dies
        defer { signal(SIGPIPE, previous) }
        var src: [Int32] = [-1, -1], dst: [Int32] = [-1, -1]
        XCTAssertEqual(socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &src), 0)
        XCTAssertEqual(socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &dst), 0)
        defer { for fd in src + dst where fd >= 0 { close(fd) } }
        close(dst[1]); dst[1] = -1  // the destination hung up
        let bytes = [UInt8](repeating: 0x5a, count: 64 * 1024)
        XCTAssertEqual(bytes.withUnsafeBytes { write(src[1], $0.baseAddress, $0.count) }, bytes.count)
        do {
            let outcome = try forwarder.move(from: src[0], to: dst[0], max: bytes.count)
            if case .unsupported = outcome { throw XCTSkip("this kernel refuses splice between AF_UNIX sockets") }
            XCTFail("a destination that hung up took the data: \(outcome)")
        } catch let f as SpliceForwarder.Failure {
            XCTAssertFalse(f.atSource, "the destination failed, not the source")
            XCTAssertEqual(f.errno, .EPIPE)
        }
        var pending = sigset_t()
        sigpending(&pending)
        XCTAssertEqual(sigismember(&pending, SIGPIPE), 0, "no SIGPIPE is left pending for the thread")
    }
}
