/// The VFIO migration v2 device states (`enum vfio_device_mig_state`), numbered as the kernel does.
public enum MigrationState: UInt32, CaseIterable, CustomStringConvertible, Sendable {
    case error = 0
    case stop = 1
    case running = 2
    case stopCopy = 3
    case resuming = 4
    case runningP2P = 5
    case preCopy = 6
    case preCopyP2P = 7

    public var description: String {
        switch self {
        case .error: return "ERROR"
        case .stop: return "STOP"
        case .running: return "RUNNING"
        case .stopCopy: return "STOP_COPY"
        case .resuming: return "RESUMING"
        case .runningP2P: return "RUNNING_P2P"
        case .preCopy: return "PRE_COPY"
        case .preCopyP2P: return "PRE_COPY_P2P"
        }
    }

    /// Parse the kernel's spelling (`STOP_COPY`) or its abbreviations (`SC`, `R`, `RES`...).
    public init?(name: String) {
        let n = name.uppercased()
        let abbreviations: [String: MigrationState] = [
            "SC": .stopCopy, "R": .running, "RP": .runningP2P, "PC": .preCopy, "PCP": .preCopyP2P, "RES": .resuming,
        ]
        if let s = abbreviations[n] { self = s; return }
        guard let s = MigrationState.allCases.first(where: { $0.description == n }) else { return nil }
        self = s
    }

    /// States in the "saving group": a data session is open for reading.
    public var isSaving: Bool { self == .preCopy || self == .preCopyP2P || self == .stopCopy }
    /// States in which the device may do DMA and raise interrupts.
    public var isRunning: Bool { self == .running || self == .preCopy }
    /// States in which the device may still complete outstanding P2P but starts nothing new.
    public var isP2PQuiesced: Bool { self == .runningP2P || self == .preCopyP2P }
}

/// `VFIO_DEVICE_FEATURE_MIGRATION` flags.
public struct MigrationCapabilities: OptionSet, Hashable, CustomStringConvertible, Sendable {
    public let rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }
    public static let stopCopy = MigrationCapabilities(rawValue: 1 << 0)
    public static let p2p = MigrationCapabilities(rawValue: 1 << 1)
    public static let preCopy = MigrationCapabilities(rawValue: 1 << 2)

    public var description: String {
        var parts: [String] = []
        if contains(.stopCopy) { parts.append("STOP_COPY") }
        if contains(.p2p) { parts.append("P2P") }
        if contains(.preCopy) { parts.append("PRE_COPY") }
        return parts.isEmpty ? "none" : parts.joined(separator: "|")
    }
}

/// Why a requested transition cannot be made.
public enum MigrationTransitionError: Error, Equatable, CustomStringConvertible {
    case unsupportedState(MigrationState, MigrationCapabilities)
    case noPath(from: MigrationState, to: MigrationState)

    public var description: String {
        switch self {
        case let .unsupportedState(s, caps):
            return "state \(s) is not supported by a device with migration flags \(caps)"
        case let .noPath(from, to):
            return "no path from \(from) to \(to): the VFIO state machine forbids it"
        }
    }
}

/// The kernel's migration state machine (`vfio_mig_get_next_state()` in drivers/vfio/vfio_main.c),
/// with the guard against looping on STOP_COPY→PRE_COPY that the kernel lacks.
public enum MigrationFSM {
    private typealias S = MigrationState
    // vfio_from_fsm_table[cur][target], indexed by raw value (ERROR=0 … PRE_COPY_P2P=7).
    private static let table: [[S]] = {
        func row(_ stop: S, _ running: S, _ preCopy: S, _ preCopyP2P: S, _ stopCopy: S,
                 _ resuming: S, _ runningP2P: S) -> [S] {
            // ordered by raw target value: ERROR, STOP, RUNNING, STOP_COPY, RESUMING, RUNNING_P2P, PRE_COPY, PRE_COPY_P2P
            [.error, stop, running, stopCopy, resuming, runningP2P, preCopy, preCopyP2P]
        }
        var t = [[S]](repeating: [S](repeating: .error, count: 8), count: 8)
        t[Int(S.stop.rawValue)] = row(.stop, .runningP2P, .runningP2P, .runningP2P, .stopCopy, .resuming, .runningP2P)
        t[Int(S.running.rawValue)] = row(.runningP2P, .running, .preCopy, .runningP2P, .runningP2P, .runningP2P, .runningP2P)
        t[Int(S.preCopy.rawValue)] = row(.running, .running, .preCopy, .preCopyP2P, .preCopyP2P, .running, .running)
        t[Int(S.preCopyP2P.rawValue)] = row(.runningP2P, .runningP2P, .preCopy, .preCopyP2P, .stopCopy, .runningP2P, .runningP2P)
        t[Int(S.stopCopy.rawValue)] = row(.stop, .stop, .error, .error, .stopCopy, .stop, .stop)
        t[Int(S.resuming.rawValue)] = row(.stop, .stop, .stop, .stop, .stop, .resuming, .stop)
        t[Int(S.runningP2P.rawValue)] = row(.stop, .running, .running, .preCopyP2P, .stop, .stop, .runningP2P)
        return t
    }()

