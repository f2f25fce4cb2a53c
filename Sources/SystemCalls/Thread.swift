import CVFIOLive
import Glibc

/// A joinable OS thread running a closure (device workers, connection loops).
public final class OSThread: @unchecked Sendable {
    private var tid = pthread_t()
    private let body: () -> Void
    private let name: String
    private var joined = false

    /// Throws `OSThreadError` when no thread can be had: the caller fails what it was starting
    /// (a migration, a connection, a command) and the VMM, with its VM, lives on.
    public init(name: String = "vfio-live", _ body: @escaping () -> Void) throws {
        self.body = body
        self.name = name
        let box = Unmanaged.passRetained(self)
        // EAGAIN is the system being short of threads or memory for a moment (the lab's clean-
        // clone run once hit it in a VMM that had just taken a VM over by live update, and the
        // VMM died with the VM). It is retried for up to 2 s before it is an error.
        var rc: Int32 = 0
        if let refuse = Self.refuseForTesting, refuse(name) {
            box.release()
            throw OSThreadError.cannotStart(name: name, .EAGAIN)
        }
        for attempt in 0..<100 {
            rc = pthread_create(&tid, nil, { arg in
                let me = Unmanaged<OSThread>.fromOpaque(arg!).takeRetainedValue()
                vl_set_thread_name(me.name)
                me.body()
                return nil
            }, box.toOpaque())
            guard rc == EAGAIN else { break }
            if attempt == 0 { Log.warning("thread", "pthread_create for \(name): EAGAIN (no thread or memory to spare); retrying for up to 2 s") }
            usleep(20_000)
        }
        guard rc == 0 else {
            box.release()
            throw OSThreadError.cannotStart(name: name, Errno(rc))
        }
    }

    /// Tests: threads whose name this returns true for are refused as if pthread_create had
    /// failed (set before the code under test starts, cleared after it).
    nonisolated(unsafe) public static var refuseForTesting: ((String) -> Bool)?

    /// The pthread, for pthread_kill (a vCPU is kicked out of KVM_RUN with a signal).
    public var pthread: pthread_t { tid }

    public func join() {
        if !joined { joined = true; pthread_join(tid, nil) }
    }
}

public enum OSThreadError: Error, CustomStringConvertible {
    case cannotStart(name: String, Errno)
    public var description: String {
        switch self {
        case let .cannotStart(name, e): return "cannot start thread \(name): pthread_create failed: \(e)"
        }
    }
}
