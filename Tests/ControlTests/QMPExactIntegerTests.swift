import Control
import Devices
import Glibc
import Machine
import SystemCalls
import VFIOUser
import XCTest

/// QMP integers are exact end to end, as QEMU's QNum: the handler used to get JSONValue's
/// doubles, so 2^64-1 (QEMU's "unlimited" max-bandwidth) was refused, and 2^53+1 came back
/// as 2^53. The raw reply text is checked, not a parsed double.
final class QMPExactIntegerTests: QMPVMTestCase {
    override class var socketPrefix: String { "qmpint" }

    /// Lines of raw text from the QMP socket.
    final class Lines {
        let s: UnixSocket
        var buf: [UInt8] = []
        init(_ path: String) throws { s = try UnixSocket.connect(path: path); QMPExactIntegerTests.setReceiveTimeout(s.fd.rawValue, seconds: 5) }
        func send(_ t: String) throws { try s.send(Array((t + "\n").utf8)) }
        func line() throws -> String {
            while true {
                if let nl = buf.firstIndex(of: 10) {
                    let l = String(decoding: buf[..<nl], as: UTF8.self); buf.removeFirst(nl + 1); return l.trimmingCharacters(in: .whitespacesAndNewlines)
                }
                var chunk = [UInt8](repeating: 0, count: 4096)
                let n = recv(s.fd.rawValue, &chunk, chunk.count, 0)
                guard n > 0 else { throw Errno.ECONNRESET }
                buf += chunk[0..<n]
            }
        }
        /// The next reply (events skipped).
        func reply() throws -> String { while true { let l = try line(); if !l.contains("\"event\"") { return l } } }
    }

    static func setReceiveTimeout(_ fd: Int32, seconds: Int) {
        var tv = timeval(tv_sec: seconds, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
    }

    func negotiated() throws -> Lines {
        let p = try Lines(path)
        _ = try p.line()
        try p.send(#"{"execute":"qmp_capabilities"}"#); _ = try p.reply()
        return p
    }

    func maxBandwidthAfter(_ p: Lines, set value: String) throws -> (String, String) {
        try p.send(#"{"execute":"migrate-set-parameters","arguments":{"max-bandwidth":\#(value)}}"#)
        let set = try p.reply()
        try p.send(#"{"execute":"query-migrate-parameters"}"#)
        return (set, try p.reply())
    }

    func testMaxBandwidthTakesQEMUsUnlimited2To64Minus1Exactly() throws {
        let p = try negotiated()
        let (set, query) = try maxBandwidthAfter(p, set: "18446744073709551615")
        XCTAssertEqual(set, #"{"return": {}}"#, "QEMU takes 2^64-1")
        XCTAssertTrue(query.contains(#""max-bandwidth":18446744073709551615"#), query)
    }

    func testIntegersAbove2To53StayExact() throws {
        let p = try negotiated()
        let (set, query) = try maxBandwidthAfter(p, set: "9007199254740993")
        XCTAssertEqual(set, #"{"return": {}}"#)
        XCTAssertTrue(query.contains(#""max-bandwidth":9007199254740993"#), "2^53+1 is not rounded: \(query)")
    }

    /// QEMU's input visitor takes a negative int64 for a uint64 as its two's complement.
    func testNegativeMaxBandwidthIsTakenAsQEMUDoes() throws {
        let p = try negotiated()
        let (set, query) = try maxBandwidthAfter(p, set: "-1")
        XCTAssertEqual(set, #"{"return": {}}"#)
        XCTAssertTrue(query.contains(#""max-bandwidth":18446744073709551615"#), query)
    }

    /// Out of range or not an integer: QEMU's visitor error, and the value stays as it was.
    func testOutOfRangeAndFractionalMaxBandwidthAreRefusedWithQEMUsWords() throws {
        let p = try negotiated()
        _ = try maxBandwidthAfter(p, set: "1000")
        for bad in ["18446744073709551616", "1.5", "1e3", "\"1M\""] {
            let (set, query) = try maxBandwidthAfter(p, set: bad)
            XCTAssertTrue(set.contains("GenericError"), "\(bad): \(set)")
            XCTAssertTrue(set.contains("Parameter 'max-bandwidth' expects uint64"), "\(bad): \(set)")
            XCTAssertTrue(query.contains(#""max-bandwidth":1000"#), "\(bad) left the value alone: \(query)")
        }
    }
}
