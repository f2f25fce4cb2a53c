import ArgumentParser
import Glibc
import SystemCalls
import VFIOUser

struct UpdateCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "update",
        abstract: "Live-update the VMM process of a running VM: a new VMM binary takes it over, devices kept live.",
        discussion: HelpText.reflow("""
            Guest RAM (a memfd), the devices, their interrupt eventfds and the QMP socket are
            passed to the new VMM as descriptors: a vfio-user device's connection; a kernel
            device's fd with its legacy container and group, or its iommufd. No page is copied,
            no device is reset, reconnected, re-probed or re-mapped, and device DMA goes on
            during the handoff. A legacy container drops its virtual addresses for the handoff
            (VFIO_DMA_UNMAP_FLAG_VADDR) and the new VMM gives its own (VFIO_DMA_MAP_FLAG_VADDR);
            iommufd maps guest RAM by file, so the new VMM only takes the pinned pages over
            (IOMMU_IOAS_CHANGE_PROCESS). A mediated device (mdev) in a legacy container blocks
            the update, as in QEMU (its VA must always be valid); attach it with iommufd=on.
            Only vCPU state and the VMM's own device state travel in the stream. The guest is
            paused for the blackout, which is measured and printed.

              --mode transfer   a second VMM process takes over (QEMU's cpr-transfer). Without
                                --to, the running VMM starts it itself, with its own command
                                line (or --binary), on the same QMP socket. With --to, hand over
                                to a VMM you started with --incoming cpr:unix:PATH.
              --mode exec       the VMM re-executes itself (or --binary) in place, keeping its
                                PID and descriptors (QEMU's cpr-exec).

            If anything fails before the new VMM commits (it dies, refuses the state, cannot
            exec), the old one takes the VM back and it keeps running; the reason is printed.
            What is printed is checked, never assumed: "keeps running in the old VMM" only when
            QMP answers with the old pid and query-status says running. A VMM that died (the old
            one killed mid-update, or the binary exec'd in its place exiting) is said to be gone.
            Progress is shown every 3 s; after --timeout the command fails, saying where the VM is.

            Example:
              vfio-live vm run --memory 1G --device vfio-user,socket=/tmp/dma.sock --qmp /tmp/vm.qmp &
              vfio-live update --qmp /tmp/vm.qmp --mode transfer
              vfio-live update --qmp /tmp/vm.qmp --mode exec --binary ./new-build/vfio-live
              vfio-live vm run --memory 1G --device vfio-pci,host=0000:00:04.0,iommufd=on --qmp /tmp/vm.qmp &
              vfio-live update --qmp /tmp/vm.qmp --mode transfer
            """))
    enum Mode: String, ExpressibleByArgument { case transfer, exec }

    @Option(help: "The running VM's QMP socket.")
    var qmp: String
    @Option(help: "transfer (a new VMM process) or exec (re-exec in place).")
    var mode: Mode = .transfer
    @Option(help: "The new VMM binary (default: the running VMM's own).")
    var binary: String?
    @Option(help: "transfer only: the cpr socket of a VMM started with --incoming cpr:unix:PATH (unix:PATH).")
    var to: String?
    @Option(parsing: .unconditional, help: "Seconds to wait for the outcome (progress is shown every 3 s); then the command fails, saying what it found.")
    var timeout = "60"
    @Option(parsing: .unconditional, help: "Seconds the VM's QMP socket may take to answer any command; a later reply to the update request itself (the VMM first checks the new binary) is still waited for, within --timeout.")
    var qmpTimeout = "10"
    @OptionGroup var global: GlobalOptions

    func validate() throws {
        try checkSocketPath(qmp, option: "--qmp")
        if mode == .exec && to != nil { throw ValidationError("--to is for --mode transfer; exec replaces the VMM in place") }
        if let t = to {
            guard t.hasPrefix("unix:") else { throw ValidationError("--to takes unix:PATH (got '\(t)')") }
            try checkUnixURI(t, option: "--to")
        }
        if let b = binary, access(b, X_OK) != 0 { throw ValidationError("--binary \(b) is not an executable file") }
        _ = try parseSeconds(timeout, option: "--timeout")
        _ = try parseSeconds(qmpTimeout, option: "--qmp-timeout")
    }

    func run() throws {
        global.apply()
        let bound = try parseSeconds(timeout, option: "--timeout")
        let c: QMPClient
        let qmpMS = Int32(try parseSeconds(qmpTimeout, option: "--qmp-timeout") * 1000)
        do { c = try QMPClient(path: qmp, timeoutMilliseconds: qmpMS) } catch { throw Failure("\(error)") }
        let pid0: Int32
        do {
            guard let p = try c.execute("x-vfio-live-pid")["pid"]?.uint64, p > 0, p <= UInt64(Int32.max) else {
                throw Failure("the VMM behind \(qmp) answers x-vfio-live-pid without a process id")
            }
            pid0 = Int32(p)
        } catch let e as QMPClientError {
            if case .refused = e { throw Failure("the VMM behind \(qmp) does not know x-vfio-live-pid: it is not a vfio-live VMM") }
            throw Failure("\(e)")
        }
        var args: [(String, JSONValue)] = [("mode", .string(mode == .transfer ? "cpr-transfer" : "cpr-exec"))]
        if let b = binary { args.append(("binary", .string(b))) }
        if let t = to { args.append(("to", .string(t))) }
        // What query-migrate says before: an earlier migration's or update's outcome (a VMM that
        // took the VM over in an update still reports that one), not this update's.
        let earlier = try? c.execute("query-migrate")
        var following: QMPClient? = c
        do {
            do {
                _ = try c.execute("x-vfio-live-update", args)
            } catch let QMPClientError.timeout(_, _, seconds) {
                // The VMM checks the new binary before it answers: the reply may come later.
                print("live update (\(mode.rawValue)): no reply within \(formatSeconds(seconds)) s; waiting up to \(formatSeconds(bound)) s more for it")
                fflush(stdout)
                _ = try c.lateReply(to: "x-vfio-live-update", seconds: bound)
            }
            print("live update (\(mode.rawValue)) started; the old VMM is pid \(pid0)")
        } catch let e as QMPClientError where e.isConnectionLost {
            // The command may have been taken and the reply lost with the connection (exec
            // replaces the process behind it): what happened is learnt, on a new connection,
            // not assumed.
            print("live update (\(mode.rawValue)): no reply to the command (\(e)); following what the VMM behind \(qmp) does")
            following = nil
        } catch let e as QMPClientError {
            print("live update refused: \(e)")
            print(Self.oldVMMState(qmp: qmp, client: c, pid: pid0))
            throw ExitCode(1)
        }
        fflush(stdout)
        // With the reply in hand every answer is this update's (the VMM resets query-migrate
        // before it replies); without it, an answer like the one before may be an earlier one's.
        switch Self.watch(qmp: qmp, client: following, oldPID: pid0, exec: mode == .exec, earlier: following == nil ? earlier : nil,
                          boundSeconds: bound, progress: true) {
        case let .completed(q):
            report(q["x-vfio-live-cpr"] ?? .null)
        case let .failed(why):
            print("live update failed: \(why)")
            print(Self.oldVMMState(qmp: qmp, client: nil, pid: pid0))
            throw ExitCode(1)
        case .oldVMMGone:
            print("live update failed: the old VMM (pid \(pid0)) is gone (killed or crashed during the update), and no VMM answers on \(qmp): the VM is lost")
            throw ExitCode(1)
        case .execSuccessorDied:
            print("live update failed: the VMM (pid \(pid0)) re-executed \(binary ?? "its binary"), which then exited without taking the VM over: the VM is lost (cpr-exec has no way back once exec succeeds)")
            throw ExitCode(1)
        case let .timedOut(status):
            print("live update: no outcome after \(formatSeconds(bound)) s (last status: \(status ?? "no answer"))")
            print(Self.oldVMMState(qmp: qmp, client: nil, pid: pid0))
            if let s = status, s == "setup" || s == "active" { print("the update is still in progress in the old VMM: it may yet hand the VM over or take it back") }
            throw ExitCode(1)
        }
    }

    func report(_ r: JSONValue) {
        let blackout = Double(r["blackout-ns"]?.uint64 ?? 0) / 1e6
        let pause = Double(r["pause-ns"]?.uint64 ?? 0) / 1e6
        print("live update completed")
        print("  mode:          \(mode == .transfer ? "cpr-transfer" : "cpr-exec")")
        print("  blackout:      \(formatFixed(blackout, 2)) ms (vCPUs paused in the old VMM → running in the new)\(pause > 0 ? "; pausing took \(formatFixed(pause, 2)) ms" : "")")
        print("  new VMM:       pid \(r["pid"]?.uint64 ?? 0)\(r["qmp-adopted"]?.boolValue == true ? ", serving QMP on \(qmp)" : "")")
        if case let .array(names)? = r["handed-over"] {
            let list = names.compactMap { v -> String? in if case let .string(s) = v { return s }; return nil }
            print("  handed over:   \(list.count) descriptors: \(list.joined(separator: ", "))")
        }
        print("  stream:        \(r["stream-bytes"]?.uint64 ?? 0) bytes (vCPUs and VMM device state; no RAM)")
    }

    enum Outcome {
        case completed(JSONValue)
        case failed(String)
        /// transfer: the old VMM died and nothing answers QMP.
        case oldVMMGone
        /// exec: the process that exec'd is dead.
        case execSuccessorDied
        case timedOut(lastStatus: String?)
    }

    /// Follow the live update started through `c` until it has an outcome, for at most
    /// `boundSeconds`. Reconnects when exec replaced the VMM behind the socket; watches the old
    /// VMM's process while QMP does not answer, so that its death is said as such. Answers that
    /// say what `earlier` (query-migrate before the update was asked for) said are an earlier
    /// migration's or update's outcome, until the status changes once.
    static func watch(qmp: String, client c: QMPClient?, oldPID: Int32, exec: Bool, earlier: JSONValue?,
                      boundSeconds: Double, progress: Bool) -> Outcome {
        var client: QMPClient? = c
        var changed = earlier == nil
        var lastStatus: String?
        let start = monotonicNanoseconds()
        let deadline = start + UInt64(boundSeconds * 1e9)
        var lastShown = start
        var silentSince: UInt64?
        while monotonicNanoseconds() < deadline {
            usleep(20_000)
            let now = monotonicNanoseconds()
            if client == nil { client = try? QMPClient(path: qmp, timeoutMilliseconds: 2000) }
            if let cl = client, let q = try? cl.execute("query-migrate") {
                silentSince = nil
                lastStatus = q["status"]?.stringValue
                if !changed, let e = earlier, ["status", "error-desc", "x-vfio-live-cpr"].allSatisfy({ q[$0] == e[$0] }) {
                    // Not this update's outcome (yet).
                } else {
                    changed = true
                    switch lastStatus {
                    case "failed"?, "cancelled"?: return .failed(q["error-desc"]?.stringValue ?? "no reason given (status \(lastStatus!))")
                    // The report is cleared when an update starts: a new one is this update's.
                    case "completed"? where q["x-vfio-live-cpr"] != nil: return .completed(q)
                    default: break
                    }
                }
            } else {
                client = nil
                silentSince = silentSince ?? now
                if !processIsAlive(oldPID) {
                    // exec keeps the pid: its death is the new image's. For transfer, a
                    // successor that committed serves the same QMP socket: give it a moment.
                    if exec { return .execSuccessorDied }
                    if now - silentSince! > 3_000_000_000 { return .oldVMMGone }
                }
            }
            if progress && now - lastShown >= 3_000_000_000 {
                lastShown = now
                let t = (now - start) / 1_000_000_000
                if silentSince != nil {
                    print("  waiting (\(t) s): nothing answers on \(qmp); the old VMM (pid \(oldPID)) is \(processIsAlive(oldPID) ? "alive" : "gone")")
                } else {
                    print("  waiting (\(t) s): status \(lastStatus ?? "none")")
                }
                fflush(stdout)
            }
        }
        return .timedOut(lastStatus: lastStatus)
    }

    /// Who has the VM after an update that did not complete, as checked (never assumed): the
    /// old VMM only if QMP answers with its pid and query-status says running.
    static func oldVMMState(qmp: String, client: QMPClient?, pid: Int32) -> String {
        guard let c = client ?? (try? QMPClient(path: qmp, timeoutMilliseconds: 3000)), let now = c.vmmPID() else {
            return processIsAlive(pid) ? "the old VMM (pid \(pid)) is alive but does not answer QMP on \(qmp): the VM's state is unknown"
                                       : "the old VMM (pid \(pid)) is gone and nothing answers QMP on \(qmp): the VM is lost"
        }
        let status = c.runStatus() ?? "unknown"
        if now != pid { return "the VMM behind \(qmp) is now pid \(now), not the old one (\(pid)); its VM is \(status)" }
        if status == "running" { return "the VM keeps running in the old VMM (pid \(pid); checked: query-status running)" }
        return "the old VMM (pid \(pid)) still has the VM, but it is \(status), not running"
    }

    /// Poll query-migrate until the live update started through `client` completed (with its
    /// report) or failed; reconnects when exec replaced the VMM behind the socket. The last answer.
    static func awaitLiveUpdate(qmp: String, client c: QMPClient, timeoutSeconds: UInt64 = 120) -> JSONValue {
        var client: QMPClient? = c
        var last = JSONValue.null
        let deadline = monotonicNanoseconds() + timeoutSeconds * 1_000_000_000
        while monotonicNanoseconds() < deadline {
            usleep(20_000)
            if client == nil { client = try? QMPClient(path: qmp) }
            guard let q = try? client?.execute("query-migrate") else { client = nil; continue }
            last = q
            if case let .string(s)? = q["status"], s == "failed" || (s == "completed" && q["x-vfio-live-cpr"] != nil) { break }
        }
        return last
    }
}
