import Glibc
import LiveUpdate
import Machine
import Migration
import SystemCalls
import VFIO
import VFIOUser

/// One VMM process: a micro-VM, its devices, migration in either direction, and the QMP
/// commands that drive them. QEMU's run states are kept where they mean the same thing.
public final class VirtualMachineManager: QMPHandler, @unchecked Sendable {
    public enum RunState: String { case running, paused, inmigrate, postmigrate, finishMigrate = "finish-migrate", internalError = "internal-error" }

    public let vm: MicroVM
    public let policies: [DeviceMigrationPolicy]
    public var qmp: QMPServer?
    private let lock = Mutex()
    private var state: RunState
    public private(set) var parameters = MigrationParameters()
    private var outgoing: MigrationSource?
    public private(set) var stats = MigrationStats()
    private var migrationThread: OSThread?
    /// Checksums of each device's memory (BAR4) when it stopped (source) or loaded (destination).
    public private(set) var deviceDigests: [UInt64] = []
    /// Called when the process should end (migration completed, quit).
    public var onExit: ((Int32) -> Void)?
    public var exitAfterMigration = true
    /// The command line this VMM was started with (a live update's successor reuses it).
    public var commandLine: [String] = CommandLine.arguments
    /// Devices that opt out of live update (index → why).
    public var liveUpdateOptOut: [Int: String] = [:]
    /// Kernel VFIO containers and the like that a live update carries over.
    public var liveUpdateParticipants: [CPRParticipant] = []
    var cprMode: LiveUpdateMode?
    var cprExecCommand: [String]?
    /// The last live update's report (either side), for query-migrate.
    public internal(set) var liveUpdateReport: LiveUpdateReport?
    var liveUpdateInProgress = false
    /// Fault injection for tests: called at each step of an outgoing live update.
    public var liveUpdateFaultForTesting: ((String) throws -> Void)?

    public init(vm: MicroVM, policies: [DeviceMigrationPolicy], incoming: Bool) {
        self.vm = vm
        self.policies = policies
        state = incoming ? .inmigrate : .paused
    }

    public var runState: RunState { lock.withLock { state } }

    func set(_ s: RunState) { lock.withLock { state = s } }
    func withLock<T>(_ body: () throws -> T) rethrows -> T { try lock.withLock(body) }
    func replaceStats(_ s: MigrationStats) { lock.withLock { stats = s } }

    /// Start running (a fresh VM).
    public func boot() {
        vm.start()
        vm.resume()
        set(.running)
    }

    /// Checksum of each device's memory through its read-only mmap'd view.
    func digestDevices() -> [UInt64] {
        vm.devices.map { d in
            guard let m = try? d.client.mapRegion(4), let a = m.areas.first else { return 0 }
            return Checksum.of(UnsafeRawBufferPointer(start: a.memory.base, count: Int(a.size)))
        }
    }

    // MARK: migration

    public func startOutgoing(uri: String) throws {
        guard runState == .running || runState == .paused else { throw QMPError("migration needs a running or paused VM (state \(runState.rawValue))") }
        if let s = outgoing?.stats.status, s == .setup || s == .active || s == .device { throw QMPError("a migration is already in progress") }
        let address: SocketAddress
        do { address = try SocketAddress(uri: uri) } catch { throw QMPError("\(error)") }
        let sock: StreamSocket
        do { sock = try connectStream(address) } catch { throw QMPError("cannot connect to \(address): \(error)") }
        let newStats = MigrationStats()
        newStats.onStatus = { [weak self] s in self?.migrationEvent(s) }
        let src: MigrationSource
        do { src = try MigrationSource(vm: vm, to: sock, parameters: parameters, policies: policies, stats: newStats) } catch {
            sock.fd.close()
            throw QMPError("\(error)")
        }
        src.onCompleted = { [weak self] in if let self { self.deviceDigests = self.digestDevices() } }
        lock.withLock { outgoing = src; stats = newStats }
        migrationThread?.join()
        migrationThread = OSThread(name: "migration") { [self] in
            do {
                try src.run()
                set(.postmigrate)
                qmp?.emit("STOP")
                Log.info("vmm", "migration completed: downtime \(formatMS(src.stats.downtimeMS)), \(src.stats.iterations) iterations; the source stops")
                // Leave QMP clients a moment to read the final query-migrate, then exit.
                if exitAfterMigration { usleep(1_500_000); onExit?(0) }
            } catch {
                set(.running)
            }
        }
    }

    private func migrationEvent(_ s: MigrationStats.Status) {
        qmp?.emit("MIGRATION", data: .object([("status", .string(s.rawValue))]))
        if s == .device { set(.finishMigrate) }
    }

