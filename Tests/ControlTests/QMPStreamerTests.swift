@testable import Control
import XCTest

/// The QMP input stream alone, without QEMU: each expectation below is what QEMU 11.1 answered
/// to the same bytes on one connection (recorded with `-machine none`; QMPConformanceTests
/// compares against a live QEMU when one is installed).
final class QMPStreamerTests: XCTestCase {
    /// Feed `chunks` in order; what the streamer emits, values shown by their JSON text.
    func run(_ chunks: [String], messageLimit: Int = QMPStreamer.maxMessageBytes) -> [String] {
        var s = QMPStreamer(messageLimit: messageLimit)
        var out: [String] = []
        for c in chunks {
            Array(c.utf8).withUnsafeBytes { b in
                s.feed(b) { o in
                    switch o {
                    case let .value(v): out.append(v.text)
                    case let .error(e): out.append("error: " + e)
                    }
                }
            }
        }
        return out
    }

    func testPositionsAndMessagesAsQEMU() {
        XCTAssertEqual(run(["{\"execute\":\"qmp_capabilities\"}\n", "}\n", "hello\n", "{\"a\":1,}\n", "{\"a\" 1}\n", "[1 2]\n", "{\"a\":1,\"a\":2}\n"]), [
            "{\"execute\": \"qmp_capabilities\"}",
            "error: 2:1: JSON parse error, expecting value",
            "error: 3:1: JSON parse error, invalid keyword 'hello'",
            "error: 4:8: JSON parse error, expecting key",
            "error: 5:6: JSON parse error, expecting ':'",
            "error: 6:4: JSON parse error, expected ',' or ']'",
            "error: 7:12: JSON parse error, duplicate key",
        ])
    }

    /// QEMU's column is one too far after a token ended by lookahead and after a lexical error.
    func testQEMUsColumnQuirksAreKept() {
        XCTAssertEqual(run(["{\"a\":1\"b\"}\n", "{\"a\":[1,2}\n", "-s }\n", "\"abc\n", "}\n"]), [
            "error: 1:8: JSON parse error, expected ',' or '}'",
            "error: 2:11: JSON parse error, expected ',' or ']'",
            // "-s" is a lexical error, but inside the message still being skipped: silent.
            "error: 3:5: JSON parse error, expecting value",
            "error: 4:1: JSON parse error, stray '\"abc\n'",
            "error: 5:2: JSON parse error, expecting value",
        ])
    }

    /// An unterminated string ends at the newline; the next line parses. (The old splitter
    /// kept waiting for the closing quote and swallowed every later command.)
    func testUnterminatedStringRecoversAtTheNewline() {
        XCTAssertEqual(run(["{\"execute\":\"query-status", "\n", "{\"execute\":\"query-status\"}\n"]), [
            "error: 1:12: JSON parse error, stray '\"query-status\n'",
            "{\"execute\": \"query-status\"}",
        ])
        // Without a newline the string runs on into the next command, as in QEMU.
        XCTAssertEqual(run(["{\"execute\":\"x", "{\"execute\":\"query-status\"}\n", "\"}\n"]), [
            "error: 1:16: JSON parse error, expected ',' or '}'",
            "error: 1:40: JSON parse error, expecting value",
            "error: 2:1: JSON parse error, stray '\"}\n'",
        ])
    }

    /// After a syntax error the rest of that message is skipped until it balances.
    func testTheRestOfABadMessageIsSkipped() {
        XCTAssertEqual(run(["{\"a\" 1, \"b\": {\"execute\":\"query-status\"}}\n", "{\"a\":1] \"x\"}\n", "{\"a\":1,}{\"execute\":\"stop\"}\n"]), [
            "error: 1:6: JSON parse error, expecting ':'",
            "error: 2:8: JSON parse error, expected ',' or '}'",
            "\"x\"",
            "error: 2:12: JSON parse error, expecting value",
            "error: 3:8: JSON parse error, expecting key",
            "{\"execute\": \"stop\"}",
        ])
    }

    func testLimitsAsQEMU() {
        XCTAssertEqual(run([String(repeating: "[", count: 1025) + String(repeating: "]", count: 1025) + "{}"]),
                       ["error: JSON nesting depth limit exceeded", "{}"])
        XCTAssertEqual(run(["[" + String(repeating: "1,", count: 1 << 20) + "1" + "]]"]),
                       ["error: JSON token count limit exceeded", "error: 1:2097156: JSON parse error, expecting value"])
    }

    /// QEMU's size limit counts the message's tokens (not its whitespace), and a single token
    /// longer than the limit is cut off by the lexer; the connection goes on. Shown at 1 KiB;
    /// the server uses QEMU's 64 MiB.
    func testSizeLimitAsQEMU() {
        XCTAssertEqual(QMPStreamer.maxMessageBytes, 64 << 20)
        XCTAssertEqual(QMPStreamer.maxTokens, 2 << 20)
        XCTAssertEqual(QMPStreamer.maxNesting, 1024)
        let pad = String(repeating: " ", count: 4000)
        XCTAssertEqual(run(["[" + pad + "\"" + String(repeating: "a", count: 1000) + "\"" + pad + "]", "{}"], messageLimit: 1024),
                       ["[\"" + String(repeating: "a", count: 1000) + "\"]", "{}"], "whitespace does not count")
        XCTAssertEqual(run(["[" + String(repeating: "\"aaaaaaaaaa\",", count: 100) + "1]", "{}"], messageLimit: 1024),
                       ["error: JSON token size limit exceeded", "{}"])
        XCTAssertEqual(run(["{\"id\":\"" + String(repeating: "a", count: 3000) + "\"}\n", "{}"], messageLimit: 1024),
                       ["error: JSON token size limit exceeded", "{}"])
    }

    func testStringsAndNumbersAsQEMU() {
        XCTAssertEqual(run(["[\"\\ud800\"]", "[\"a\\qb\"]", "[\"\u{1}\"]"]), [
            "error: 1:2: JSON parse error, \\ud800 is not a valid Unicode character",
            "error: 1:12: JSON parse error, invalid escape sequence in string",
            "error: 1:20: JSON parse error, stray '\"\u{1}'",
            "error: 1:24: JSON parse error, expecting value",
        ])
        XCTAssertEqual(run(["[\"\\u00e9\", 18446744073709551615, -9223372036854775808, 1.5e3, -0, 'a\"b']\n"]),
                       ["[\"é\", 18446744073709551615, -9223372036854775808, 1500, 0, \"a\\\"b\"]"])
    }
}
