import SystemCalls

/// query-migrate's view of a migration, updated by the engine, read by QMP from another thread.
public final class MigrationStats: @unchecked Sendable {
    public enum Status: String, Sendable { case none, setup, active, device, completed, failed, cancelled }
    private let lock = Mutex()
    private var _status: Status = .none
    public var status: Status { lock.withLock { _status } }
    public var errorDescription: String? { lock.withLock { _error } }
    private var _error: String?
    public internal(set) var startNS: UInt64 = 0
    public internal(set) var setupNS: UInt64 = 0
    public internal(set) var totalBytes: UInt64 = 0        // RAM size
    public internal(set) var transferredBytes: UInt64 = 0  // everything sent
    public internal(set) var ramBytes: UInt64 = 0          // RAM page data sent
    public internal(set) var remainingBytes: UInt64 = 0
    public internal(set) var normalPages: UInt64 = 0
    public internal(set) var zeroPages: UInt64 = 0
    public internal(set) var iterations: UInt64 = 0
    public internal(set) var dirtyPagesRate: UInt64 = 0
    public internal(set) var expectedDowntimeMS: UInt64 = 0
    public internal(set) var downtimeMS: Double = 0
    public internal(set) var totalTimeMS: Double = 0
    public internal(set) var throttlePercent: UInt64 = 0
    public internal(set) var bandwidth: Double = 0          // bytes/s
    public internal(set) var deviceBytes: [UInt64] = []
    /// Switch-over although the downtime limit could not be met (not converging after
    /// x-max-iterations): the downtime is then over the limit, and the summary says so.
    public internal(set) var forcedSwitchover = false
    /// Switch-over because the VM was stopped during the migration (QEMU's rule), whatever
    /// the prediction.
    public internal(set) var switchoverRequested = false
    public internal(set) var downtimeLimitMS: UInt64 = 0
    /// Where the measured downtime went (set when the migration completes); the phases sum to
    /// `downtimeMS`.
    public internal(set) var downtimeBreakdown: DowntimePhases?
    /// The prediction behind `expectedDowntimeMS`, phase by phase (updated each iteration).
    public internal(set) var expectedBreakdown: DowntimePhases?
    /// The costs measured in this migration that the prediction is made of.
    public internal(set) var downtimeInputs = DowntimeInputs()
    /// After a failure: where the guest is ("the VM runs on at the source", or why it stays paused).
    public internal(set) var sourceOutcome = "the VM runs on at the source"
    /// Called on every status change (the MIGRATION event).
    public var onStatus: ((Status) -> Void)?

    public init() {}

    public func set(_ s: Status, error: String? = nil) {
        lock.withLock { _status = s; if let e = error { _error = e } }
        onStatus?(s)
    }
    func update(_ body: () -> Void) { lock.withLock(body) }
    /// One line for the operator: what happened, including a forced or requested switch-over.
    public var summary: String {
        let st = status
        var out: String
        switch st {
        case .completed:
            out = "migration completed: downtime \(Self.tenths(downtimeMS)) ms (limit \(downtimeLimitMS) ms), \(iterations) iterations, \(transferredBytes) bytes in \(Int(totalTimeMS.rounded())) ms"
        case .failed, .cancelled:
            out = "migration \(st.rawValue): \(errorDescription ?? "no reason recorded"); \(sourceOutcome)"
        default:
            out = "migration \(st.rawValue): \(iterations) iterations, \(transferredBytes) bytes so far"
        }
        if forcedSwitchover {
            out += "; FORCED switch-over: not converging after \(iterations) iterations (expected downtime \(expectedDowntimeMS) ms > limit \(downtimeLimitMS) ms)"
        }
        if switchoverRequested { out += "; switch-over requested by a stop of the VM" }
        if throttlePercent > 0 { out += "; vCPUs throttled to \(throttlePercent)% (auto-converge)" }
        return out
    }

    static func tenths(_ v: Double) -> String {
        let t = Int((v * 10).rounded())
        return "\(t / 10).\(abs(t % 10))"
    }

    /// Read several fields together (they are updated under the lock; word-sized reads of a
    /// snapshot in progress are at worst one update stale, which progress reports tolerate).
    public func snapshot<T>(_ body: (MigrationStats) -> T) -> T { body(self) }
}

