import Glibc
import LiveUpdate
import Machine
import Migration
import SystemCalls
import VFIOUser

/// Live update from QMP: `migrate` in mode cpr-transfer / cpr-exec (QEMU's interface), and
/// `x-vfio-live-update`, which can also start the new VMM itself.
extension VirtualMachineManager {
    /// The cpr channel of a `migrate` command: `uri` "unix:PATH", or QEMU's `channels` list
    /// with a channel of type "cpr". cpr-exec has none.
    func cprChannel(_ a: JSONValue?) throws -> String? {
        if case let .array(chs)? = a?["channels"] {
            for c in chs where c["channel-type"] == .string("cpr") {
                guard c["addr"]?["transport"] == .string("socket"), c["addr"]?["type"] == .string("unix"),
                      case let .string(p)? = c["addr"]?["path"] else { throw QMPError("bad cpr channel address; must be unix") }
                return p
            }
            if withLock({ cprMode }) == .transfer { throw QMPError("missing 'cpr' migration channel") }
        }
        if case let .string(u)? = a?["uri"] { return try unixPath(u) }
        return nil
    }

    func unixPath(_ uri: String) throws -> String {
        guard uri.hasPrefix("unix:"), uri.count > 5 else { throw QMPError("bad cpr channel address '\(uri)'; must be unix:PATH") }
        return String(uri.dropFirst(5))
    }

    /// The command line for a successor: this VMM's own (or `command`), without any
    /// --incoming option, and with `extra` appended.
    func successorCommand(_ command: [String]?, extra: [String]) -> [String] {
        var argv = command ?? ([ChildProcess.currentExecutable()] + commandLine.dropFirst())
        var out: [String] = [argv.removeFirst()]
        var skip = false
        for a in argv {
            if skip { skip = false; continue }
            if a == "--incoming" { skip = true; continue }
            if a.hasPrefix("--incoming=") { continue }
            out.append(a)
        }
        return out + extra
    }

    /// Start a live update. Blockers are checked now (a QMP error names them); the handover runs
    /// on the migration thread, observable through query-migrate.
    public func startLiveUpdate(mode: LiveUpdateMode, to path: String?, command: [String]?) throws {
        guard runState == .running else { throw QMPError("a live update needs a running VM (state \(runState.rawValue))") }
        let src = LiveUpdateSource(vm: vm)
        src.optOut = liveUpdateOptOut
        src.participants = liveUpdateParticipants
        let blockers = src.blockers()
        guard blockers.isEmpty else { throw QMPError("live update blocked: \(blockers.joined(separator: "; "))") }
        if let q = qmp {
            src.extraEntries = [CPRState.Entry(name: CPRNames.qmpListener, id: 0, fd: q.listenerFD)]
            src.extraRecords = [(CPRNames.qmpPath, Array(q.path.utf8))]
        }
        if let hook = liveUpdateFaultForTesting { src.beforeStep = hook }
        let s = MigrationStats()
        s.onStatus = { [weak self] st in self?.qmp?.emit("MIGRATION", data: .object([("status", .string(st.rawValue))])) }
        // Checked and claimed under one lock: two QMP clients cannot both start an update.
        try withLock {
            guard !liveUpdateInProgress else { throw QMPError("a live update is already in progress") }
            liveUpdateInProgress = true; liveUpdateReport = nil
        }
        replaceStats(s)
        s.set(.setup)
        let spawnPath = "/tmp/vfio-live-cpr-\(getpid()).sock"
        let thread = OSThread(name: "live-update") { [self] in
            defer { withLock { liveUpdateInProgress = false } }
            do {
                switch mode {
                case .transfer:
                    let sock: UnixSocket
                    if let path { sock = try connectCPR(path, child: nil) } else {
                        let argv = successorCommand(command, extra: ["--incoming", "cpr:unix:\(spawnPath)"])
                        unlink(spawnPath)
                        let pid = try ChildProcess.spawn(argv[0], argv)
                        Log.info("vmm", "started the new VMM (pid \(pid)): \(argv.joined(separator: " "))")
                        sock = try connectCPR(spawnPath, child: pid)
                    }
                    defer { sock.close() }
                    s.set(.active)
                    let r = try src.transfer(over: sock)
                    withLock { liveUpdateReport = r }
                    s.set(.completed)
                    set(.postmigrate)
                    qmp?.emit("STOP")
                    if r.qmpAdopted { qmp?.relinquishListener() }
                    Log.info("vmm", "live update (cpr-transfer) completed: blackout \(formatFixed(Double(r.blackoutNS) / 1e6, 2)) ms; pid \(r.successorPID) runs the VM; this VMM exits")
                    usleep(1_500_000)
                    onExit?(0)
                case .exec:
                    let argv = successorCommand(command, extra: [])
                    s.set(.active)
                    Log.info("vmm", "live update (cpr-exec): exec \(argv[0])")
                    fflush(stdout)
                    try src.exec(binary: argv[0], argv: argv)
                }
            } catch {
                Log.error("vmm", "live update failed, the VM runs on here: \(error)")
                s.set(.failed, error: "\(error)")
            }
        }
        _ = thread
    }

    /// Connect to the new VMM's cpr socket, waiting for it to listen (a spawned child may take
    /// a moment, and may die first: say so).
    private func connectCPR(_ path: String, child: pid_t?) throws -> UnixSocket {
        let deadline = monotonicNanoseconds() + 20_000_000_000
        while true {
            if let s = try? UnixSocket.connect(path: path) { return s }
            if let pid = child, let st = ChildProcess.exitStatus(pid) {
                throw CPRError.channel("the new VMM (pid \(pid)) exited with status \(st) before listening on \(path)")
            }
            if monotonicNanoseconds() > deadline { throw CPRError.channel("nothing listens on \(path) (start the new VMM with --incoming cpr:unix:\(path))") }
            usleep(5_000)
        }
    }

    /// A VMM that took the VM over by live update: running, with the update's report.
    public func adoptedByLiveUpdate(_ r: LiveUpdateReport) {
        let s = MigrationStats()
        s.set(.completed)
        replaceStats(s)
        withLock { liveUpdateReport = r }
        set(.running)
    }
}
