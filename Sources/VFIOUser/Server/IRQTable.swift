import SystemCalls

/// The eventfds a client set for each IRQ index (DEVICE_SET_IRQS), and mask state.
/// Signalling writes 1 to the vector's eventfd, as the spec says.
public final class IRQTable: @unchecked Sendable {
    private var triggers: [UInt32: [EventFD?]] = [:]
    private var masked: [UInt32: [Bool]] = [:]
    private var pending: [UInt32: [Bool]] = [:]
    private let lock = Mutex()
    public private(set) var signalled: UInt64 = 0

    public init() {}

    /// Apply a validated SET_IRQS. `fds` are owned: stored or closed.
    public func apply(_ s: SetIRQsRequest, description d: IRQDescription, fds: [FileDescriptor]) throws {
        var fds = fds
        defer { for f in fds { f.close() } }
        let data = s.flags.intersection(.dataTypes), action = s.flags.intersection(.actions)
        let disablesIndex = action == .actionTrigger && s.count == 0 && (data == .dataNone || (data == .dataEventFD && fds.isEmpty))
        // An index the device does not implement (count 0, e.g. MSI-X on a dma-engine): the
        // spec's index-wide disable is accepted as a no-op, anything else is refused. (The
        // kernel's vfio-pci refuses even the disable there; a vfio-user client may send it when
        // it tears interrupts down, and it asks for nothing we cannot do.)
        if d.count == 0 {
            guard disablesIndex else {
                throw DeviceError(.EINVAL, "IRQ index \(d.index) has no vectors: only the disable form (DATA_NONE|ACTION_TRIGGER, count 0) is accepted")
            }
            return
        }
        // DATA_NONE|TRIGGER with count 0, or DATA_EVENTFD with no fds: disable the whole index.
        if (data == .dataNone && s.count == 0) || (data == .dataEventFD && fds.isEmpty && s.count == 0) {
            guard action == .actionTrigger else { return }
            lock.withLock { triggers[d.index] = nil; masked[d.index] = nil; pending[d.index] = nil }
            return
        }
        guard UInt64(s.start) + UInt64(s.count) <= UInt64(d.count) else {
            throw DeviceError(.EINVAL, "DEVICE_SET_IRQS start \(s.start) + count \(s.count) exceeds the \(d.count) vectors of index \(d.index)")
        }
        try lock.withLock {
            var t = triggers[d.index] ?? [EventFD?](repeating: nil, count: Int(d.count))
            var m = masked[d.index] ?? [Bool](repeating: false, count: Int(d.count))
            var p = pending[d.index] ?? [Bool](repeating: false, count: Int(d.count))
            for i in 0..<Int(s.count) {
                let v = Int(s.start) + i
                let boolOn = data == .dataBool ? s.bools[i] != 0 : true
                switch action {
                case .actionTrigger:
                    if data == .dataEventFD {
                        if fds.isEmpty { t[v] = nil }
                        else { t[v] = EventFD(adopting: fds.removeFirst()) }
                    } else if boolOn {
                        // DATA_NONE/BOOL with TRIGGER: fire the interrupt now (loopback test).
                        try t[v]?.signal()
                    }
                case .actionMask:
                    guard d.flags.contains(.maskable) else { throw DeviceError(.EINVAL, "IRQ index \(d.index) is not maskable") }
                    if boolOn { m[v] = true }
                case .actionUnmask:
                    guard d.flags.contains(.maskable) else { throw DeviceError(.EINVAL, "IRQ index \(d.index) is not maskable") }
                    if boolOn {
                        m[v] = false
                        if p[v] { p[v] = false; try t[v]?.signal() }
                    }
                default: break
                }
            }
            triggers[d.index] = t; masked[d.index] = m; pending[d.index] = p
        }
    }

    /// Raise a vector: signal its eventfd, or remember it as pending while masked.
    public func raise(index: UInt32, vector: UInt32) {
        lock.withLock {
            guard let t = triggers[index], Int(vector) < t.count else { return }
            if masked[index]?[Int(vector)] == true { pending[index]![Int(vector)] = true; return }
            if let e = t[Int(vector)] {
                try? e.signal()
                signalled &+= 1
            }
        }
    }

    public func hasTrigger(index: UInt32) -> Bool {
        lock.withLock { triggers[index]?.contains { $0 != nil } ?? false }
    }

    /// Close every eventfd (client disconnect).
    public func clear() {
        lock.withLock { triggers = [:]; masked = [:]; pending = [:] }
    }
}
