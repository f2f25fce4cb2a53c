import SystemCalls

/// What a device state transfer did, for reports and tests.
public struct DeviceTransferReport: Sendable {
    public var protocolUsed: MigrationProtocol
    public var sourcePath: [MigrationState] = []
    public var destinationPath: [MigrationState] = []
    public var preCopyRounds = 0
    public var preCopyBytes: UInt64 = 0
    public var stopCopyBytes: UInt64 = 0
    public var totalNanoseconds: UInt64 = 0
    /// From the source leaving a running state to the destination running: the device's downtime.
    public var stopCopyNanoseconds: UInt64 = 0
    /// Its parts: the source's move to STOP_COPY, the data, the destination's load and run.
    public var stopTransitionNanoseconds: UInt64 = 0
    public var stopCopyDataNanoseconds: UInt64 = 0
    public var destinationLoadNanoseconds: UInt64 = 0
    public var totalBytes: UInt64 { preCopyBytes + stopCopyBytes }
}

public enum DeviceTransferError: Error, CustomStringConvertible {
    case failed(phase: String, underlying: String, sourceRecovered: Bool)
    public var description: String {
        switch self {
        case let .failed(phase, u, rec):
            return "device migration failed during \(phase): \(u); " +
                (rec ? "the source device is back in RUNNING with its state intact" : "the source device could NOT be returned to RUNNING")
        }
    }
}

/// A transport that can move v2 migration data from its device straight to another device of
/// the same transport, without handing each piece to the caller (vfio-user: pipelined
/// MIG_DATA_READ, each reply sent on as a MIG_DATA_WRITE from the buffer it arrived in).
public protocol MigrationDataRelay: AnyObject {
    /// Move data until the source's current data ends (a short read); returns the bytes moved,
    /// or nil when `destination` is not of this transport (the caller copies instead). Data
    /// that has not ended after `maxBytes` is an error (`DeviceMigrationError.dataDidNotEnd`).
    func relayMigrationData(to destination: MigrationDeviceHandle, chunk: Int, maxBytes: UInt64, beforeWrite: (() throws -> Void)?) throws -> UInt64?
}

/// Moves one device's state from a source to a destination: destination to RESUMING, pre-copy
/// rounds while the source runs, stop-copy, destination RESUMING→STOP (where it validates the
/// image) →RUNNING, source STOP_COPY→STOP. Any failure before the destination runs puts the
/// source back in RUNNING and resets the destination (the only way out of RESUMING).
public final class DeviceStateTransfer {
    public struct Options: Sendable {
        public var preCopy = true
        public var maxPreCopyRounds = 8
        /// Stop iterating once a round moves no more than this many bytes.
        public var convergedBytes: UInt64 = 256 * 1024
        public var chunk = 1 << 20
        public init() {}
    }

    /// Hook for tests and the demo: called after each pre-copy round with its byte count.
    public var afterPreCopyRound: ((Int, UInt64) -> Void)?
    /// Called just before the source leaves its running state (the VMM stops its vCPUs here).
    public var beforeStopCopy: (() throws -> Void)?
    /// Hook for fault injection: called before each write to the destination.
    public var beforeDestinationWrite: ((Int) throws -> Void)?

    public let source: DeviceMigration
    public let destination: DeviceMigration
    public let options: Options

    public init(source: DeviceMigration, destination: DeviceMigration, options: Options = Options()) {
        self.source = source; self.destination = destination; self.options = options
    }

    /// A source whose reads are never short would pump forever: each pump is bounded by what
    /// the source announces (asked for before a stop-copy's downtime starts, not inside it).
    private func dataBound() -> UInt64 { DeviceMigration.dataBound(announced: source.stopCopySize()) }

    private func pump(_ bytes: inout UInt64, writes: inout Int, bound: UInt64) throws -> UInt64 {
        var moved: UInt64 = 0
        if source.proto == .v2, destination.proto == .v2, let relay = source.device as? MigrationDataRelay {
            let hook = beforeDestinationWrite
            var n = writes
            defer { writes = n }
            if let m = try relay.relayMigrationData(to: destination.device, chunk: options.chunk, maxBytes: bound, beforeWrite: {
                try hook?(n)
                n += 1
            }) {
                bytes += m
                return m
            }
        }
        while true {
            let data = try source.read(max: options.chunk)
            if data.isEmpty { return moved }
            try beforeDestinationWrite?(writes)
            writes += 1
            try data.withUnsafeBytes { try destination.write($0) }
            moved += UInt64(data.count)
            bytes += UInt64(data.count)
            if moved > bound { throw DeviceMigrationError.dataDidNotEnd(moved: moved, bound: bound) }
            // A short read ends the currently available data (v2); v1 returns one chunk per read.
            if source.proto == .v2 && data.count < options.chunk { return moved }
        }
    }

    public func run() throws -> DeviceTransferReport {
        var report = DeviceTransferReport(protocolUsed: source.proto)
        let start = monotonicNanoseconds()
        var phase = "destination setup"
        var writes = 0
        var stopStart: UInt64 = 0
        do {
            report.destinationPath = try destination.transition(to: .resuming)
            report.sourcePath = [try source.state()]
            if options.preCopy && source.capabilities.contains(.preCopy) {
                phase = "pre-copy"
                report.sourcePath += try source.transition(to: .preCopy).dropFirst()
                while report.preCopyRounds < options.maxPreCopyRounds {
                    let n = try pump(&report.preCopyBytes, writes: &writes, bound: dataBound())
                    report.preCopyRounds += 1
                    afterPreCopyRound?(report.preCopyRounds, n)
                    if n <= options.convergedBytes { break }
                }
            }
            phase = "stop-copy"
            let bound = dataBound()
            try beforeStopCopy?()
            stopStart = monotonicNanoseconds()
            report.sourcePath += try source.transition(to: .stopCopy).dropFirst()
            let t1 = monotonicNanoseconds()
            _ = try pump(&report.stopCopyBytes, writes: &writes, bound: bound)
            let t2 = monotonicNanoseconds()
            phase = "destination load"
            report.destinationPath += try destination.transition(to: .running).dropFirst()
            report.stopTransitionNanoseconds = t1 - stopStart
            report.stopCopyDataNanoseconds = t2 - t1
            report.destinationLoadNanoseconds = monotonicNanoseconds() - t2
        } catch {
            var recovered = false
            if let st = try? source.state() {
                if st == .running { recovered = true }
                else if (try? source.transition(to: .running)) != nil { recovered = true }
            }
            if !recovered, (try? source.reset()) != nil, (try? source.state()) == .running { recovered = true }
            try? destination.reset()
            throw DeviceTransferError.failed(phase: phase, underlying: "\(error)", sourceRecovered: recovered)
        }
        report.stopCopyNanoseconds = monotonicNanoseconds() - stopStart
        // Off the downtime path: the source's session ends (STOP_COPY→STOP).
        report.sourcePath += (try? source.transition(to: .stop).dropFirst()) ?? []
        report.totalNanoseconds = monotonicNanoseconds() - start
        return report
    }
}
