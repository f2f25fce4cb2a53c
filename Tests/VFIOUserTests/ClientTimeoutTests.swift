import Foundation
import Glibc
import XCTest
import SystemCalls
import VFIO
@testable import Devices
@testable import VFIOUser

/// A raw listener standing in for a vfio-user server that accepts and then never answers (a
/// server busy with another VMM, a hung one), or answers VERSION and then goes silent. It is
/// not the project's server: nothing in it replies unless told to.
final class SilentServer: @unchecked Sendable {
    let path: String
    let listener: UnixListener
    private var accepted: [UnixSocket] = []
    private let lock = NSLock()
    private var thread: Thread?
    private let stop: EventFD

    /// `answerVersion`: reply to the first message (VERSION) of each connection, then stay silent.
    init(tag: String, answerVersion: Bool = false, accept: Bool = true) throws {
        path = temporarySocketPath(tag)
        listener = try UnixListener(path: path, backlog: 4)
        stop = try EventFD(nonBlocking: true)
        guard accept else { return }
        let t = Thread { [self] in
            while let s = try? listener.accept(cancel: stop.fd) {
                lock.withLock { accepted.append(s) }
                if answerVersion {
                    let c = VFIOUserConnection(socket: s)
                    if let m = try? c.receive() {
                        try? c.sendReply(to: m.header, payload: VersionPayload(capabilities: Capabilities()).encode())
                    }
                }
            }
        }
        thread = t
        t.start()
    }

    var connections: Int { lock.withLock { accepted.count } }

    func close() {
        try? stop.signal()
        while thread?.isFinished == false { usleep(1000) }
        lock.withLock { for s in accepted { s.close() }; accepted = [] }
        listener.close()
    }
}

/// Client options for the timeout tests: a reply timeout of `ms`, a cancel descriptor, and
/// whether the client offers the twin socket.
func timeoutOptions(_ ms: Int32, cancel: Int32? = nil, twinSocket: Bool = true) -> VFIOUserClient.Options {
    var o = VFIOUserClient.Options()
    o.timeoutMilliseconds = ms
    o.cancel = cancel
    o.offerTwinSocket = twinSocket
    return o
}

/// Every wait of VFIOUserClient on its server is bounded, and can be cancelled.
final class ClientTimeoutTests: XCTestCase {
    func options(_ ms: Int32, cancel: Int32? = nil) -> VFIOUserClient.Options { timeoutOptions(ms, cancel: cancel) }

    func testVERSIONToAServerThatAcceptsButNeverAnswersTimesOut() throws {
        let server = try SilentServer(tag: "silent")
        defer { server.close() }
        let t0 = monotonicNanoseconds()
        XCTAssertThrowsError(try VFIOUserClient(path: server.path, options: options(500))) {
            XCTAssertEqual($0 as? VFIOUserClientError, .timeout(command: .version, seconds: 0.5))
            XCTAssertEqual("\($0)", "the server did not answer VERSION within 0.5 s")
        }
        let took = Double(monotonicNanoseconds() - t0) / 1e9
        XCTAssertLessThan(took, 5, "the bound detects the hang")
        XCTAssertGreaterThanOrEqual(took, 0.45, "it waited for the bound, not less")
        XCTAssertEqual(server.connections, 1, "the server did accept")
    }

    func testARequestAfterVERSIONTimesOutAndTheConnectionStaysFailed() throws {
        let server = try SilentServer(tag: "half", answerVersion: true)
        defer { server.close() }
        let c = try VFIOUserClient(path: server.path, options: options(300))
        defer { c.close() }
        XCTAssertThrowsError(try c.deviceInfo()) {
            XCTAssertEqual($0 as? VFIOUserClientError, .timeout(command: .deviceGetInfo, seconds: 0.3))
        }
        // The reply is still owed: later calls fail at once with the cause (they recover once
        // it came, LateReplyTests), rather than wait again on a server that does not answer.
        let t0 = monotonicNanoseconds()
        XCTAssertThrowsError(try c.reset()) {
            XCTAssertEqual($0 as? VFIOUserClientError, .timeout(command: .deviceGetInfo, seconds: 0.3))
        }
        XCTAssertLessThan(Double(monotonicNanoseconds() - t0) / 1e9, 0.2, "fails at once, without another wait")
    }

