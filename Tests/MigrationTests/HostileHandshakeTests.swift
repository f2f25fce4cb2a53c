import Devices
import Glibc
import Machine
@testable import Migration
import SystemCalls
import VFIO
import XCTest

/// The switch-over handshake from a destination that lies: the READY/ACK timing fields
/// (x-load-ns, x-resume-ns) near and past 2^64, negative, fractional, missing, not JSON; and
/// READY sent twice. The source's breakdown stays within its own measured waits, and after
/// GO only ACK or ERR is taken as an answer.
extension LiveMigrationTests {
    /// A destination that reads the whole stream, says READY with `ready`, reads GO, then
    /// sends `afterGo`, and waits (bounded) for the source to hang up.
    func startLyingDestination(ready: String, afterGo: [(Verdict.Kind, String)]) throws -> () -> Error? {
        let l = listener!
        var failure: Error?
        let t = try OSThread(name: "lying-dst") {
            do {
                guard let s = try l.accept(timeoutMilliseconds: 20_000) else { throw MigrationError.channel("no connection") }
                MigrationSource.setPeerTimeout(s, ms: 10_000)
                try MigrationStreamDecoder(source: ChannelSource(s, timeoutMS: 10_000), sink: DiscardingSink()).run()
                try Verdict.send(s, .ready, ready)
                let go = try Verdict.read(s)
                guard go.kind == .go else { throw MigrationError.channel("got \(go.kind), not GO") }
                for (k, text) in afterGo { try Verdict.send(s, k, text) }
                _ = try? Poll.waitReadable(s.fd, timeoutMilliseconds: 5000)
                s.fd.close()
            } catch { failure = error }
        }
        return { t.join(); return failure }
    }

    func assertBreakdownWithinTheWaits(_ m: MigrationSource, reported: Bool, file: StaticString = #filePath, line: UInt = #line) {
        guard let b = m.stats.downtimeBreakdown else { return XCTFail("no breakdown", file: file, line: line) }
        for (name, v) in [("load", b.destinationLoad), ("resume", b.resume), ("handshake", b.handshake)] {
            XCTAssertTrue(v.isFinite && v >= 0 && v <= m.stats.downtimeMS + 0.001, "\(name) \(v) ms within the downtime \(m.stats.downtimeMS) ms", file: file, line: line)
        }
        XCTAssertEqual(b.totalMS, m.stats.downtimeMS, accuracy: 0.01, "the phases still sum to the downtime", file: file, line: line)
        XCTAssertEqual(b.destinationReported, reported, file: file, line: line)
    }

