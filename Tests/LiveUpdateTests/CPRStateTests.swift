import Glibc
@testable import LiveUpdate
import Migration
import SystemCalls
import XCTest

/// The CPR state: descriptors by name over SCM_RIGHTS and across exec, and bad input.
final class CPRStateTests: XCTestCase {
    func inode(_ fd: Int32) -> (UInt64, UInt64) { var st = stat(); fstat(fd, &st); return (UInt64(st.st_dev), UInt64(st.st_ino)) }

    /// 20 descriptors (two SCM_RIGHTS messages) and records arrive by name, as the same objects.
    func testStateTravelsWithItsDescriptors() throws {
        let (a, b) = try UnixSocket.pair()
        var s = CPRState()
        var originals: [FileDescriptor] = []
        for i in 0..<20 {
            let fd = try MemFD.create(name: "t\(i)", size: 4096)
            originals.append(fd)
            s.save(i == 0 ? "ram" : "dev\(i)_interrupt", id: Int32(i), fd)
        }
        s.saveRecord("machine", [1, 2, 3])
        s.saveRecord("dev0", Array(repeating: 7, count: 1000))
        try s.send(over: a)
        let r = try CPRState.receive(from: b)
        XCTAssertEqual(r.entries.count, 20)
        for (i, e) in r.entries.enumerated() {
            XCTAssertEqual(e.id, Int32(i))
            XCTAssertNotEqual(e.fd.rawValue, originals[i].rawValue, "a new descriptor number in the receiver")
            XCTAssertTrue(inode(e.fd.rawValue) == inode(originals[i].rawValue), "the same open file")
        }
        XCTAssertNotNil(r.find("dev5_interrupt", id: 5))
        XCTAssertNil(r.find("dev5_interrupt", id: 6))
        XCTAssertEqual(r.record("machine"), [1, 2, 3])
        XCTAssertEqual(r.record("dev0")?.count, 1000)
        r.closeAll()
    }

    /// Every kind of bad state is refused with a reason, and no received descriptor leaks.
    func testBadStatesAreRefusedAndCloseWhatArrived() throws {
        let baseline = openFileDescriptorCount()
        func expectRefusal(_ why: String, _ send: (UnixSocket) throws -> Void) throws {
            let (a, b) = try UnixSocket.pair()
            try send(a)
            a.close()
            XCTAssertThrowsError(try CPRState.receive(from: b), why) { e in XCTAssertFalse("\(e)".isEmpty) }
            b.close()
        }
        let fd = try MemFD.create(name: "x", size: 4096)
        var good = CPRState()
        good.save("ram", fd); good.save("dev0", fd)
        good.saveRecord("machine", [9])
        let bytes = good.encode()

        try expectRefusal("bad magic") { s in var b = bytes; b[0] ^= 0xff; try s.send(b) }
        try expectRefusal("too many descriptors") { s in var b = bytes; b[8] = 0xff; try s.send(b) }
        try expectRefusal("corrupt body") { s in
            var b = bytes; b[CPRState.headerSize + 3] ^= 1; try s.send(b)
            try s.send([2], fds: [fd.rawValue, fd.rawValue])
        }
        try expectRefusal("descriptors missing") { s in try s.send(bytes); try s.send([1], fds: [fd.rawValue]) }
        try expectRefusal("message announces more than it carries") { s in try s.send(bytes); try s.send([2], fds: [fd.rawValue]) }
        try expectRefusal("truncated table") { s in try s.send(Array(bytes.prefix(30))) }
        fd.close()
        XCTAssertEqual(openFileDescriptorCount(), baseline, "every descriptor received was closed")
    }

    /// cpr-exec: the state in a memfd, descriptors adopted by number; a closed one is refused.
    func testExecStateAdoptsDescriptorsByNumber() throws {
        let ram = try MemFD.create(name: "ram", size: 8192)
        let dup = try ram.duplicate()
        var s = CPRState()
        s.save("ram", dup)
        s.saveRecord("machine", [4, 5])
        let memfd = try s.writeForExec(trailer: [0xaa, 0xbb])
        let (r, trailer) = try CPRState.readAfterExec(memfd)
        XCTAssertEqual(trailer, [0xaa, 0xbb])
        XCTAssertEqual(r.find("ram")?.rawValue, dup.rawValue)
        XCTAssertEqual(r.record("machine"), [4, 5])
        _ = r.find("ram")!.take()  // the same number as `dup`: one owner closes it

        var gone = CPRState()
        let closed = try ram.duplicate()
        gone.save("ram", closed)
        let memfd2 = try gone.writeForExec(trailer: [])
        closed.close()
        XCTAssertThrowsError(try CPRState.readAfterExec(memfd2)) { e in
            XCTAssertTrue("\(e)".contains("not kept open across exec"), "\(e)")
        }
    }

    /// The guest-RAM blocker: a memfd passes, an unlinked regular file that is not a memfd does not.
    func testGuestRAMMustBeShareable() throws {
        XCTAssertNil(LiveUpdateSource.guestRAMBlocker(try MemFD.create(name: "ram", size: 4096)))
        let pipeFDs = UnsafeMutablePointer<Int32>.allocate(capacity: 2)
        defer { pipeFDs.deallocate() }
        XCTAssertEqual(pipe(pipeFDs), 0)
        let p = FileDescriptor(adopting: pipeFDs[0]); close(pipeFDs[1])
        XCTAssertNotNil(LiveUpdateSource.guestRAMBlocker(p), "a pipe cannot back guest RAM")
        let path = "/tmp/vfio-live-ram-\(getpid())"
        let fd = open(path, O_CREAT | O_RDWR, 0o600)
        unlink(path)
        if fd >= 0 {
            XCTAssertNotNil(LiveUpdateSource.guestRAMBlocker(FileDescriptor(adopting: fd)), "an unlinked tmpfile is not shareable by name or seal")
        }
    }
}
