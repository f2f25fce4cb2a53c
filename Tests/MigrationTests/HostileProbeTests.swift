import Devices
import Glibc
import Machine
@testable import Migration
import SystemCalls
import VFIO
import XCTest

/// The back channel's progress messages (PRG, the answers to the source's probes) from a
/// destination that lies: answers to probes never sent, numbers near and past 2^64, negative,
/// fractional, not JSON, given twice, a flood that never stops and never says READY.
extension LiveMigrationTests {
    static let lyingProbeAnswers = [#"{"x-probe":18446744073709551615}"#, #"{"x-probe":18446744073709551616}"#,
                                    #"{"x-probe":999999}"#, #"{"x-probe":-1}"#, #"{"x-probe":1e3}"#, #"{"x-probe":0}"#,
                                    "not json", #"{"x-probe":"2"}"#, #"{"x-probe":1,"x-probe":7}"#, ""]

    enum FloodFrom { case start, end, go }

    /// A destination that decodes the whole stream while another thread floods PRG (from the
    /// start, once the stream ended, or after READY once GO came), and never says READY (or
    /// ACK). Returns a way to stop it and wait for it.
    func startFloodingDestination(from: FloodFrom) throws -> () -> Void {
        let l = listener!
        let quit = Flag(), flooding = Flag()
        var socket: StreamSocket?
        let lock = Mutex()
        let reader = try OSThread(name: "flood-dst") {
            guard let s = try? l.accept(timeoutMilliseconds: 20_000) else { return }
            lock.withLock { socket = s }
            MigrationSource.setPeerTimeout(s, ms: 10_000)
            if from == .start { flooding.set() }
            guard let flooder = try? OSThread(name: "flooder", {
                var i = 0
                while !quit.value {
                    if !flooding.value { usleep(1000); continue }
                    let text = Self.lyingProbeAnswers[i % Self.lyingProbeAnswers.count]
                    i += 1
                    if (try? Verdict.send(s, .progress, text)) == nil { break }
                }
            }) else { return }
            _ = try? MigrationStreamDecoder(source: ChannelSource(s, timeoutMS: 10_000), sink: DiscardingSink()).run()
            if from == .go {
                try? Verdict.send(s, .ready, "")
                guard (try? Verdict.read(s))?.kind == .go else { quit.set(); flooder.join(); return }
            }
            // Keep flooding, never READY (or ACK), until the source hangs up.
            flooding.set()
            while !quit.value, (try? Poll.waitReadable(s.fd, timeoutMilliseconds: 50)) != true {}
            quit.set()
            flooder.join()
        }
        return {
            quit.set()
            lock.withLock { if let s = socket { _ = shutdown(s.fd.rawValue, Int32(SHUT_RDWR)) } }
            reader.join()
            lock.withLock { socket?.fd.close() }
        }
    }

    /// Before: PRG did not restart the peer timeout per message but the wait for READY read
    /// PRG after PRG for ever (and the non-blocking check drained a flood for ever): the source
    /// VM stayed paused with no end. Now the wait for READY is bounded by the peer timeout
    /// across progress messages, and the source VM runs on.
    func testADestinationThatFloodsPRGAndNeverSaysREADYTimesOutAndTheSourceRunsOn() throws {
        // From the start: the back-channel check drained the flood for ever (no data went out),
        // and once the lies had answered a first probe, pre-copy iterated for ever waiting for
        // the destination to catch up. After END only: the wait for READY read PRG for ever.
        for from in [FloodFrom.start, .end] {
            tearDown(); try setUpWithError()
            try startSource()
            let stop = try startFloodingDestination(from: from)
            defer { stop() }
            var p = params(peerTimeoutMS: 1500)
            p.maxIterations = 2
            let m = try connectSource(p)
            let (err, _) = try runAsync(m)()
            XCTAssertTrue("\(String(describing: err))".contains("destination sent only progress messages for 1500 ms"), "from \(from): \(String(describing: err))")
            stop()
            try assertSourceRunsOn(m, status: .failed, reasonContains: "only progress messages")
        }
    }

    /// After GO a flood of PRG is no ACK: within the peer timeout the outcome is unconfirmed
    /// and the source VM stays paused (the destination may run the guest).
    func testAFloodOfPRGAfterGOLeavesTheOutcomeUnconfirmedWithinThePeerTimeout() throws {
        try startSource()
        let stop = try startFloodingDestination(from: .go)
        defer { stop() }
        var p = params(peerTimeoutMS: 1500)
        p.maxIterations = 2
        let m = try connectSource(p)
        let (err, _) = try runAsync(m)()
        guard case .unconfirmed? = err as? MigrationError else { return XCTFail("\(String(describing: err))") }
        XCTAssertTrue("\(err!)".contains("only progress messages"), "\(err!)")
        XCTAssertTrue(src.vm.isPaused, "never two running copies")
    }

    /// A proxy in front of a real destination that adds lying PRG messages before each of the
    /// destination's own messages: the migration completes, the lies are ignored (a probe
    /// answered by a number it was never sent, or by none, is not an answer).
    func testLyingProbeAnswersAroundARealDestinationAreIgnoredAndTheMigrationCompletes() throws {
        try startSource()
        let front = try TCPListener(host: "127.0.0.1", port: 0, backlog: 4)
        defer { front.close() }
        let destPort = listener.port
        let injected = Flag()
        let proxy = try OSThread(name: "prg-proxy") {
            guard let a = try? front.accept(timeoutMilliseconds: 20_000), let b = try? TCPSocket.connect(host: "127.0.0.1", port: destPort) else { return }
            guard let up = try? OSThread(name: "prg-up", {
                var buf = [UInt8](repeating: 0, count: 1 << 16)
                while true {
                    let n = recv(a.fd.rawValue, &buf, buf.count, 0)
                    if n <= 0 { break }
                    if (try? buf[0..<n].withUnsafeBytes { try b.send([$0]) }) == nil { break }
                }
                _ = shutdown(b.fd.rawValue, Int32(SHUT_WR))
            }) else { return }
            var i = 0
            while let v = try? Verdict.read(b) {
                for _ in 0..<3 {
                    try? Verdict.send(a, .progress, Self.lyingProbeAnswers[i % Self.lyingProbeAnswers.count]); i += 1
                }
                injected.set()
                try? Verdict.send(a, v.kind, v.text)
            }
            _ = shutdown(a.fd.rawValue, Int32(SHUT_RDWR))
            up.join()
            a.fd.close(); b.fd.close()
        }
        defer { proxy.join() }
        let waitDestination = try startDestination()
        var p = params(peerTimeoutMS: 10_000)
        p.maxIterations = 3
        let m = try MigrationSource(vm: src.vm, to: TCPSocket.connect(host: "127.0.0.1", port: front.port), parameters: p, policies: [.auto])
        try m.run()
        XCTAssertNil(waitDestination())
        XCTAssertEqual(m.stats.status, .completed)
        XCTAssertTrue(injected.value, "lies were sent")
        XCTAssertTrue(dst.vm.verify().ok)
    }
}
