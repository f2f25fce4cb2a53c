import Glibc
import SystemCalls

/// Times the downtime from the source's pause to the destination's ACK, one phase after the
/// other: each mark closes the phase that ran since the previous mark, so the phases sum to
/// the whole.
struct DowntimeClock {
    let start = monotonicNanoseconds()
    private var last: UInt64
    private(set) var phases = DowntimePhases()
    init() { last = start }

    private mutating func take() -> UInt64 {
        let now = monotonicNanoseconds()
        defer { last = now }
        return now - last
    }
    /// When the last phase closed (monotonic ns).
    var lastMarkNS: UInt64 { last }
    mutating func mark(_ phase: WritableKeyPath<DowntimePhases, Double>) { phases[keyPath: phase] = Double(take()) / 1e6 }
    mutating func markDevice() { phases.devices.append(Double(take()) / 1e6) }
    /// Nanoseconds since the previous mark (for the handshake waits, split afterwards).
    mutating func lap() -> UInt64 { take() }
    var elapsedMS: Double { Double(last - start) / 1e6 }

    /// The breakdown once ACK arrived: each wait on the destination is split into the
    /// destination's own time (as it reported it, never more than the wait) and the rest.
    /// `ramDrainNS`: how long into the READY wait the destination was still applying the RAM
    /// remainder (the stop-copy probe's answer says when it was done; the last sends only
    /// filled the socket buffer). That part is RAM remainder, not handshake.
    func phases(readyWaitNS: UInt64, ackWaitNS: UInt64, loadNS: UInt64?, resumeNS: UInt64?, ramDrainNS: UInt64 = 0) -> DowntimePhases {
        var p = phases
        let load = min(loadNS ?? readyWaitNS, readyWaitNS), resume = min(resumeNS ?? ackWaitNS, ackWaitNS)
        let drain = min(ramDrainNS, readyWaitNS - load)
        p.destinationLoad = Double(load) / 1e6
        p.resume = Double(resume) / 1e6
        p.ramRemainder += Double(drain) / 1e6
        p.handshake = Double((readyWaitNS - load - drain) + (ackWaitNS - resume)) / 1e6
        p.destinationReported = loadNS != nil && resumeNS != nil
        return p
    }
}

/// The destination's own times in the switch-over handshake. A stream-version-2 destination
/// of this build puts `{"x-load-ns":N}` in READY's text (which older builds send empty and
/// read not at all) and adds `"x-resume-ns":N` to ACK's JSON summary (older sources keep the
/// text without parsing it). From an older destination the values are absent, and the source
/// counts the whole waits as load and resume.
enum DestinationTimes {
    static func readyText(loadNS: UInt64) -> String { "{\"x-load-ns\":\(loadNS)}" }

    /// The unsigned integer after `"key":` in a JSON object's text, if any (nothing else of the
    /// text is trusted: it is the peer's).
    static func value(_ key: String, in text: String) -> UInt64? {
        let b = Array(text.utf8.prefix(64 * 1024))
        let k = Array("\"\(key)\":".utf8)
        guard b.count >= k.count else { return nil }
        var i = 0
        while i + k.count <= b.count {
            if b[i] == k[0] && Array(b[i..<(i + k.count)]) == k {
                var j = i + k.count
                while j < b.count && b[j] == 0x20 { j += 1 }
                // Exactly a JSON unsigned integer that fits in 64 bits; anything else (past
                // 2^64-1, a fraction, an exponent) is no value rather than a truncated one.
                var v: UInt64 = 0
                var digits = 0
                while j < b.count, b[j] >= 0x30, b[j] <= 0x39 {
                    let (m, o1) = v.multipliedReportingOverflow(by: 10)
                    let (a, o2) = m.addingReportingOverflow(UInt64(b[j] - 0x30))
                    guard !o1, !o2 else { return nil }
                    v = a; j += 1; digits += 1
                }
                if j < b.count, [UInt8(ascii: "."), UInt8(ascii: "e"), UInt8(ascii: "E")].contains(b[j]) { return nil }
                return digits > 0 ? v : nil
            }
            i += 1
        }
        return nil
    }
}

/// What the prediction of the downtime is built from, measured in this migration: the RAM
/// rate without the max-bandwidth pacing (stop-and-copy is not paced), each device's read rate
/// and round trip, the cost of a dirty-log harvest, the connection's round trip, and the
/// phases of an earlier switch-over to the same destination when there was one.
struct DowntimeModel {
    /// Unpaced RAM bytes per second (last iteration that moved at least 1 MiB).
    var ramRate: Double?
    /// Nanoseconds of the last harvest (the stop-copy does one more).
    var harvestNS: UInt64 = 0
    /// Per device: pre-copy bytes per second, and the round trip of a MIG_DATA_SIZE query.
    var deviceRate: [Double?] = []
    var deviceRoundTripNS: [UInt64] = []
    /// How long the destination took to apply what was queued for it when the last answered
    /// probe went out (its answer's delay): what a stop at that moment would have waited for.
    var backlogNS: UInt64 = 0

