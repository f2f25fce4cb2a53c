import Devices
import Glibc
import SystemCalls
import VFIOUser

// Shared by MigrationTests and ControlTests (Tests/ControlTests/HoldingRelay.swift is a link to
// this file): the engine's and the VMM's tests of a device server that hangs.

/// A vfio-user relay between a client and a real server that can hold one MIG_DATA_READ: the
/// server never sees it (a hung server), or sees it late (a slow one). Messages and their fds
/// pass through unchanged otherwise.
final class HoldingRelay: @unchecked Sendable {
    var path: String { plumbing.path }
    private let lock = Mutex()
    private var plumbing: RelayPlumbing!
    /// Hold the next MIG_DATA_READ: nil = pass it; .infinity = forever; else seconds.
    var holdNextRead: Double? { get { lock.withLock { hold } } set { lock.withLock { hold = newValue } } }
    private var hold: Double?
    /// Signalled when a MIG_DATA_READ is being held.
    let holding: EventFD

    init(to serverPath: String, tag: String) throws {
        holding = try EventFD(nonBlocking: true)
        plumbing = try RelayPlumbing(to: serverPath, tag: tag, name: "relay") { [self] c, s in
            [try OSThread(name: "relay-c2s") { [self] in pump(from: c, to: s, holdReads: true) },
             try OSThread(name: "relay-s2c") { [self] in pump(from: s, to: c, holdReads: false) }]
        }
    }

    private func pump(from a: UnixSocket, to b: UnixSocket, holdReads: Bool) {
        let ca = VFIOUserConnection(socket: a, maxReceiveFDs: 8, maxMessageSize: 80 << 20)
        let cb = VFIOUserConnection(socket: b, maxReceiveFDs: 8, maxMessageSize: 80 << 20)
        var frozen = false
        while true {
            guard let m = try? ca.receive() else { break }
            if frozen { m.closeFDs(); continue }  // a hung server reads on, and does nothing
            if holdReads, m.header.isCommand, m.header.command == VFIOUserCommand.migDataRead.rawValue,
               let h = lock.withLock({ () -> Double? in defer { hold = nil }; return hold }) {
                try? holding.signal()
                if h == .infinity { frozen = true; m.closeFDs(); continue }
                usleep(UInt32(h * 1e6))
            }
            try? cb.send(id: m.header.messageID, command: m.header.command, flags: m.header.flags, errorNumber: m.header.errorNumber,
                         payload: m.payload, fds: m.fds.map(\.rawValue))
            m.closeFDs()
        }
        _ = shutdown(b.fd.rawValue, Int32(SHUT_RDWR))
    }

    func close() { plumbing.close() }
}

/// The plumbing every test relay shares: a listener, one client accepted and connected through
/// to the real server, the threads that pump its messages, and a close that ends them all.
final class RelayPlumbing: @unchecked Sendable {
    let path: String
    private let listener: UnixListener
    private let lock = Mutex()
    private var accepter: OSThread!
    private var pumps: [OSThread] = []
    private var sockets: [UnixSocket] = []

    /// `start(client, server)` runs once both are connected and returns its pump threads.
    init(to serverPath: String, tag: String, name: String, start: @escaping @Sendable (UnixSocket, UnixSocket) throws -> [OSThread]) throws {
        path = InProcessServer.temporaryPath(tag)
        listener = try UnixListener(path: path, backlog: 2)
        accepter = try OSThread(name: "\(name)-accept") { [self] in
            guard let c = try? listener.accept(timeoutMilliseconds: 10_000), let s = try? UnixSocket.connect(path: serverPath) else { return }
            lock.withLock { sockets += [c, s] }
            // A pump that cannot start leaves the relay without it: the test then fails on its own terms.
            guard let started = try? start(c, s) else { return }
            lock.withLock { pumps += started }
        }
    }

    func close() {
        lock.withLock { for s in sockets { _ = shutdown(s.fd.rawValue, Int32(SHUT_RDWR)) } }
        accepter.join()
        for t in lock.withLock({ pumps }) { t.join() }
        lock.withLock { for s in sockets { s.close() }; sockets = [] }
        listener.close()
    }
}