    /// Accept one incoming migration on `uri` (tcp:HOST:PORT or unix:PATH), in the background.
    public func startIncoming(uri: String) throws {
        let address: SocketAddress
        do { address = try SocketAddress(uri: uri) } catch { throw QMPError("\(error)") }
        let accept: () throws -> StreamSocket?
        let close: () -> Void
        let shown: String
        switch address {
        case let .tcp(host, port):
            let l: TCPListener
            do { l = try TCPListener(host: host, port: port) } catch { throw QMPError("cannot listen on \(address): \(error)") }
            accept = { try l.accept() }; close = { l.close() }; shown = "tcp:\(host):\(l.port)"
        case let .unix(path):
            let l: UnixListener
            do { l = try UnixListener(path: path) } catch { throw QMPError("cannot listen on \(address): \(error)") }
            accept = { try l.accept() }; close = { l.close() }; shown = "unix:\(path)"
        }
        vm.start()
        set(.inmigrate)
        Log.info("vmm", "waiting for an incoming migration on \(shown)")
        migrationThread = OSThread(name: "incoming") { [self] in
            defer { close() }
            do {
                guard let s = try accept() else { return }
                let d = try MigrationDestination(vm: vm, from: s)
                d.stats.onStatus = { [weak self] st in self?.migrationEvent(st) }
                d.afterDevicesLoaded = { [weak self] in if let self { self.deviceDigests = self.digestDevices() } }
                lock.withLock { stats = d.stats }
                try d.run()
                set(.running)
                qmp?.emit("RESUME")
                Log.info("vmm", "incoming migration completed; the guest runs here")
            } catch {
                Log.error("vmm", "incoming migration failed: \(error)")
                set(.internalError)
                onExit?(1)
            }
        }
    }

    // MARK: QMP

    public func execute(_ command: String, arguments a: JSONValue?) throws -> JSONValue {
        switch command {
        case "query-status":
            let s = runState
            return .object([("status", .string(s.rawValue)), ("singlestep", .bool(false)), ("running", .bool(s == .running))])
        case "stop":
            guard runState == .running else { return .object([]) }
            vm.pause()
            for d in vm.devices { try? d.client.setMigrationState(.stop) }
            set(.paused)
            qmp?.emit("STOP")
            return .object([])
        case "cont":
            guard runState == .paused else {
                if runState == .running { return .object([]) }
                throw QMPError("cannot continue in state \(runState.rawValue)")
            }
            for d in vm.devices { try? d.client.setMigrationState(.running) }
            vm.resume()
            set(.running)
            qmp?.emit("RESUME")
            return .object([])
        case "migrate":
            if let mode = lock.withLock({ cprMode }) {
                try startLiveUpdate(mode: mode, to: try cprChannel(a), command: lock.withLock { cprExecCommand })
                return .object([])
            }
            guard case let .string(uri)? = a?["uri"] else { throw QMPError("Parameter 'uri' is missing") }
            try startOutgoing(uri: uri)
            return .object([])
        case "x-vfio-live-update":
            guard case let .string(m)? = a?["mode"], let mode = LiveUpdateMode(rawValue: m) else {
                throw QMPError("'mode' must be cpr-transfer or cpr-exec")
            }
            var to: String?
            if case let .string(u)? = a?["to"] { to = try unixPath(u) }
            var command: [String]?
            if case let .string(b)? = a?["binary"] { command = [b] + commandLine.dropFirst() }
            try startLiveUpdate(mode: mode, to: to, command: command)
            return .object([])
        case "migrate-incoming":
            guard runState == .inmigrate || runState == .paused else { throw QMPError("migrate-incoming needs a VM started for incoming migration") }
            guard case let .string(uri)? = a?["uri"] else { throw QMPError("Parameter 'uri' is missing") }
            try startIncoming(uri: uri)
            return .object([])
        case "migrate_cancel", "migrate-cancel":
            outgoing?.cancel()
            return .object([])
        case "query-migrate":
            return queryMigrate()
        case "migrate-set-parameters":
            try lock.withLock {
                if let v = a?["downtime-limit"] { guard let n = v.uint64, n <= 2_000_000 else { throw QMPError("downtime-limit must be 0..2000000 ms") }; parameters.downtimeLimitMS = n }
                if let v = a?["max-bandwidth"] { guard let n = v.uint64 else { throw QMPError("max-bandwidth must be bytes per second") }; parameters.maxBandwidth = n }
                if let v = a?["x-max-iterations"] { guard let n = v.uint64, n > 0 else { throw QMPError("x-max-iterations must be positive") }; parameters.maxIterations = n }
                if let v = a?["cpu-throttle-initial"]?.uint64 { parameters.throttleInitial = min(max(v, 1), 99) }
                if let v = a?["cpu-throttle-increment"]?.uint64 { parameters.throttleIncrement = min(max(v, 1), 99) }
                if case let .string(m)? = a?["mode"] {
                    if m == "normal" { cprMode = nil } else {
                        guard let mode = LiveUpdateMode(rawValue: m) else { throw QMPError("mode must be normal, cpr-transfer or cpr-exec") }
                        cprMode = mode
                    }
                }
                if case let .array(list)? = a?["cpr-exec-command"] {
                    let argv = list.compactMap { v -> String? in if case let .string(s) = v { return s }; return nil }
                    guard !argv.isEmpty, argv.count == list.count else { throw QMPError("cpr-exec-command must be a non-empty list of strings") }
                    cprExecCommand = argv
                }
            }
            return .object([])
        case "query-migrate-parameters":
            let (p, mode) = lock.withLock { (parameters, cprMode) }
            return .object([("mode", .string(mode?.rawValue ?? "normal")), ("downtime-limit", .number(Double(p.downtimeLimitMS))), ("max-bandwidth", .number(Double(p.maxBandwidth))),
                            ("x-max-iterations", .number(Double(p.maxIterations))), ("cpu-throttle-initial", .number(Double(p.throttleInitial))),
                            ("cpu-throttle-increment", .number(Double(p.throttleIncrement)))])
        case "migrate-set-capabilities":
            guard case let .array(list)? = a?["capabilities"] else { throw QMPError("Parameter 'capabilities' is missing") }
            try lock.withLock {
                for c in list {
                    guard case let .string(name)? = c["capability"], let on = c["state"]?.boolValue else { throw QMPError("each capability needs 'capability' and 'state'") }
                    switch name {
                    case "auto-converge": parameters.autoConverge = on
                    case "x-allow-untracked-devices": parameters.allowUntrackedDevices = on
                    default: throw QMPError("capability '\(name)' is not supported (auto-converge, x-allow-untracked-devices)")
                    }
                }
            }
            return .object([])
        case "query-migrate-capabilities":
            let p = lock.withLock { parameters }
            return .array([.object([("capability", .string("auto-converge")), ("state", .bool(p.autoConverge))]),
                           .object([("capability", .string("x-allow-untracked-devices")), ("state", .bool(p.allowUntrackedDevices))])])
        case "x-vfio-live-verify":
            let r = vm.verify()
            return .object([("ok", .bool(r.ok)), ("pages", .number(Double(r.pagesChecked))), ("page-writes", .number(Double(r.pageWrites))),
                            ("dma-round-trips", .number(Double(r.dmaRoundsOK))), ("dma-errors", .number(Double(r.dmaErrors))),
                            ("violation", r.violations.first.map { .string($0) } ?? .null), ("mode", .string(vm.executionMode))])
        case "x-vfio-live-devices":
            return .array(vm.devices.enumerated().map { i, d in
                .object([("index", .number(Double(i))), ("interrupts", .number(Double(d.interrupts))),
                         ("digest", .string(i < deviceDigests.count ? String(deviceDigests[i], radix: 16) : ""))])
            })
        case "x-vfio-live-pid":
            return .object([("pid", .number(Double(getpid())))])
        case "quit":
            onExit?(0)
            return .object([])
        default:
            throw QMPError("The command \(command) has not been found", class: "CommandNotFound")
        }
    }

