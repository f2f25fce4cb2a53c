import CVFIOLive
import Glibc

/// A joinable OS thread running a closure (device workers, connection loops).
public final class OSThread: @unchecked Sendable {
    private var tid = pthread_t()
    private let body: () -> Void
    private let name: String
    private var joined = false

    public init(name: String = "vfio-live", _ body: @escaping () -> Void) {
        self.body = body
        self.name = name
        let box = Unmanaged.passRetained(self)
        // EAGAIN is the system being short of threads or memory for a moment (the lab's clean-
        // clone run once hit it in a VMM that had just taken a VM over by live update, and the
        // VMM died with the VM). It is retried for up to 2 s before it is fatal.
        var rc: Int32 = 0
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
        precondition(rc == 0, "pthread_create for \(name) failed: \(Errno(rc))")
    }

    /// The pthread, for pthread_kill (a vCPU is kicked out of KVM_RUN with a signal).
    public var pthread: pthread_t { tid }

    public func join() {
        if !joined { joined = true; pthread_join(tid, nil) }
    }
}
