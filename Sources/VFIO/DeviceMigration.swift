import SystemCalls

/// The VMM-side view of a device that migration code needs, whatever the transport
/// (vfio-user or kernel VFIO): region access for the v1 region, and the v2 feature calls.
public protocol MigrationDeviceHandle: AnyObject {
    /// Index, size and whether an mmap'd data section is offered, of the region with this type cap.
    func findRegion(type: UInt32, subtype: UInt32) throws -> (index: UInt32, size: UInt64)?
    func regionRead(_ index: UInt32, offset: UInt64, count: Int) throws -> [UInt8]
    func regionWrite(_ index: UInt32, offset: UInt64, _ data: [UInt8]) throws
    func migrationCapabilities() throws -> MigrationCapabilities?
    func migrationState() throws -> MigrationState
    func setMigrationState(_ s: MigrationState) throws
    func readMigrationData(max: Int) throws -> [UInt8]
    func writeMigrationData(_ data: UnsafeRawBufferPointer) throws
    func migrationDataSize() throws -> UInt64
    /// DEVICE_RESET: the only way out of ERROR, and the only way to abort RESUMING.
    func resetDevice() throws
    /// VFIO_MIG_GET_PRECOPY_INFO on the data session (PRE_COPY and PRE_COPY_P2P only): what is
    /// left of the initial image and what was dirtied since. Nil when the transport has no
    /// such query (vfio-user).
    func preCopyInfo() throws -> (initialBytes: UInt64, dirtyBytes: UInt64)?
}

extension MigrationDeviceHandle {
    public func preCopyInfo() throws -> (initialBytes: UInt64, dirtyBytes: UInt64)? { nil }
}

public enum MigrationProtocol: String, Sendable, CustomStringConvertible {
    case v1, v2
    public var description: String { rawValue }
}

public enum DeviceMigrationError: Error, CustomStringConvertible {
    case notMigratable
    case protocolUnavailable(MigrationProtocol)
    case refused(from: MigrationState, to: MigrationState, reason: String)
    case v1(String)
    /// Every read came back full past `bound` bytes: a device whose data never ends (a read
    /// that is never short) would keep pre-copy or stop-copy going forever.
    case dataDidNotEnd(moved: UInt64, bound: UInt64)

    public var description: String {
        switch self {
        case .notMigratable: return "VFIO device doesn't support migration (QEMU's words): it offers neither migration v2 (DEVICE_FEATURE MIGRATION) nor a v1 migration region"
        case let .protocolUnavailable(p): return "device does not offer migration \(p)"
        case let .refused(f, t, r): return "device refused \(f)→\(t): \(r)"
        case let .v1(s): return "migration v1: \(s)"
        case let .dataDidNotEnd(m, b):
            return "the device's migration data did not end: \(m) bytes read with every read full, past the bound of \(b) bytes " +
                "(twice the size it announced plus \(DeviceMigration.dataSlack >> 20) MiB; \(DeviceMigration.unannouncedDataBound >> 30) GiB if it announces none)"
        }
    }
}

/// Drives a device's migration through either protocol. Prefers v2 when both are offered.
/// v1 (the seed's region protocol) is mapped onto the same states: RUNNING 001, PRE_COPY 011,
/// STOP_COPY 010, STOP 000, RESUMING 100.
public final class DeviceMigration {
    public let device: MigrationDeviceHandle
    public let proto: MigrationProtocol
    public let capabilities: MigrationCapabilities
    private let v1Region: UInt32?
    /// Offsets inside `struct vfio_device_migration_info`.
    enum V1 { static let deviceState: UInt64 = 0, pendingBytes: UInt64 = 8, dataOffset: UInt64 = 16, dataSize: UInt64 = 24 }
    /// Every state this object moved the device through (for reports).
    public private(set) var statesVisited: [MigrationState] = []
    /// For each entry of `statesVisited`, its place in one process-wide sequence: the order
    /// of states across devices (tests check QEMU's P2P order with it).
    public private(set) var visitSequence: [UInt64] = []
    private static let sequenceLock = Mutex()
    nonisolated(unsafe) private static var nextSequence: UInt64 = 0
    private func record(_ states: ArraySlice<MigrationState>) {
        for s in states {
            statesVisited.append(s)
            visitSequence.append(Self.sequenceLock.withLock { Self.nextSequence += 1; return Self.nextSequence })
        }
    }

    /// Whether the device offers the P2P states (RUNNING_P2P, and PRE_COPY_P2P with PRE_COPY).
    public var supportsP2P: Bool { capabilities.contains(.p2p) }

