import SystemCalls
import VFIOUser

/// Makes a migration's cancel (QMP `migrate_cancel`, and SIGTERM, which cancels) interrupt a
/// wait on a vfio-user device server, which is otherwise bounded only by the client's device
/// timeout (10 s). While the migration runs, each client watches this migration's eventfd
/// instead of its own cancel descriptor. After a cancel, a device wait still running a grace
/// period later gives up: a healthy server answers within milliseconds, so only a device that
/// hangs is given up on. A client whose wait was cut owes that reply: each later call first
/// drops late replies, and fails at once while one is still owed, so a rollback reaches a
/// device that answered in the meantime and reports one that still hangs as lost.
final class DeviceWaitCancel: @unchecked Sendable {
    static let graceMilliseconds: Int32 = 1000

    private let event: EventFD, requested: EventFD, done: EventFD
    private var thread: OSThread?
    private var swapped: [(VFIOUserClient, Int32?)] = []

    init(clients: [VFIOUserClient]) throws {
        event = try EventFD(nonBlocking: true)
        requested = try EventFD(nonBlocking: true)
        done = try EventFD(nonBlocking: true)
        let (event, requested, done) = (event, requested, done)
        thread = try OSThread(name: "mig-dev-cancel") {
            guard (try? Poll.waitAnyReadable([requested.fd.rawValue, done.fd.rawValue], timeoutMilliseconds: -1)) == 0 else { return }
            if (try? Poll.waitReadable(done.fd, timeoutMilliseconds: Self.graceMilliseconds)) != true {
                Log.warning("migration", "cancel: a device has not answered for \(Self.graceMilliseconds) ms; giving up the wait on it")
                try? event.signal()
            }
        }
        for c in clients {
            swapped.append((c, c.cancelDescriptor))
            c.setCancel(event.fd.rawValue)
        }
    }

    /// From any thread: the migration was cancelled.
    func cancel() { try? requested.signal() }

    /// Stop watching, and give every client its own cancel descriptor back (the rollback
    /// talks to the devices with them). Idempotent; from the migration's thread.
    func release() {
        guard let t = thread else { return }
        try? done.signal()
        t.join()
        thread = nil
        for (c, fd) in swapped { c.setCancel(fd) }
        swapped = []
    }

    deinit { release() }
}
