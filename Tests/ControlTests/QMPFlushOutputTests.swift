import Control
import Glibc
import SystemCalls
import VFIOUser
import XCTest

/// cpr-exec replaces the VMM process right after the command that asked for it returns: the
/// update's thread flushes QMP output first. The command's reply may not be queued yet when it
/// does (the handler starts the thread, then returns), and a clean-clone CI run lost it that way:
/// `vfio-live update --mode exec` took the update for refused while it went ahead.
final class QMPFlushOutputTests: XCTestCase {
    /// Starts what stands for the update's thread: flush, then cut every client off (as exec
    /// does), and only then lets the handler return.
    final class ExecLike: QMPHandler {
        weak var server: QMPServer?
        var thread: OSThread?
        func execute(_ command: String, arguments: JSONValue?) throws -> JSONValue {
            guard command == "x-test-exec" else { throw QMPError("The command \(command) has not been found", class: "CommandNotFound") }
            thread = try OSThread(name: "exec-like") { [self] in
                server?.flushOutput(timeoutSeconds: 5)
                server?.stop()
            }
            // The handler is still on its way back when the thread flushes.
            usleep(200_000)
            return .object([("started", .bool(true))])
        }
    }

    func testTheReplyToTheCommandThatStartsAnExecReachesTheClient() throws {
        signal(SIGPIPE, SIG_IGN)
        let path = "/tmp/vfio-live-qmpflush-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).qmp"
        let handler = ExecLike()
        let server = try QMPServer(path: path, handler: handler)
        handler.server = server
        try server.start()
        defer { handler.thread?.join() }
        let peer = try QMPConcurrencyTests.Peer(path)
        try peer.send(#"{"execute":"x-test-exec","id":7}"#)
        let r = try peer.reply()
        XCTAssertEqual(r["return"]?["started"], .bool(true), "\(r)")
        XCTAssertEqual(r["id"], .number(7))
        XCTAssertTrue(peer.drainsToEOF(within: 5), "the server then cuts the client off")
    }

    /// A live update's commit: the old VMM stops accepting before GO (its successor accepts from
    /// then on). A client connecting meanwhile waits in the backlog, greeted by whoever accepts
    /// next (here this server again, as after a failed update); no one is refused.
    func testAPausedServerLeavesNewClientsInTheBacklogUntilItResumes() throws {
        signal(SIGPIPE, SIG_IGN)
        let path = "/tmp/vfio-live-qmppause-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).qmp"
        let handler = ExecLike()
        let server = try QMPServer(path: path, handler: handler)
        try server.start()
        defer { server.stop() }
        server.pauseAccepting()
        let s = try UnixSocket.connect(path: path)
        defer { s.close() }
        XCTAssertEqual(try Poll.waitReadable(s.fd, timeoutMilliseconds: 300), false, "no greeting while paused")
        server.resumeAccepting()
        XCTAssertEqual(try Poll.waitReadable(s.fd, timeoutMilliseconds: 5000), true, "greeted once accepting again")
    }
}
