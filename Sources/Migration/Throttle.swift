import Machine
import SystemCalls

/// Auto-converge's vCPU throttle, timed as QEMU's cpu_throttle: the vCPUs run for a fixed
/// 10 ms slice, then stay paused for slice × p / (100 − p) (990 ms at 99 %), so they run
/// (100 − p) % of the time. A fixed short period (an earlier throttle's 20 ms) let the pause
/// latency dominate at high percentages: 99 % ran the guest 2-3 % of the time, too much to
/// converge at a low max-bandwidth. Stopping is immediate: the paused wait is a condition
/// wait, and the last pause is released before `stop()` returns.
final class VCPUThrottle: @unchecked Sendable {
    static let sliceNS: UInt64 = 10_000_000
    private let vm: MicroVM
    private let cond = Condition()
    private var percent: UInt64 = 0
    private var thread: OSThread?

    init(vm: MicroVM) { self.vm = vm }

    /// 1...99 sets the throttle; 0 is `stop()`. Throws when the throttle's thread cannot be
    /// had (the vCPUs then run unthrottled).
    func set(percent p: UInt64) throws {
        let p = min(p, 99)
        guard p > 0 else { stop(); return }
        let start = cond.mutex.withLock { () -> Bool in
            let wasOff = percent == 0
            percent = p
            cond.broadcast()
            return wasOff
        }
        guard start else { return }
        do { thread = try OSThread(name: "throttle") { [self] in loop() } } catch {
            cond.mutex.withLock { percent = 0 }
            throw error
        }
    }

    /// Stop throttling; returns once the vCPUs hold no throttle pause.
    func stop() {
        cond.mutex.withLock { percent = 0; cond.broadcast() }
        thread?.join()
        thread = nil
    }

    private func loop() {
        while true {
            // Run for one slice (cut short by stop).
            var p = cond.mutex.withLock { () -> UInt64 in
                let end = monotonicNanoseconds() + Self.sliceNS
                while percent > 0, monotonicNanoseconds() < end { cond.wait(timeoutSeconds: Double(end - monotonicNanoseconds()) / 1e9) }
                return percent
            }
            if p == 0 { return }
            vm.pause()
            p = cond.mutex.withLock { () -> UInt64 in
                let end = monotonicNanoseconds() + Self.sliceNS * percent / (100 - percent)
                while percent > 0, monotonicNanoseconds() < end { cond.wait(timeoutSeconds: Double(end - monotonicNanoseconds()) / 1e9) }
                return percent
            }
            vm.resume()
            if p == 0 { return }
        }
    }
}