    /// The delay of a probe's answer with nothing queued before it: one round trip to the
    /// destination's stream reader and back, as END→READY and GO→ACK each take (nil before
    /// one was timed; then the kernel's TCP round trip stands in). The median of the last
    /// three timed: on a loaded machine one sample is a wake-up latency of 0.1 to 4 ms.
    var probeRoundTripNS: UInt64? {
        roundTripSamples.isEmpty ? nil : roundTripSamples.sorted()[roundTripSamples.count / 2]
    }
    private(set) var roundTripSamples: [UInt64] = []

    mutating func noteBacklog(ns: UInt64) { backlogNS = ns }
    mutating func noteRoundTrip(ns: UInt64) {
        roundTripSamples.append(ns)
        if roundTripSamples.count > 3 { roundTripSamples.removeFirst() }
    }

    /// The last pre-copy pass that went to a caught-up destination, end to end: its bytes,
    /// and the time from its first send until the destination answered the probe after it
    /// (everything applied), pacing taken out. It is what a stop-copy pays for RAM, measured
    /// the way the downtime waits for it: per section send rates measure only how fast the
    /// socket buffer took the data, and under load they missed the stop-copy by 2x.
    private(set) var caughtUpPass: (bytes: UInt64, ns: UInt64)?

    mutating func noteCaughtUpPass(bytes: UInt64, ns: UInt64) {
        guard bytes >= Self.minimumTimedPassBytes, ns > 0 else { return }
        caughtUpPass = (bytes, ns)
    }

    /// Less than this in a pass is mostly fixed costs (the probe's round trip, wake-ups): its
    /// rate would say little about a larger remainder.
    static let minimumTimedPassBytes: UInt64 = 1 << 20

    /// The RAM rate the stop-copy is predicted with: the last caught-up pass end to end (its
    /// probe answer's way back, half a round trip, taken out), else the pre-copy sections'.
    var effectiveRAMRate: Double? {
        if let p = caughtUpPass {
            let back = (probeRoundTripNS ?? 0) / 2
            let ns = p.ns > back ? p.ns - back : p.ns
            return Double(p.bytes) / (Double(ns) / 1e9)
        }
        return ramRate
    }

    /// The link's rate per RAM section of the current pass (one channel): how fast the socket
    /// took each section of at least 1 MiB.
    var sectionRates: [Double] = []

    mutating func noteRAMSection(bytes: UInt64, ns: UInt64) {
        guard bytes >= 1 << 20, ns > 0 else { return }
        sectionRates.append(Double(bytes) / (Double(ns) / 1e9))
    }

    /// The end of a pass: `bytes` in `ns` (pacing taken out). With enough sections timed, the
    /// rate is their median: the pass's own rate also counts scanning clean and zero pages,
    /// and the destination's clearing of zero runs slowing its reads, neither of which a
    /// stop-copy of dirty data pages to a caught-up destination pays.
    mutating func noteRAM(bytes: UInt64, ns: UInt64) {
        defer { sectionRates.removeAll(keepingCapacity: true) }
        if sectionRates.count >= 3 {
            ramRate = sectionRates.sorted()[sectionRates.count / 2]
            return
        }
        guard bytes >= 1 << 20, ns > 0 else { return }
        ramRate = Double(bytes) / (Double(ns) / 1e9)
    }

    mutating func noteDevice(_ i: Int, bytes: UInt64, ns: UInt64) {
        while deviceRate.count <= i { deviceRate.append(nil) }
        guard bytes >= 64 << 10, ns > 0 else { return }
        deviceRate[i] = Double(bytes) / (Double(ns) / 1e9)
    }

    mutating func noteRoundTrip(_ i: Int, ns: UInt64) {
        while deviceRoundTripNS.count <= i { deviceRoundTripNS.append(0) }
        deviceRoundTripNS[i] = ns
    }

    /// What query-migrate shows of the model.
    func inputs(catchUpNS: UInt64, answersProbes: Bool) -> DowntimeInputs {
        var i = DowntimeInputs()
        i.ramRate = effectiveRAMRate ?? 0
        i.harvestMS = Double(harvestNS) / 1e6
        i.deviceRates = deviceRate
        i.deviceRoundTripMS = deviceRoundTripNS.map { Double($0) / 1e6 }
        i.backlogMS = Double(backlogNS) / 1e6
        i.roundTripMS = probeRoundTripNS.map { Double($0) / 1e6 }
        i.catchUpMS = Double(catchUpNS) / 1e6
        i.destinationAnswersProbes = answersProbes
        return i
    }

    /// What parking the vCPUs costs beyond the kick, from how the vCPU threads were scheduled
    /// in this migration: a vCPU exits KVM_RUN only once it runs, and on a loaded machine it
    /// waits for a CPU. Per thread, with `w` its mean wait before a slice: waiting in the run
    /// queue when the kick lands (its share of the time) leaves half a wait, asleep (the
    /// workload's pacing) the kick wakes it and it waits a whole one. The pause waits for
    /// every vCPU, so the threads' values add up. About 0 on a quiet machine; two loaded runs
    /// parked in 2.4 and 6.6 ms against the 0.2 ms predicted before.
    private(set) var vcpuQueueNS: UInt64 = 0

