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

    /// Start a live update. The VM is claimed first (refused during a migration, another live
    /// update or quit, and unless it runs), then blockers are checked and the new binary is
    /// probed (`CPRProbe`), all before anything is touched; a QMP error names the reason. The
    /// handover runs on its own thread, observable through query-migrate; the claim ends with
    /// it, whatever happens.
    public func startLiveUpdate(mode: LiveUpdateMode, to path: String?, command: [String]?) throws {
        try claim(.liveUpdate, "live update", allowed: [.running])
        var handedToThread = false
        defer { if !handedToThread { release(.liveUpdate) } }
        let src = LiveUpdateSource(vm: vm)
        src.optOut = liveUpdateOptOut
        src.participants = liveUpdateParticipants
        let blockers = src.blockers()
        guard blockers.isEmpty else { throw QMPError("live update blocked: \(blockers.joined(separator: "; "))") }
        let spawns = mode == .exec || path == nil
        let argv = successorCommand(command, extra: mode == .transfer && path == nil ? ["--incoming", "cpr:unix:\(spawnPath)"] : [])
        let peerMS = withLock { parameters.peerTimeoutMS }
        if spawns {
            // An operator who raised the peer timeout for a slow machine (the TCG lab: a debug
            // binary took more than the default 15 s to start) gives the probe as long.
            let bound = Int32(clamping: max(UInt64(CPRProbe.defaultTimeoutMilliseconds), peerMS))
            do { try CPRProbe.check(binary: argv[0], timeoutMilliseconds: bound) } catch { throw QMPError("\(error); the VM runs on here") }
        }
        if let q = qmp {
            src.extraEntries = [CPRState.Entry(name: CPRNames.qmpListener, id: 0, fd: q.listenerFD)]
            src.extraRecords = [(CPRNames.qmpPath, Array(q.path.utf8))]
            // The successor accepts on the listener from GO on: this VMM stops just before, so
            // that a new client never lands here as the VM leaves (and again if it stays).
            src.willCommit = { [weak q] in q?.pauseAccepting() }
            src.tookBack = { [weak q] in q?.resumeAccepting() }
        }
        if let hook = liveUpdateFaultForTesting { src.beforeStep = hook }
        let peer: Int32 = peerMS == 0 ? -1 : Int32(clamping: peerMS)
        src.timeoutMilliseconds = peer
        let s = MigrationStats()
        s.onStatus = { [weak self] st in self?.qmp?.emit("MIGRATION", data: .object([("status", .string(st.rawValue))])) }
        withLock { liveUpdateReport = nil }
        replaceStats(s)
        s.set(.setup)
        let update: () -> Void = { [self] in
            var child: pid_t?
            do {
                switch mode {
                case .transfer:
                    let sock: UnixSocket
                    if let path { sock = try connectCPR(path, child: nil) } else {
                        unlink(spawnPath)
                        let pid = try ChildProcess.spawn(argv[0], argv, extraEnvironment: ["\(LiveUpdateTarget.parentVariable)=\(getpid())"])
                        child = pid
                        Log.info("vmm", "started the new VMM (pid \(pid)): \(argv.joined(separator: " "))")
                        sock = try connectCPR(spawnPath, child: pid)
                    }
                    defer { sock.close() }
                    if peer > 0 { setSocketTimeouts(sock.fd, milliseconds: peer) }
                    s.set(.active)
                    let r = try src.transfer(over: sock)
                    withControl { withLock { liveUpdateReport = r }; set(.postmigrate) }
                    s.set(.completed)
                    release(.liveUpdate)
                    qmp?.emit("STOP")
                    if r.qmpAdopted { qmp?.relinquishListener() }
                    Log.info("vmm", "live update (cpr-transfer) completed: blackout \(formatFixed(Double(r.blackoutNS) / 1e6, 2)) ms; pid \(r.successorPID) runs the VM; this VMM exits")
                    usleep(1_500_000)
                    onExit?(0)
                case .exec:
                    s.set(.active)
                    Log.info("vmm", "live update (cpr-exec): exec \(argv[0])")
                    fflush(stdout)
                    // Before the guest pauses: the reply to the command that started this update
                    // (and the MIGRATION event) must reach QMP clients before exec replaces us.
                    qmp?.flushOutput(timeoutSeconds: 1)
                    try src.exec(binary: argv[0], argv: argv)
                }
            } catch {
                Log.error("vmm", "live update failed, the VM runs on here: \(error)")
                if let pid = child { reapSuccessor(pid) }
                if path == nil && mode == .transfer { unlink(spawnPath) }
                s.set(.failed, error: "\(error)")
                release(.liveUpdate)
            }
        }
        do { _ = try OSThread(name: "live-update", update) } catch {
            // Nothing was handed over: the VM runs on here.
            s.set(.failed, error: "\(error)")
            throw QMPError("cannot start the live update: \(error)")
        }
        handedToThread = true
    }

    /// Where a successor this VMM starts listens for it.
    var spawnPath: String { "/tmp/vfio-live-cpr-\(getpid()).sock" }

    /// A successor that failed ends by itself once told (ERROR, or our end closed); wait a
    /// moment for that, then kill it. Either way it is reaped: no zombie stays behind.
    private func reapSuccessor(_ pid: pid_t) {
        let deadline = monotonicNanoseconds() + 3_000_000_000
        while monotonicNanoseconds() < deadline {
            var st: Int32 = 0
            let r = waitpid(pid, &st, WNOHANG)
            if r == pid || (r < 0 && errno == ECHILD) { return }
            usleep(10_000)
        }
        Log.warning("vmm", "the failed new VMM (pid \(pid)) did not exit; killing it")
        kill(pid, SIGKILL)
        ChildProcess.wait(pid)
    }

    /// Connect to the new VMM's cpr socket, waiting for it to listen (a spawned child may take
    /// a moment, and may die first: say so). Bounded: 20 s, or the peer timeout if longer.
    private func connectCPR(_ path: String, child: pid_t?) throws -> UnixSocket {
        let limit = max(withLock { parameters.peerTimeoutMS }, 20_000)
        let deadline = monotonicNanoseconds() + limit * 1_000_000
        while true {
            if let s = try? UnixSocket.connect(path: path) { return s }
            if let pid = child, let st = ChildProcess.exitStatus(pid) {
                throw CPRError.channel("the new VMM (pid \(pid)) exited with status \(st) before listening on \(path)")
            }
            if monotonicNanoseconds() > deadline {
                throw CPRError.channel("nothing listens on \(path) after \(limit) ms (start the new VMM with --incoming cpr:unix:\(path))")
            }
            usleep(5_000)
        }
    }

    /// A VMM that took the VM over by live update: running, with the update's report.
    public func adoptedByLiveUpdate(_ r: LiveUpdateReport) {
        let s = MigrationStats()
        s.set(.completed)
        replaceStats(s)
        withLock { liveUpdateReport = r }
        markRunningAfterTakeover()
    }
}