    public init(device: MigrationDeviceHandle, prefer: MigrationProtocol? = nil) throws {
        self.device = device
        let v2caps = try? device.migrationCapabilities()
        let v1 = try? device.findRegion(type: 3, subtype: 1)
        switch prefer {
        case .v2?:
            guard let c = v2caps ?? nil else { throw DeviceMigrationError.protocolUnavailable(.v2) }
            proto = .v2; capabilities = c; v1Region = nil
        case .v1?:
            guard let r = v1 ?? nil else { throw DeviceMigrationError.protocolUnavailable(.v1) }
            proto = .v1; capabilities = [.stopCopy, .preCopy]; v1Region = r.index
        case nil:
            if let c = v2caps ?? nil { proto = .v2; capabilities = c; v1Region = nil }
            else if let r = v1 ?? nil { proto = .v1; capabilities = [.stopCopy, .preCopy]; v1Region = r.index }
            else { throw DeviceMigrationError.notMigratable }
        }
    }

    public func state() throws -> MigrationState {
        switch proto {
        case .v2: return try device.migrationState()
        case .v1:
            let raw = try readU32(V1.deviceState)
            guard let s = MigrationV1State(rawValue: raw).v2 else { throw DeviceMigrationError.v1("device_state \(raw) is invalid") }
            return s
        }
    }

    /// Move to `target`. The path is computed with the kernel's algorithm first, so that a
    /// forbidden request (STOP_COPY→PRE_COPY) never reaches the device.
    @discardableResult
    public func transition(to target: MigrationState) throws -> [MigrationState] {
        let from = try state()
        let path: [MigrationState]
        do { path = try MigrationFSM.path(from: from, to: target, capabilities: capabilities) } catch {
            throw DeviceMigrationError.refused(from: from, to: target, reason: "\(error)")
        }
        guard path.count > 1 else { return path }
        switch proto {
        case .v2:
            do { try device.setMigrationState(target) } catch {
                throw DeviceMigrationError.refused(from: from, to: target, reason: "\(error)")
            }
        case .v1:
            // v1 has no multi-step requests: write each arc's bits, read-modify-write to keep
            // the reserved bits.
            for (a, b) in zip(path, path.dropFirst()) {
                guard let bits = MigrationV1State(v2: b) else { throw DeviceMigrationError.v1("state \(b) has no v1 encoding") }
                let cur = try readU32(V1.deviceState)
                do { try writeU32(V1.deviceState, (cur & ~MigrationV1State.mask) | bits.rawValue) } catch {
                    throw DeviceMigrationError.refused(from: a, to: b, reason: "\(error)")
                }
            }
        }
        record(statesVisited.last == path.first ? path.dropFirst() : path[...])
        return path
    }

    /// Next data of the saving stream; empty means "nothing more now" (PRE_COPY) or the end
    /// (STOP_COPY). v1 returns one source chunk per call, which `write` must keep as a unit.
    public func read(max: Int) throws -> [UInt8] {
        switch proto {
        case .v2: return try device.readMigrationData(max: max)
        case .v1:
            guard try readU64(V1.pendingBytes) > 0 else { return [] }
            let off = try readU64(V1.dataOffset)
            let size = try readU64(V1.dataSize)
            guard size <= 64 << 20 else { throw DeviceMigrationError.v1("data_size \(size) is implausibly large") }
            return try device.regionRead(v1Region!, offset: off, count: Int(size))
        }
    }

    public func write(_ data: UnsafeRawBufferPointer) throws {
        switch proto {
        case .v2: try device.writeMigrationData(data)
        case .v1:
            let off = try readU64(V1.dataOffset)
            try device.regionWrite(v1Region!, offset: off, Array(data))
            var w = [UInt8](repeating: 0, count: 8)
            var n = UInt64(data.count)
            for i in 0..<8 { w[i] = UInt8(n & 0xff); n >>= 8 }
            try device.regionWrite(v1Region!, offset: V1.dataSize, w)
        }
    }

    public func reset() throws { try device.resetDevice() }

    /// The P2P-quiesced state for a running device, as QEMU's VM-stop *prepare* handler picks
    /// it (hw/vfio/migration.c, vfio_vmstate_change_prepare): PRE_COPY → PRE_COPY_P2P, else
    /// RUNNING_P2P. Nil when the device has no P2P states or is not running (STOP stays).
    public func p2pQuiescedState() throws -> MigrationState? {
        guard supportsP2P else { return nil }
        switch try state() {
        case .preCopy, .preCopyP2P: return .preCopyP2P
        case .running, .runningP2P: return .runningP2P
        default: return nil
        }
    }

    /// VFIO_MIG_GET_PRECOPY_INFO (v2 kernel devices in a pre-copy state); nil otherwise.
    public func preCopyInfo() -> (initialBytes: UInt64, dirtyBytes: UInt64)? {
        guard proto == .v2 else { return nil }
        return (try? device.preCopyInfo()) ?? nil
    }