/// The downtime, phase by phase, in milliseconds: measured at the source (with the
/// destination's own times from the handshake), or predicted before switch-over.
public struct DowntimePhases: Sendable, Equatable {
    /// vCPUs parked and devices moved to STOP_COPY.
    public var pause = 0.0
    /// The last dirty pages: the final harvest and their sending.
    public var ramRemainder = 0.0
    /// Each device's remaining state (to the end of its stream) and its config record.
    public var devices: [Double] = []
    /// vCPU registers saved and sent.
    public var vcpuState = 0.0
    /// The destination's load after END (devices RESUMING→STOP) until READY, as it measured it.
    public var destinationLoad = 0.0
    /// The rest of the two handshakes (END→READY, GO→ACK): transit, and the destination
    /// catching up with what was still queued on the connection.
    public var handshake = 0.0
    /// The destination's resume after GO: config restored, devices RUNNING, vCPUs resumed.
    public var resume = 0.0
    /// Whether the destination reported its load and resume times (an older destination does
    /// not: then its load is the whole END→READY wait and its resume the whole GO→ACK wait).
    public var destinationReported = false
    public init() {}
    public var totalMS: Double { pause + ramRemainder + devices.reduce(0, +) + vcpuState + destinationLoad + handshake + resume }
}

/// The costs measured in this migration that the downtime prediction is made of.
public struct DowntimeInputs: Sendable, Equatable {
    /// RAM bytes per second the stop-copy is predicted with: the last pre-copy pass to a
    /// caught-up destination, end to end (first send to its probe's answer), else the median
    /// per-section send rate (unpaced).
    public var ramRate = 0.0
    /// The last dirty-log harvest (the stop does one more).
    public var harvestMS = 0.0
    /// Per device: pre-copy read rate (bytes/s, nil before one was measured) and the round
    /// trip of its stop-copy size query (ms).
    public var deviceRates: [Double?] = []
    public var deviceRoundTripMS: [Double] = []
    /// The last probe's answer delay: how long the destination took to apply what was queued
    /// for it at the end of a pass.
    public var backlogMS = 0.0
    /// An idle probe's answer delay: each of the switch-over's two exchanges takes one.
    public var roundTripMS: Double?
    /// The waits before the stop for the destination to catch up, all of them (the VM ran
    /// meanwhile).
    public var catchUpMS = 0.0
    /// Whether the destination answers probes (an older build does not: then its backlog is
    /// unknown, and the stop may wait for it).
    public var destinationAnswersProbes = false
    /// Whether the destination had applied everything sent before the stop (its last probe
    /// answered): false for an older destination, a forced switch-over to one that lags, or a
    /// stop requested by the user.
    public var caughtUpAtStop = false
    /// Bytes still in the source's socket send queue (SIOCOUTQ) when END went out: what the
    /// destination had yet to read at the end of the stop-copy.
    public var sendQueueAtEnd: UInt64 = 0
    public init() {}
}

/// A migration's parameters and capabilities (migrate-set-parameters / -capabilities).
public struct MigrationParameters: Sendable {
    /// Milliseconds the guest may be paused at switch-over.
    public var downtimeLimitMS: UInt64 = 300
    /// Bytes per second; 0 = unlimited (QEMU's default is 128 MiB/s: vfio-live does not throttle
    /// unless asked, because loopback and local links are the common case).
    public var maxBandwidth: UInt64 = 0
    public var autoConverge = false
    public var throttleInitial: UInt64 = 20
    public var throttleIncrement: UInt64 = 10
    public var throttleMax: UInt64 = 99
    /// Switch over after this many iterations even if the downtime limit cannot be met.
    public var maxIterations: UInt64 = 64
    /// Treat every page mapped by a device without dirty tracking as dirty (else: blocker).
    public var allowUntrackedDevices = false
    /// Milliseconds the peer may make no progress (stop reading, or not answer) before the
    /// migration fails with `.peerTimeout` and the source resumes; 0 = wait forever. It
    /// applies in every phase, switch-over included (QMP: x-vfio-live-peer-timeout).
    public var peerTimeoutMS: UInt64 = 5000
    /// Capability x-vfio-live-payload-checksum: RAM page data carries a checksum the destination
    /// checks (off by default, as QEMU, which keeps none and relies on the transport). On, the
    /// source copies each section into a staging buffer with a fused checksum (a page must not
    /// change between its checksum and its send); off, pages go from guest RAM to the socket.
    public var payloadChecksum = false
    /// Capability multifd and parameter multifd-channels (QEMU's; default 2 channels): RAM and
    /// device state travel on that many extra connections beside the main channel.
    public var multifd = false
    public var multifdChannels = 2
    public init() {}
}
