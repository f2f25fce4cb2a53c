import Foundation
import Glibc
import SystemCalls
import VFIOUser
import XCTest

/// `vfio-live update` when the connection closes before the reply to x-vfio-live-update (exec
/// replaced the process behind it): the command follows what happened instead of calling the
/// update refused, and does not take an earlier update's report for this one's. The VMM is a
/// scripted QMP peer (this is the CLI's error path; the real VMM's flush is tested in
/// QMPFlushOutputTests).
final class UpdateLostReplyTests: VMMProcessTestCase {
    /// Serves `qmpPath`: the first connection answers until x-vfio-live-update, then closes
    /// without a reply (or, with `lateReplyMS`, replies that late and goes on); query-migrate
    /// after the update gives the earlier report `staleAnswers` times, then the new one.
    func scriptedVMM(staleAnswers: Int, lateReplyMS: UInt32? = nil) throws -> OSThread {
        let listener = try UnixListener(path: qmpPath, backlog: 4)
        let earlier = #"{"pid":111,"blackout-ns":5000000,"handed-over":[],"stream-bytes":1}"#
        let new = #"{"pid":\#(getpid()),"blackout-ns":1000000,"handed-over":["guest-ram"],"stream-bytes":2}"#
        var stale = staleAnswers
        return try OSThread(name: "scripted-vmm") {
            defer { listener.close() }
            var first = true
            while let s = try? listener.accept(timeoutMilliseconds: 30_000) {
                defer { s.close() }
                try? s.send(Array(#"{"QMP":{"version":{},"capabilities":[]}}"#.utf8) + [10])
                var buf: [UInt8] = []
                serving: while true {
                    guard (try? Poll.waitReadable(s.fd, timeoutMilliseconds: 5000)) == true else { break }
                    var chunk = [UInt8](repeating: 0, count: 4096)
                    let n = (try? chunk.withUnsafeMutableBytes { try s.fd.read(into: $0) }) ?? 0
                    if n <= 0 { break }
                    buf += chunk[0..<n]
                    // The client sends one command at a time; a message ends at its closing brace.
                    guard let msg = try? JSONValue.parse(buf[...]) else { continue }
                    buf = []
                    let id = msg["id"]?.uint64 ?? 0
                    let ret: String
                    switch msg["execute"]?.stringValue {
                    case "x-vfio-live-pid"?: ret = #"{"pid":\#(getpid())}"#
                    case "query-migrate"?:
                        let report = first || stale > 0 ? earlier : new
                        if !first { stale -= 1 }
                        ret = #"{"status":"completed","x-vfio-live-cpr":\#(report)}"#
                    case "x-vfio-live-update"?:
                        first = false
                        guard let late = lateReplyMS else { break serving }
                        usleep(late * 1000)
                        ret = "{}"
                        stale = 0
                    default: ret = "{}"
                    }
                    try? s.send(Array(#"{"return":\#(ret),"id":\#(id)}"#.utf8) + [10])
                }
                if !first && stale < 0 { return }
            }
        }
    }

    func testALostReplyIsFollowedToTheOutcomeAndAnEarlierReportIsNotTaken() throws {
        let t = try scriptedVMM(staleAnswers: 3)
        let (s, o) = try run(["update", "--qmp", qmpPath, "--mode", "exec", "--timeout", "20"])
        t.join()
        XCTAssertEqual(s, 0, o)
        XCTAssertTrue(o.contains("no reply to the command"), o)
        XCTAssertTrue(o.contains("live update completed"), o)
        XCTAssertTrue(o.contains("new VMM:       pid \(getpid())"), "the new report: \(o)")
        XCTAssertFalse(o.contains("pid 111"), "not the earlier one: \(o)")
        XCTAssertFalse(o.contains("refused"), o)
    }

    /// The VMM checks the new binary before it answers, which may outlast --qmp-timeout: the
    /// late reply is awaited on the same connection, not taken for a lost VM.
    func testALateReplyIsAwaited() throws {
        let t = try scriptedVMM(staleAnswers: 0, lateReplyMS: 1500)
        let (s, o) = try run(["update", "--qmp", qmpPath, "--mode", "transfer", "--qmp-timeout", "0.5", "--timeout", "20"])
        t.join()
        XCTAssertEqual(s, 0, o)
        XCTAssertTrue(o.contains("no reply within 0.5 s"), o)
        XCTAssertTrue(o.contains("live update completed"), o)
        XCTAssertTrue(o.contains("new VMM:       pid \(getpid())"), o)
    }
}