    func queryMigrate() -> JSONValue {
        let s = lock.withLock { stats }
        return s.snapshot { st in
            var o: [(String, JSONValue)] = []
            guard st.status != .none else { return .object([]) }
            o.append(("status", .string(st.status.rawValue)))
            o.append(("total-time", .number(st.totalTimeMS > 0 ? st.totalTimeMS.rounded() : Double((monotonicNanoseconds() - st.startNS) / 1_000_000))))
            o.append(("setup-time", .number(Double(st.setupNS / 1_000_000))))
            o.append(("expected-downtime", .number(Double(st.expectedDowntimeMS))))
            if st.status == .completed { o.append(("downtime", .number(st.downtimeMS.rounded()))) }
            o.append(("ram", .object([
                ("total", .number(Double(st.totalBytes))), ("transferred", .number(Double(st.transferredBytes))),
                ("remaining", .number(Double(st.remainingBytes))), ("duplicate", .number(Double(st.zeroPages))),
                ("normal", .number(Double(st.normalPages))), ("normal-bytes", .number(Double(st.ramBytes))),
                ("dirty-pages-rate", .number(Double(st.dirtyPagesRate))), ("mbps", .number((st.bandwidth * 8 / 1e6).rounded())),
                ("dirty-sync-count", .number(Double(st.iterations))), ("page-size", .number(4096)),
            ])))
            o.append(("vfio", .object([("transferred", .number(Double(st.deviceBytes.reduce(0, +))))])))
            o.append(("x-vfio-live", .object([
                ("iterations", .number(Double(st.iterations))), ("device-bytes", .array(st.deviceBytes.map { .number(Double($0)) })),
                ("throttle-percent", .number(Double(st.throttlePercent))), ("forced-switchover", .bool(st.forcedSwitchover)),
            ])))
            if let e = st.errorDescription { o.append(("error-desc", .string(e))) }
            if let r = liveUpdateReport, let j = try? JSONValue.parse(Array(r.json.utf8)[...]) { o.append(("x-vfio-live-cpr", j)) }
            return .object(o)
        }
    }
}

func formatMS(_ v: Double) -> String { "\(Int(v.rounded())) ms" }