    func testTheCancelDescriptorEndsTheWaitAtOnce() throws {
        let server = try SilentServer(tag: "cancel")
        defer { server.close() }
        let cancel = try EventFD(nonBlocking: true)
        let signaller = Thread { usleep(200_000); try? cancel.signal() }
        signaller.start()
        let t0 = monotonicNanoseconds()
        XCTAssertThrowsError(try VFIOUserClient(path: server.path, options: options(30_000, cancel: cancel.fd.rawValue))) {
            XCTAssertEqual($0 as? VFIOUserClientError, .cancelled(command: .version))
        }
        XCTAssertLessThan(Double(monotonicNanoseconds() - t0) / 1e9, 1.5, "cancelled within a second of the signal, not after 30 s")
    }

    /// A listener that never accepts: once its backlog is full, an AF_UNIX connect blocks. It
    /// is bounded too.
    func testConnectToAFullBacklogTimesOut() throws {
        let server = try SilentServer(tag: "backlog", accept: false)
        defer { server.close() }
        var queued: [UnixSocket] = []
        defer { for s in queued { s.close() } }
        var timedOut = false
        let t0 = monotonicNanoseconds()
        for _ in 0..<64 {
            do { queued.append(try UnixSocket.connect(path: server.path, timeoutMilliseconds: 300)) } catch let e as Errno {
                XCTAssertEqual(e, Errno(ETIMEDOUT))
                timedOut = true
                break
            }
        }
        XCTAssertTrue(timedOut, "\(queued.count) connections queued and none blocked")
        XCTAssertLessThan(Double(monotonicNanoseconds() - t0) / 1e9, 5)
        XCTAssertThrowsError(try VFIOUserClient(path: server.path, options: options(300))) {
            XCTAssertEqual($0 as? Errno, Errno(ETIMEDOUT))
        }
    }

    func testASocketPathLongerThanSunPathIsRefused() {
        let long = "/tmp/" + String(repeating: "x", count: 120)
        XCTAssertThrowsError(try UnixSocket.connect(path: long, timeoutMilliseconds: 100)) {
            XCTAssertEqual($0 as? Errno, Errno(ENAMETOOLONG))
        }
    }

    /// A healthy server is unaffected: the bound only applies to silence.
    func testARealServerAnswersWithinTheBound() throws {
        let server = try RunningServer(name: "bounded")
        defer { server.stop() }
        let c = try VFIOUserClient(path: server.path, options: options(2000))
        defer { c.close() }
        XCTAssertNoThrow(try c.deviceInfo())
        XCTAssertEqual(try c.migrationState(), .running)
    }

    /// A server that sends DMA_READs on the twin socket and never reads the replies: the
    /// client's replies stop at the send bound, the reader goes on, and close() returns
    /// (it joins the reader; without the bound it waited for good).
    func testTwinSocketRepliesToAServerThatNeverReadsAreBounded() throws {
        let path = temporarySocketPath("twin")
        let listener = try UnixListener(path: path)
        defer { listener.close() }
        let (twinOurs, twinTheirs) = try UnixSocket.pair()
        defer { twinOurs.close() }
        let served = try EventFD(nonBlocking: true)
        let server = Thread {
            guard let s = try? listener.accept(timeoutMilliseconds: 10_000) else { return }
            defer { s.close() }
            let c = VFIOUserConnection(socket: s)
            guard let v = try? c.receive() else { return }
            var caps = Capabilities()
            caps.twinSocket = .init(supported: true, fdIndex: 0)
            try? c.sendReply(to: v.header, payload: VersionPayload(capabilities: caps).encode(), fds: [twinTheirs.fd.rawValue])
            twinTheirs.close()
            guard let m = try? c.receive() else { return }  // DMA_MAP
            try? c.sendReply(to: m.header)
            // 1 MiB reads into the mapping; replies are never read.
            let t = VFIOUserConnection(socket: twinOurs)
            for _ in 0..<8 {
                try? t.send(id: t.allocateID(), command: VFIOUserCommand.dmaRead.rawValue, flags: MessageHeader.typeCommand,
                            payload: DMAAccess(address: 0x10_0000, count: 1 << 20).encode())
            }
            try? served.signal()
            _ = try? Poll.waitReadable(s.fd, timeoutMilliseconds: 20_000)  // until the client goes
        }
        server.start()
        let c = try VFIOUserClient(path: path, options: options(300))
        XCTAssertTrue(c.twinSocketActive)
        let ram = try GuestRAM(size: 1 << 20)
        try c.mapDMA(iova: 0x10_0000, size: ram.size, local: ram.map.base, fd: nil)
        XCTAssertTrue(try Poll.waitReadable(served.fd, timeoutMilliseconds: 10_000))
        usleep(500_000)  // the reader is now blocked on a reply the server does not read
        let closed = try EventFD(nonBlocking: true)
        let closer = Thread { c.close(); try? closed.signal() }
        closer.start()
        XCTAssertTrue(try Poll.waitReadable(closed.fd, timeoutMilliseconds: 10_000), "close() returned: the twin reader's send was bounded")
        while !server.isFinished { usleep(1000) }
    }