    mutating func noteVCPUScheduling(from a: [Int32: SchedStat], to b: [Int32: SchedStat], ns: UInt64) {
        guard ns > 0 else { return }
        var total = 0.0
        for (tid, s1) in b {
            guard let s0 = a[tid], s1.waitNS >= s0.waitNS, s1.runNS >= s0.runNS, s1.slices > s0.slices else { continue }
            let wait = Double(s1.waitNS - s0.waitNS), run = Double(s1.runNS - s0.runNS)
            let w = wait / Double(s1.slices - s0.slices)
            let waiting = min(wait / Double(ns), 1), asleep = max(0, 1 - (wait + run) / Double(ns))
            total += waiting * w / 2 + asleep * w
        }
        vcpuQueueNS = UInt64(min(total, 50e6))
    }

    /// One thread's /proc schedstat: time on a CPU, time runnable but waiting, slices run.
    struct SchedStat: Equatable { var runNS: UInt64, waitNS: UInt64, slices: UInt64 }

    /// The schedstat of this process's threads named `prefix`N (the vCPU threads are vcpu0,
    /// vcpu1, ...), by thread id; empty where /proc is not readable.
    static func threadSchedStats(prefix: String = "vcpu") -> [Int32: SchedStat] {
        var out: [Int32: SchedStat] = [:]
        for name in directoryEntryNames("/proc/self/task") ?? [] {
            guard let tid = Int32(name) else { continue }
            guard let comm = readKernelFileLine("/proc/self/task/\(name)/comm"), comm.hasPrefix(prefix),
                  Int(comm.dropFirst(prefix.count)) != nil,
                  let st = readKernelFileLine("/proc/self/task/\(name)/schedstat") else { continue }
            let f = st.split(separator: " ").compactMap { UInt64($0) }
            guard f.count >= 3 else { continue }
            out[tid] = SchedStat(runNS: f[0], waitNS: f[1], slices: f[2])
        }
        return out
    }

    /// Bytes in a socket's send queue not yet acknowledged by the peer (SIOCOUTQ, which is
    /// TIOCOUTQ's number), 0 if the ioctl fails.
    static func sendQueueBytes(_ fd: Int32) -> UInt64 {
        var n: Int32 = 0
        guard ioctl(fd, UInt(TIOCOUTQ), &n) == 0, n > 0 else { return 0 }
        return UInt64(n)
    }

    /// The connection's smoothed round trip as the kernel measured it (TCP), 0 for UNIX
    /// sockets (a local hop).
    static func connectionRoundTripNS(_ fd: Int32) -> UInt64 {
        var info = [UInt8](repeating: 0, count: 232)
        var len = socklen_t(info.count)
        guard getsockopt(fd, Int32(IPPROTO_TCP), TCP_INFO, &info, &len) == 0, len >= 72 else { return 0 }
        // struct tcp_info: tcpi_rtt (µs) is the u32 at offset 68.
        let rtt = info.withUnsafeBytes { $0.loadUnaligned(fromByteOffset: 68, as: UInt32.self) }
        return UInt64(rtt) * 1000
    }

    /// The prediction for switching over now with `dirtyPages` left and each device's
    /// MIG_DATA_SIZE, `vcpus` vCPUs; `rttNS` the connection's round trip.
    func predict(dirtyPages: UInt64, deviceSizes: [UInt64?], vcpuStateBytes: Int, rttNS: UInt64, fallbackRate: Double,
                 backlogNS: UInt64 = 0) -> DowntimePhases {
        var p = DowntimePhases()
        let rate = max(effectiveRAMRate ?? fallbackRate, 1e6)
        func ms(_ ns: UInt64) -> Double { Double(ns) / 1e6 }
        let rtts = deviceRoundTripNS
        // Pause: the vCPUs park (a kick and a KVM exit each), then one state change per device.
        p.pause = 0.2 + ms(vcpuQueueNS) + rtts.reduce(0) { $0 + ms($1) }
        p.ramRemainder = ms(harvestNS) + Double(dirtyPages * 4096) / rate * 1000
        for (i, size) in deviceSizes.enumerated() {
            let r = max((i < deviceRate.count ? deviceRate[i] : nil) ?? rate, 1e6)
            let rtt = i < rtts.count ? ms(rtts[i]) : 0
            // The data at its read rate, the read that ends the stream, the config read.
            p.devices.append(Double(size ?? (1 << 20)) / r * 1000 + 2 * rtt)
        }
        p.vcpuState = Double(vcpuStateBytes) / rate * 1000 + 0.05
        // The destination loads each device (one round trip to its server, plus what is still
        // queued on the connection to go through) and resumes each (about eight round trips:
        // config space, interrupt wiring, RUNNING).
        let deviceRTT = rtts.reduce(0) { $0 + ms($1) }
        p.destinationLoad = deviceRTT
        p.resume = 8 * deviceRTT + 0.1
        p.handshake = 2 * ms(probeRoundTripNS ?? rttNS) + ms(backlogNS)
        return p
    }
}
