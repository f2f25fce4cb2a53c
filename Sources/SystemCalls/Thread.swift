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
        let rc = pthread_create(&tid, nil, { arg in
            let me = Unmanaged<OSThread>.fromOpaque(arg!).takeRetainedValue()
            vl_set_thread_name(me.name)
            me.body()
            return nil
        }, box.toOpaque())
        precondition(rc == 0, "pthread_create failed: \(rc)")
    }

    /// The pthread, for pthread_kill (a vCPU is kicked out of KVM_RUN with a signal).
    public var pthread: pthread_t { tid }

    public func join() {
        if !joined { joined = true; pthread_join(tid, nil) }
    }
}