    /// Move every device to `target` in QEMU's order for a VM run-state change
    /// (vm_state_notify calls every *prepare* handler before any main handler): first every
    /// P2P-capable device to its P2P-quiesced state (stopping: RUNNING_P2P / PRE_COPY_P2P;
    /// starting from STOP: RUNNING_P2P), then each to `target`. Devices without P2P have no
    /// prepare handler in QEMU and go straight to `target`. Returns each device's error (nil:
    /// it reached `target`, or, for STOP_COPY after another device failed, was not taken
    /// further); a device that fails stays where it was left, for the caller.
    @discardableResult
    public static func transitionAll(_ ms: [DeviceMigration], to target: MigrationState) -> [Error?] {
        var errors = [Error?](repeating: nil, count: ms.count)
        if target == .stopCopy || target == .stop || target == .running {
            for (i, m) in ms.enumerated() where m.supportsP2P {
                guard let cur = try? m.state(), cur != target else { continue }
                let p2p: MigrationState?
                switch (cur, target) {
                // Stopping (QEMU's prepare handler): PRE_COPY → PRE_COPY_P2P, RUNNING → RUNNING_P2P.
                case (.preCopy, .stop), (.preCopy, .stopCopy): p2p = .preCopyP2P
                case (.running, .stop), (.running, .stopCopy): p2p = .runningP2P
                // Starting (vm_start's prepare): STOP, STOP_COPY (the kernel walks it through
                // STOP) and PRE_COPY_P2P go to RUNNING_P2P first. PRE_COPY → RUNNING is one arc
                // (QEMU's MIG_EVENT_PRECOPY_FAILED handler asks for RUNNING directly).
                case (.stop, .running), (.stopCopy, .running), (.preCopyP2P, .running): p2p = .runningP2P
                default: p2p = nil
                }
                if let p = p2p {
                    do { try m.transition(to: p) } catch { errors[i] = error }
                }
            }
        }
        // Going to STOP_COPY, one device that could not quiesce ends the switch-over: no other
        // device is taken further (the caller rolls every device back to RUNNING).
        if target == .stopCopy && errors.contains(where: { $0 != nil }) { return errors }
        for (i, m) in ms.enumerated() where errors[i] == nil {
            do { try m.transition(to: target) } catch { errors[i] = error }
        }
        return errors
    }

    /// What one read of the data to its end (a pre-copy round, or stop-copy) may move beyond
    /// the device's announced size (MIG_DATA_SIZE / pending_bytes, an estimate): below it no
    /// size is asked for at all.
    public static let dataSlack: UInt64 = 256 << 20
    /// The bound when the device announces no size.
    public static let unannouncedDataBound: UInt64 = 16 << 30

    /// The most one read of the data to its end may move, from the size the device announced
    /// (nil: none): twice it plus `dataSlack` (saturating), so that an estimate that is low is
    /// not an error, while a device whose reads are never short ends the migration (QEMU has
    /// no such bound: its save loop reads until a read returns 0).
    public static func dataBound(announced: UInt64?) -> UInt64 {
        guard let a = announced else { return unannouncedDataBound }
        let (twice, o1) = a.multipliedReportingOverflow(by: 2)
        let (b, o2) = twice.addingReportingOverflow(dataSlack)
        return o1 || o2 ? .max : b
    }

    /// Bounds one read of the data to its end. The size is asked for only once `dataSlack`
    /// was moved (never on a normal device's downtime path), then counted from there.
    public struct DataBudget {
        private var bound: UInt64?
        public init() {}
        public mutating func check(moved: UInt64, device: DeviceMigration) throws {
            guard moved > DeviceMigration.dataSlack else { return }
            if bound == nil {
                let (b, o) = moved.addingReportingOverflow(DeviceMigration.dataBound(announced: device.stopCopySize()))
                bound = o ? .max : b
            }
            guard let b = bound, moved > b else { return }
            throw DeviceMigrationError.dataDidNotEnd(moved: moved, bound: b)
        }
    }

    public func stopCopySize() -> UInt64? {
        switch proto {
        case .v2: return try? device.migrationDataSize()
        case .v1: return try? readU64(V1.pendingBytes)
        }
    }

    private func readU32(_ off: UInt64) throws -> UInt32 {
        let b = try device.regionRead(v1Region!, offset: off, count: 4)
        return (0..<4).reduce(UInt32(0)) { $0 | UInt32(b[$1]) << (8 * UInt32($1)) }
    }
    private func readU64(_ off: UInt64) throws -> UInt64 {
        let b = try device.regionRead(v1Region!, offset: off, count: 8)
        return (0..<8).reduce(UInt64(0)) { $0 | UInt64(b[$1]) << (8 * UInt64($1)) }
    }
    private func writeU32(_ off: UInt64, _ v: UInt32) throws {
        try device.regionWrite(v1Region!, offset: off, (0..<4).map { UInt8(v >> (8 * UInt32($0)) & 0xff) })
    }
}