    /// The capabilities a state needs (`state_flags_table`); ERROR is never supported.
    public static func isSupported(_ state: MigrationState, by caps: MigrationCapabilities) -> Bool {
        let needed: MigrationCapabilities
        switch state {
        case .error: return false
        case .stop, .running, .stopCopy, .resuming: needed = [.stopCopy]
        case .runningP2P: needed = [.stopCopy, .p2p]
        case .preCopy: needed = [.stopCopy, .preCopy]
        case .preCopyP2P: needed = [.stopCopy, .p2p, .preCopy]
        }
        return caps.isSuperset(of: needed)
    }

    /// The next single arc from `current` toward `target`.
    public static func nextState(from current: MigrationState, to target: MigrationState,
                                 capabilities caps: MigrationCapabilities) throws -> MigrationState {
        guard isSupported(current, by: caps) else { throw MigrationTransitionError.unsupportedState(current, caps) }
        guard isSupported(target, by: caps) else { throw MigrationTransitionError.unsupportedState(target, caps) }
        var next = table[Int(current.rawValue)][Int(target.rawValue)]
        // The kernel loops `while (!supported(next))`; when `next` is ERROR that never ends
        // (STOP_COPY→PRE_COPY on a PRE_COPY device). Stop at ERROR and refuse instead.
        while next != .error && !isSupported(next, by: caps) {
            next = table[Int(next.rawValue)][Int(target.rawValue)]
        }
        guard next != .error else { throw MigrationTransitionError.noPath(from: current, to: target) }
        return next
    }

    /// The whole path of states from `current` to `target`, both ends included.
    public static func path(from current: MigrationState, to target: MigrationState,
                            capabilities caps: MigrationCapabilities) throws -> [MigrationState] {
        var path = [current]
        var s = current
        while s != target {
            s = try nextState(from: s, to: target, capabilities: caps)
            path.append(s)
            if path.count > 8 { throw MigrationTransitionError.noPath(from: current, to: target) }
        }
        return path
    }

    /// A single arc the device itself must implement (a direct edge of the graph).
    public static func isArc(from: MigrationState, to: MigrationState, capabilities caps: MigrationCapabilities) -> Bool {
        guard from != to, let n = try? nextState(from: from, to: to, capabilities: caps) else { return false }
        return n == to
    }
}

/// Migration v1 `device_state` bits (the deprecated region protocol).
public struct MigrationV1State: OptionSet, Hashable, CustomStringConvertible, Sendable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    public static let running = MigrationV1State(rawValue: 1 << 0)
    public static let saving = MigrationV1State(rawValue: 1 << 1)
    public static let resuming = MigrationV1State(rawValue: 1 << 2)
    public static let mask: UInt32 = 0x7
    public static let stop = MigrationV1State([])
    public static let error = MigrationV1State([.saving, .resuming])

    /// `VFIO_DEVICE_STATE_VALID`: RESUMING only alone.
    public var isValid: Bool {
        let s = rawValue & Self.mask
        return s & Self.resuming.rawValue != 0 ? s == Self.resuming.rawValue : true
    }
    public var isError: Bool { rawValue & Self.mask == Self.error.rawValue }

    /// The v2 state this v1 bit pattern corresponds to (nil for invalid patterns).
    public var v2: MigrationState? {
        switch rawValue & Self.mask {
        case 0: return .stop
        case 1: return .running
        case 2: return .stopCopy
        case 3: return .preCopy
        case 4: return .resuming
        case 6: return .error
        default: return nil
        }
    }

    public init?(v2 state: MigrationState) {
        switch state {
        case .stop: self = .stop
        case .running: self = .running
        case .stopCopy: self = .saving
        case .preCopy: self = [.running, .saving]
        case .resuming: self = .resuming
        case .error: self = .error
        default: return nil
        }
    }

    public var description: String {
        let v = rawValue & Self.mask
        let bits = "\(v & 4 != 0 ? 1 : 0)\(v & 2 != 0 ? 1 : 0)\(v & 1 != 0 ? 1 : 0)"
        return v2.map { "\(bits)b (\($0))" } ?? "\(bits)b (invalid)"
    }
}
