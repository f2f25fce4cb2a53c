import Foundation
import Glibc
import SystemCalls
import XCTest

/// The CLI's QMP client against a VM that answers with anything but a reply: an endless run of
/// events (each read used to restart the wait, so the command waited forever), or bytes without
/// an end of line (they were buffered until memory ran out). Either way the command fails with
/// its reason, and the SIGKILL after 30 s that LiveProcess holds in reserve is not needed.
final class QMPClientFloodTests: XCTestCase {
    /// Greets, accepts qmp_capabilities, then sends `flood` over and over until the client goes.
    func floodingVMM(_ path: String, flood: String) throws -> OSThread {
        let listener = try UnixListener(path: path, backlog: 2)
        return try OSThread(name: "flooding-vmm") {
            defer { listener.close() }
            guard let s = try? listener.accept(timeoutMilliseconds: 30_000) else { return }
            defer { s.close() }
            try? s.send(Array(#"{"QMP":{"version":{},"capabilities":[]}}"#.utf8) + [10])
            _ = try? Poll.waitReadable(s.fd, timeoutMilliseconds: 10_000)
            var chunk = [UInt8](repeating: 0, count: 4096)
            _ = try? chunk.withUnsafeMutableBytes { try s.fd.read(into: $0) }
            try? s.send(Array(#"{"return":{},"id":1}"#.utf8) + [10])
            let bytes = Array(String(repeating: flood, count: 256).utf8)
            let end = monotonicNanoseconds() + 30_000_000_000
            while monotonicNanoseconds() < end, (try? s.send(bytes)) != nil {}
        }
    }

    func testAnEndlessRunOfEventsIsNoReply() throws {
        let path = temporarySocketPath("qmp-events")
        let t = try floodingVMM(path, flood: #"{"event":"STOP","data":{},"timestamp":{"seconds":1,"microseconds":2}}"# + "\n")
        let r = try LiveProcess.run(["update", "--qmp", path, "--qmp-timeout", "1"], killAfter: 30)
        t.join()
        XCTAssertEqual(r.status, 1, r.output)
        XCTAssertTrue(r.output.contains("did not answer x-vfio-live-pid within 1 s"), r.output)
    }

    func testBytesWithoutAnEndOfLineAreCutOff() throws {
        let path = temporarySocketPath("qmp-noeol")
        let t = try floodingVMM(path, flood: String(repeating: "x", count: 4096))
        let r = try LiveProcess.run(["update", "--qmp", path, "--qmp-timeout", "20"], killAfter: 30)
        t.join()
        XCTAssertEqual(r.status, 1, r.output)
        XCTAssertTrue(r.output.contains("a message longer than"), r.output)
    }
}