    func testHostileHandshakeTimesNearAndPast2To64AreClampedOrIgnored() throws {
        try startSource()
        // 2^64-1 is a number (clamped to the wait); 2^64 is none. Before, both were read as
        // their first 19 digits, and the destination counted as having reported.
        let wait = try startLyingDestination(ready: #"{"x-load-ns":18446744073709551615}"#,
                                         afterGo: [(.ack, #"{"pages":1,"x-resume-ns":18446744073709551616}"#)])
        let m = try connectSource()
        try m.run()
        XCTAssertNil(wait())
        XCTAssertEqual(m.stats.status, .completed)
        assertBreakdownWithinTheWaits(m, reported: false)
    }

    func testHostileHandshakeTimesNegativeFractionalMissingOrNotJSON() throws {
        for (ready, ack) in [(#"{"x-load-ns":-5}"#, #"{"x-resume-ns":1.5e9}"#), ("", "not json at all"),
                             (#"{"x-load-ns":"12"}"#, #"{"x-resume-ns":12e3,"x-resume-ns":7}"#)] {
            tearDown(); try setUpWithError()  // a fresh pair of VMs for each lie
            try startSource()
            let wait = try startLyingDestination(ready: ready, afterGo: [(.ack, ack)])
            let m = try connectSource()
            try m.run()
            XCTAssertNil(wait())
            assertBreakdownWithinTheWaits(m, reported: false)
        }
    }

    func testHostileHandshakeTimesSentTwiceTakeTheFirst() throws {
        try startSource()
        let wait = try startLyingDestination(ready: #"{"x-load-ns":1000,"x-load-ns":99999999999}"#, afterGo: [(.ack, #"{"x-resume-ns":2000}"#)])
        let m = try connectSource()
        try m.run()
        XCTAssertNil(wait())
        assertBreakdownWithinTheWaits(m, reported: true)
        XCTAssertEqual(m.stats.downtimeBreakdown?.destinationLoad ?? 0, 0.001, accuracy: 1e-9, "the first x-load-ns, 1000 ns")
        XCTAssertEqual(m.stats.downtimeBreakdown?.resume ?? 0, 0.002, accuracy: 1e-9)
    }

    /// READY again after GO: neither ACK nor ERR, so the destination may be running the guest.
    /// Before, anything but ACK was taken as ERR: the source rolled back and resumed its copy.
    func testHostileSecondREADYAfterGOLeavesTheSourcePaused() throws {
        try startSource()
        let wait = try startLyingDestination(ready: "", afterGo: [(.ready, "")])
        let m = try connectSource()
        XCTAssertThrowsError(try m.run()) { e in
            guard case .unconfirmed(let why)? = e as? MigrationError else { return XCTFail("\(e)") }
            XCTAssertTrue(why.contains("answered RDY, neither ACK nor ERR"), why)
        }
        XCTAssertNil(wait())
        XCTAssertTrue(src.vm.isPaused, "the source VM stays paused: never two copies")
        XCTAssertTrue(m.vmLeftPaused)
    }

    func testDestinationTimesParseOnlyExactUnsignedIntegers() {
        let v = { (t: String) in DestinationTimes.value("x-load-ns", in: t) }
        XCTAssertEqual(v(#"{"x-load-ns":18446744073709551615}"#), .max)
        XCTAssertNil(v(#"{"x-load-ns":18446744073709551616}"#))
        XCTAssertNil(v(#"{"x-load-ns":99999999999999999999999999}"#))
        XCTAssertNil(v(#"{"x-load-ns":-1}"#))
        XCTAssertNil(v(#"{"x-load-ns":1.5}"#))
        XCTAssertNil(v(#"{"x-load-ns":1e9}"#))
        XCTAssertNil(v(#"{"x-load-ns":"5"}"#))
        XCTAssertNil(v(#"{"x-load-ns":}"#))
        XCTAssertNil(v(""))
        XCTAssertEqual(v(#"{"x-load-ns": 42}"#), 42)
        XCTAssertEqual(v(#"{"x-load-ns":7,"x-load-ns":8}"#), 7)
        XCTAssertNil(v(String(repeating: "x", count: 100_000) + #""x-load-ns":3"#), "only the first 64 KiB of the peer's text is read")
    }
}

/// A destination that trickles its READY a byte at a time, each byte inside the peer timeout:
/// every read used to wait anew, so the source (its guest paused for the switch-over) waited as
/// long as the destination cared to take. One bound now holds for the whole message.
extension LiveMigrationTests {
    func testAReadyTrickledAByteAtATimeTimesOutAndTheSourceRunsOn() throws {
        try startSource()
        let l = listener!
        let t = try OSThread(name: "trickling-dst") {
            guard let s = try? l.accept(timeoutMilliseconds: 20_000) else { return }
            defer { s.fd.close() }
            MigrationSource.setPeerTimeout(s, ms: 10_000)
            guard (try? MigrationStreamDecoder(source: ChannelSource(s, timeoutMS: 10_000), sink: DiscardingSink()).run()) != nil else { return }
            var w = BEWriter()
            w.append(Array(Verdict.Kind.ready.rawValue.utf8))
            let text = Array(String(repeating: " ", count: 200).utf8)
            w.u32(UInt32(text.count)); w.append(text)
            for b in w.bytes {
                guard (try? s.send([b])) != nil else { return }
                usleep(150_000)
            }
        }
        var p = MigrationParameters(); p.peerTimeoutMS = 500
        let m = try connectSource(p)
        XCTAssertThrowsError(try m.run()) { e in
            guard case MigrationError.peerTimeout = e else { return XCTFail("\(e)") }
        }
        try assertSourceRunsOn(m, status: .failed, reasonContains: "did not answer for 500 ms")
        t.join()
    }
}