    /// A reply that stops half-way (a header announcing a payload that never comes): poll
    /// saw it readable, and the receive is bounded by the socket's receive timeout.
    func testAReplyThatStopsHalfWayTimesOut() throws {
        let path = temporarySocketPath("half-msg")
        let listener = try UnixListener(path: path)
        defer { listener.close() }
        let done = try EventFD(nonBlocking: true)
        let server = Thread {
            guard let s = try? listener.accept(timeoutMilliseconds: 10_000) else { return }
            defer { s.close() }
            guard let v = try? VFIOUserConnection(socket: s).receive() else { return }
            let h = MessageHeader(messageID: v.header.messageID, command: v.header.command, messageSize: 16 + 100,
                                  flags: MessageHeader.typeReply, errorNumber: 0)
            try? s.send(h.bytes)
            _ = try? Poll.waitReadable(done.fd, timeoutMilliseconds: 20_000)
        }
        server.start()
        let t0 = monotonicNanoseconds()
        XCTAssertThrowsError(try VFIOUserClient(path: path, options: options(400))) {
            XCTAssertEqual($0 as? VFIOUserClientError, .timeout(command: .version, seconds: 0.4))
        }
        XCTAssertLessThan(Double(monotonicNanoseconds() - t0) / 1e9, 5)
        try done.signal()
        while !server.isFinished { usleep(1000) }
    }

    /// A vCPU thread is kicked with a signal every few milliseconds while it waits on the
    /// device. Each signal used to restart the poll with its whole timeout, so the bound never
    /// came: the wait must still end at the bound.
    func testTheBoundHoldsUnderASignalEveryFewMilliseconds() throws {
        let server = try SilentServer(tag: "kicked")
        defer { server.close() }
        signal(SIGUSR2, { _ in })
        defer { signal(SIGUSR2, SIG_DFL) }
        let done = try EventFD(nonBlocking: true)
        nonisolated(unsafe) var tid = pthread_t()
        let started = try EventFD(nonBlocking: true)
        nonisolated(unsafe) var failure: Error?
        let t = Thread {
            tid = pthread_self()
            try? started.signal()
            do { _ = try VFIOUserClient(path: server.path, options: self.options(500)) } catch { failure = error }
            try? done.signal()
        }
        t.start()
        XCTAssertTrue(try Poll.waitReadable(started.fd, timeoutMilliseconds: 5000))
        let deadline = monotonicNanoseconds() + 10_000_000_000
        while (try? Poll.waitReadable(done.fd, timeoutMilliseconds: 20)) != true && monotonicNanoseconds() < deadline {
            pthread_kill(tid, SIGUSR2)
        }
        XCTAssertTrue(try Poll.waitReadable(done.fd, timeoutMilliseconds: 0), "the wait ended although signals kept coming")
        XCTAssertEqual(failure as? VFIOUserClientError, .timeout(command: .version, seconds: 0.5))
        while !t.isFinished { usleep(1000) }
    }
}

/// A server that answers VERSION, then answers nothing else and sends commands of its own
/// without end (one nobody knows, which the client refuses, every 2 ms), reading off what the
/// client sends back.
final class BusyServer: @unchecked Sendable {
    let path: String
    private let listener: UnixListener
    private var thread: OSThread?
    private let stop: EventFD

