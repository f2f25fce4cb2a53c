import ArgumentParser
import Glibc
import SystemCalls
import VFIOUser

struct UpdateCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "update",
        abstract: "Live-update the VMM process of a running VM: a new VMM binary takes it over, devices kept live.",
        discussion: """
            Guest RAM (a memfd), the vfio-user device connections, their interrupt eventfds and
            the QMP socket are passed to the new VMM as descriptors; no page is copied, no device
            is reset, reconnected or re-mapped, and device DMA goes on during the handoff. Only
            vCPU state and the VMM's own device state travel in the stream. The guest is paused
            for the blackout, which is measured and printed.

              --mode transfer   a second VMM process takes over (QEMU's cpr-transfer). Without
                                --to, the running VMM starts it itself, with its own command
                                line (or --binary), on the same QMP socket. With --to, hand over
                                to a VMM you started with --incoming cpr:unix:PATH.
              --mode exec       the VMM re-executes itself (or --binary) in place, keeping its
                                PID and descriptors (QEMU's cpr-exec).

            If anything fails before the new VMM commits (it dies, refuses the state, cannot
            exec), the old one takes the VM back and it keeps running; the reason is printed.

            Example:
              vfio-live vm run --memory 1G --device vfio-user,socket=/tmp/dma.sock --qmp /tmp/vm.qmp &
              vfio-live update --qmp /tmp/vm.qmp --mode transfer
              vfio-live update --qmp /tmp/vm.qmp --mode exec --binary ./new-build/vfio-live
            """)
    enum Mode: String, ExpressibleByArgument { case transfer, exec }

    @Option(help: "The running VM's QMP socket.")
    var qmp: String
    @Option(help: "transfer (a new VMM process) or exec (re-exec in place).")
    var mode: Mode = .transfer
    @Option(help: "The new VMM binary (default: the running VMM's own).")
    var binary: String?
    @Option(help: "transfer only: the cpr socket of a VMM started with --incoming cpr:unix:PATH (unix:PATH).")
    var to: String?
    @OptionGroup var global: GlobalOptions

    func run() throws {
        global.apply()
        if mode == .exec && to != nil { throw ValidationError("--to is for --mode transfer; exec replaces the VMM in place") }
        let c: QMPClient
        do { c = try QMPClient(path: qmp) } catch { throw ValidationError("cannot reach the VM's QMP socket \(qmp): \(error)") }
        var args: [(String, JSONValue)] = [("mode", .string(mode == .transfer ? "cpr-transfer" : "cpr-exec"))]
        if let b = binary {
            guard access(b, X_OK) == 0 else { throw ValidationError("--binary \(b) is not an executable file") }
            args.append(("binary", .string(b)))
        }
        if let t = to { args.append(("to", .string(t))) }
        _ = try c.execute("x-vfio-live-update", args)
        print("live update (\(mode.rawValue)) started")
        let last = Self.awaitLiveUpdate(qmp: qmp, client: c)
        guard case .string("completed")? = last["status"], let r = last["x-vfio-live-cpr"] else {
            let why: String = { if case let .string(s)? = last["error-desc"] { return s }; return "no answer from the VMM" }()
            print("live update failed: \(why)")
            print("the VM keeps running in the old VMM")
            throw ExitCode(1)
        }
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
