import CVFIOLive
import Glibc
import XCTest
@testable import SystemCalls

final class SystemCallsTests: XCTestCase {
    func openFDs() -> Int { openFileDescriptorCount() }

    func testFileDescriptorClosesExactlyOnce() throws {
        let before = openFDs()
        do {
            let e = try EventFD()
            XCTAssertEqual(openFDs(), before + 1)
            e.fd.close()
            e.fd.close()  // second close is a no-op, never closes someone else's fd
            XCTAssertEqual(openFDs(), before)
        }
        do { _ = try EventFD() }
        XCTAssertEqual(openFDs(), before, "deinit closes")
        let f = try EventFD()
        let raw = f.fd.take()
        XCTAssertEqual(f.fd.rawValue, -1)
        XCTAssertEqual(openFDs(), before + 1, "take() hands ownership over")
        close(raw)
    }

    func testErrnoReadsAsAMessage() {
        XCTAssertEqual(Errno.EINVAL.description, "EINVAL (Invalid argument)")
        XCTAssertThrowsError(try syscallRetryingEINTR { close(-1) }) { XCTAssertEqual($0 as? Errno, .EBADF) }
    }

    func testSCMRightsPassingAndSurplusFDsAreClosed() throws {
        let (a, b) = try UnixSocket.pair()
        let e = try EventFD()
        try a.send([1, 2, 3, 4], fds: [e.fd.rawValue])
        var buf = [UInt8](repeating: 0, count: 4)
        let got = try buf.withUnsafeMutableBytes { try b.receiveExactly(into: $0, maxFDs: 1) }
        XCTAssertEqual(buf, [1, 2, 3, 4])
        XCTAssertEqual(got.fds.count, 1)
        XCTAssertFalse(got.truncated)
        // The received fd is the same eventfd.
        try EventFD(adopting: got.fds[0]).signal(5)
        XCTAssertEqual(try e.consume(), 5)
        // Five fds sent, two allowed: three are closed by the receiver, and it says so.
        let extra = try (0..<5).map { _ in try EventFD() }
        let before = openFDs()
        try a.send([9], fds: extra.map { $0.fd.rawValue })
        var one = [UInt8](repeating: 0, count: 1)
        let r = try one.withUnsafeMutableBytes { try b.receiveExactly(into: $0, maxFDs: 2) }
        XCTAssertEqual(r.fds.count, 2)
        XCTAssertTrue(r.truncated)
        XCTAssertEqual(openFDs(), before + 2, "only the allowed fds were installed")
    }

    func testEOFIsConnectionReset() throws {
        let (a, b) = try UnixSocket.pair()
        a.close()
        var buf = [UInt8](repeating: 0, count: 4)
        XCTAssertThrowsError(try buf.withUnsafeMutableBytes { try b.receiveExactly(into: $0, maxFDs: 0) }) {
            XCTAssertEqual($0 as? Errno, .ECONNRESET)
        }
    }

    func testListenerIs0600AndReplacesOnlyStaleSockets() throws {
        let path = "/tmp/vfio-live-sys-\(getpid()).sock"
        let l = try UnixListener(path: path)
        var st = stat()
        XCTAssertEqual(stat(path, &st), 0)
        XCTAssertEqual(st.st_mode & 0o777, 0o600)
        XCTAssertThrowsError(try UnixListener(path: path), "a live socket is not stolen")
        l.fd.close()  // now stale: nothing listens
        let l2 = try UnixListener(path: path)
        l2.close()
        XCTAssertNotEqual(access(path, F_OK), 0, "close removes the socket")
        // A regular file at the path is never deleted.
        let f = open(path, O_CREAT | O_WRONLY, 0o600); close(f)
        XCTAssertThrowsError(try UnixListener(path: path))
        unlink(path)
    }

    func testMemfdMappingIsShared() throws {
        let fd = try MemFD.create(name: "t", size: 8192)
        let m1 = try MappedRegion(fd: fd, length: 8192), m2 = try MappedRegion(fd: fd, length: 8192)
        m1.base.storeBytes(of: 0xdead_beef as UInt32, toByteOffset: 4096, as: UInt32.self)
        XCTAssertEqual(m2.base.load(fromByteOffset: 4096, as: UInt32.self), 0xdead_beef)
        XCTAssertEqual(try fd.fileSize(), 8192)
    }
}