    init(tag: String) throws {
        path = temporarySocketPath(tag)
        listener = try UnixListener(path: path, backlog: 2)
        stop = try EventFD(nonBlocking: true)
        thread = try OSThread(name: "busy-server") { [self] in
            guard let s = try? listener.accept(cancel: stop.fd) else { return }
            defer { s.close() }
            let c = VFIOUserConnection(socket: s)
            guard let v = try? c.receive() else { return }
            try? c.sendReply(to: v.header, payload: VersionPayload(capabilities: Capabilities()).encode())
            guard (try? c.receive()) != nil else { return }
            let drain = try? OSThread(name: "busy-drain") {
                var chunk = [UInt8](repeating: 0, count: 65536)
                while (try? chunk.withUnsafeMutableBytes { try s.fd.read(into: $0) }) ?? 0 > 0 {}
            }
            var id: UInt16 = 1000
            let end = monotonicNanoseconds() + 20_000_000_000
            while monotonicNanoseconds() < end, (try? stop.consume()) ?? 1 == 0 {
                id &+= 1
                guard (try? c.send(id: id, command: 0x7ff0, flags: MessageHeader.typeCommand, payload: [UInt8]())) != nil else { break }
                usleep(2000)
            }
            _ = Glibc.shutdown(s.fd.rawValue, Int32(SHUT_RDWR))
            drain?.join()
        }
    }

    func close() {
        try? stop.signal()
        thread?.join()
        listener.close()
    }
}

final class BusyServerTests: XCTestCase {
    /// Each command the server sends restarts the wait on its silence (it shows the server
    /// works), but not past six times that bound: the call fails with its own reason, instead of
    /// holding the client (and its lock) for as long as the server keeps talking.
    func testAServerThatOnlySendsItsOwnCommandsDoesNotHoldACallForEver() throws {
        let server = try BusyServer(tag: "busy")
        defer { server.close() }
        let c = try VFIOUserClient(path: server.path, options: timeoutOptions(200))
        defer { c.close() }
        XCTAssertThrowsError(try c.deviceInfo()) {
            XCTAssertEqual($0 as? VFIOUserClientError, .busy(command: .deviceGetInfo, seconds: 1.2))
            XCTAssertEqual("\($0)", "the server kept sending its own commands for 1.2 s without answering DEVICE_GET_INFO")
        }
        // The reply is still owed, and the next call neither waits nor spins on the flood.
        XCTAssertThrowsError(try c.reset()) {
            XCTAssertEqual($0 as? VFIOUserClientError, .busy(command: .deviceGetInfo, seconds: 1.2))
        }
    }
}

extension BusyServerTests {
    /// A server that trickles its reply a byte at a time, each byte inside the client's silence
    /// bound: every read used to wait anew, so one reply could take as long as the server liked.
    /// The message as a whole is bound like the reply's wait (six times the silence bound).
    func testAReplyTrickledAByteAtATimeIsCutOffAtTheReplyBound() throws {
        let path = temporarySocketPath("trickle")
        let listener = try UnixListener(path: path, backlog: 2)
        defer { listener.close() }
        let t = try OSThread(name: "trickling-server") {
            guard let s = try? listener.accept(timeoutMilliseconds: 20_000) else { return }
            defer { s.close() }
            let c = VFIOUserConnection(socket: s)
            guard let v = try? c.receive() else { return }
            try? c.sendReply(to: v.header, payload: VersionPayload(capabilities: Capabilities()).encode())
            guard let m = try? c.receive() else { return }
            // A reply to it with a 200-byte payload, framed as the codec frames one, sent a byte
            // every 100 ms (the client's silence bound is 200 ms).
            var w = WireWriter()
            let h = MessageHeader(messageID: m.header.messageID, command: m.header.command,
                                  messageSize: UInt32(MessageHeader.size + 200), flags: MessageHeader.typeReply, errorNumber: 0)
            h.encode(into: &w)
            let bytes = w.bytes + [UInt8](repeating: 0, count: 200)
            for b in bytes {
                guard (try? s.send([b])) != nil else { return }
                usleep(100_000)
            }
        }
        defer { t.join() }
        let c = try VFIOUserClient(path: path, options: timeoutOptions(200))
        defer { c.close() }
        // Without the bound the trickle ends after 21.6 s with a reply (200 zero bytes) that
        // does not decode: a timeout here is the message's bound acting.
        XCTAssertThrowsError(try c.deviceInfo()) {
            XCTAssertEqual($0 as? VFIOUserClientError, .timeout(command: .deviceGetInfo, seconds: 0.2), "\($0)")
        }
    }
}
