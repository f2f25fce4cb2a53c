import ArgumentParser
import Control
import Glibc
import SystemCalls
import VFIOUser

/// Why a QMP exchange failed.
enum QMPClientError: Error, CustomStringConvertible {
    case unreachable(path: String, Error)
    case closed(path: String)
    case timeout(path: String, command: String, seconds: Double)
    /// The VM answered with an error.
    case refused(command: String, errorClass: String, desc: String)
    case malformed(path: String, String)

    var description: String {
        switch self {
        case let .unreachable(p, e): return "cannot reach the VM's QMP socket \(p): \(e)"
        case let .closed(p): return "the VM behind \(p) closed its QMP socket"
        case let .timeout(p, c, s): return "the VM behind \(p) did not answer \(c) within \(formatSeconds(s)) s"
        case let .refused(c, _, d): return "\(c): \(d)"
        case let .malformed(p, m): return "the VM behind \(p) sent a malformed QMP message: \(m)"
        }
    }
    /// The connection is gone (as opposed to a command the VM refused).
    var isConnectionLost: Bool { if case .refused = self { return false }; return true }
}

/// A minimal QMP client (the CLI's; tests also use Python's qemu.qmp). Every wait on the VM is
/// bounded by `timeoutMilliseconds`.
final class QMPClient {
    let socket: UnixSocket
    let path: String
    let timeoutMilliseconds: Int32
    private var buffer: [UInt8] = []
    /// How much of `buffer` holds no end of line.
    private var scanned = 0
    private var nextID = 0

    init(path: String, timeoutMilliseconds: Int32 = 10_000) throws {
        self.path = path
        self.timeoutMilliseconds = timeoutMilliseconds
        do { socket = try UnixSocket.connect(path: path, timeoutMilliseconds: timeoutMilliseconds) } catch {
            throw QMPClientError.unreachable(path: path, error)
        }
        _ = try readMessage(waitingFor: "the QMP greeting")
        _ = try execute("qmp_capabilities")
    }

    deinit { socket.close() }

    /// The largest message taken from the VM (a query-migrate answer is a few KiB): a peer that
    /// sends without end of line is cut off, not buffered until memory runs out.
    static let maxMessageBytes = 16 << 20

    /// One message, by `deadline` (default: this client's timeout from now).
    func readMessage(waitingFor what: String, deadline given: UInt64? = nil) throws -> JSONValue {
        let deadline = given ?? monotonicNanoseconds() + UInt64(timeoutMilliseconds) * 1_000_000
        while true {
            // Only bytes not looked at yet are searched: a long line costs one pass, not one per read.
            if let nl = buffer[scanned...].firstIndex(of: 10) {
                let line = Array(buffer[..<nl]); buffer.removeFirst(nl + 1)
                scanned = 0
                if line.isEmpty { continue }
                do { return try JSONValue.parse(line[...]) } catch { throw QMPClientError.malformed(path: path, "\(error)") }
            }
            scanned = buffer.count
            guard buffer.count <= Self.maxMessageBytes else {
                throw QMPClientError.malformed(path: path, "a message longer than \(Self.maxMessageBytes) bytes")
            }
            let now = monotonicNanoseconds()
            guard now < deadline,
                  (try? Poll.waitReadable(socket.fd, timeoutMilliseconds: Int32((deadline - now) / 1_000_000 + 1))) == true else {
                throw QMPClientError.timeout(path: path, command: what, seconds: Double(timeoutMilliseconds) / 1000)
            }
            var chunk = [UInt8](repeating: 0, count: 65536)
            let n: Int
            do { n = try chunk.withUnsafeMutableBytes { try socket.fd.read(into: $0) } } catch { throw QMPClientError.closed(path: path) }
            if n == 0 { throw QMPClientError.closed(path: path) }
            buffer += chunk[0..<n]
        }
    }

    /// Run a command; events that arrive meanwhile are passed to `onEvent`.
    func execute(_ cmd: String, _ args: [(String, JSONValue)] = [], onEvent: ((JSONValue) -> Void)? = nil) throws -> JSONValue {
        try execute(cmd, argumentsText: args.isEmpty ? nil : JSONValue.object(args).description, onEvent: onEvent)
    }

    /// Run a command whose integers must arrive exactly, as QEMU's QNum takes them: JSONValue
    /// holds doubles, which round above 2^53 and print 2^64-1 (max-bandwidth's "unlimited") as
    /// a float that QEMU's uint64 visitor refuses.
    func execute(_ cmd: String, exact args: [(String, QMPValue)]) throws -> JSONValue {
        try execute(cmd, argumentsText: args.isEmpty ? nil : QMPValue.object(args).compactText, onEvent: nil)
    }

    private func execute(_ cmd: String, argumentsText: String?, onEvent: ((JSONValue) -> Void)?) throws -> JSONValue {
        nextID += 1
        var text = JSONValue.object([("execute", .string(cmd)), ("id", .number(Double(nextID)))]).description
        if let a = argumentsText { text = String(text.dropLast()) + #","arguments":"# + a + "}" }
        do { try socket.send(Array(text.utf8)) } catch { throw QMPClientError.closed(path: path) }
        // One bound for the reply, however many events come first.
        let deadline = monotonicNanoseconds() + UInt64(timeoutMilliseconds) * 1_000_000
        while true {
            let m = try readMessage(waitingFor: cmd, deadline: deadline)
            if m["event"] != nil { onEvent?(m); continue }
            // A late reply to an earlier command that timed out is not this one's.
            if let id = m["id"]?.uint64, id != UInt64(nextID) { continue }
            return try Self.answer(m, to: cmd)
        }
    }

    private static func answer(_ m: JSONValue, to cmd: String) throws -> JSONValue {
        if let e = m["error"] {
            let cls: String = { if case let .string(c)? = e["class"] { return c }; return "GenericError" }()
            if case let .string(d)? = e["desc"] { throw QMPClientError.refused(command: cmd, errorClass: cls, desc: d) }
            throw QMPClientError.refused(command: cmd, errorClass: cls, desc: "\(e)")
        }
        return m["return"] ?? .null
    }

    /// After `execute(cmd)` timed out: its reply, should it come within `seconds` more. Events
    /// are dropped.
    func lateReply(to cmd: String, seconds: Double) throws -> JSONValue {
        let deadline = monotonicNanoseconds() + UInt64(max(seconds, 0) * 1e9)
        while true {
            let m: JSONValue
            do { m = try readMessage(waitingFor: cmd, deadline: deadline) } catch QMPClientError.timeout {
                throw QMPClientError.timeout(path: path, command: cmd, seconds: seconds + Double(timeoutMilliseconds) / 1000)
            }
            if m["event"] != nil { continue }
            if let id = m["id"]?.uint64, id != UInt64(nextID) { continue }
            return try Self.answer(m, to: cmd)
        }
    }

    /// This VMM's process id (a vfio-live extension; nil from a VMM without it).
    func vmmPID() -> Int32? {
        guard let p = (try? execute("x-vfio-live-pid"))?["pid"]?.uint64, p > 0, p <= UInt64(Int32.max) else { return nil }
        return Int32(p)
    }

    /// query-status's status, or nil.
    func runStatus() -> String? {
        if case let .string(s)? = (try? execute("query-status"))?["status"] { return s }
        return nil
    }
}


/// True if `pid` exists and is not a zombie (an exited process its parent has not reaped).
func processIsAlive(_ pid: Int32) -> Bool {
    guard kill(pid, 0) == 0 || errno == EPERM else { return false }
    guard let f = fopen("/proc/\(pid)/stat", "r") else { return true }
    defer { fclose(f) }
    var buf = [CChar](repeating: 0, count: 512)
    guard fgets(&buf, 512, f) != nil else { return true }
    let line = String(cString: buf)
    // "pid (comm) S ...": the state follows the last ')'.
    guard let close = line.lastIndex(of: ")") else { return true }
    let rest = line[line.index(after: close)...].drop { $0 == " " }
    return rest.first != "Z" && rest.first != "X"
}

struct MigrateCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "migrate",
        abstract: "Live-migrate a running VM (through its QMP socket) to a VM waiting with --incoming.",
        discussion: HelpText.reflow("""
            Sets the parameters, starts the migration, shows a live progress line (transferred and
            remaining, dirty rate, iteration, expected downtime) and ends with a report of what
            query-migrate said. Exits 0 only if it says `completed` (the destination has the VM).
            A switch-over forced by --max-iterations, without meeting the downtime limit, is said
            as such. On failure the reason is printed, with the state the source VM is in.
            SIGINT (Ctrl-C) or SIGTERM cancels the migration (migrate_cancel), waits until it is
            cancelled, and exits 1.

            Example:
              vfio-live vm run --memory 256M --device vfio-user,socket=/tmp/b.sock --incoming tcp:127.0.0.1:4444 --qmp /tmp/b.qmp &
              vfio-live migrate --qmp /tmp/a.qmp --to tcp:127.0.0.1:4444 --downtime-limit 300 --max-bandwidth 1G
            """))
    @Option(help: "The source VM's QMP socket.")
    var qmp: String
    @Option(help: "Destination: tcp:HOST:PORT or unix:PATH.")
    var to: String
    @Option(parsing: .unconditional, help: "Maximum downtime in milliseconds (0...2000000).")
    var downtimeLimit = "300"
    @Option(parsing: .unconditional, help: "Maximum bandwidth in bytes per second, with a suffix if you like (10M, 1G); 0 = unlimited.")
    var maxBandwidth = "0"
    @Option(parsing: .unconditional, help: "Switch over after this many pre-copy iterations even if the downtime limit is not met (forced switch-over; vfio-live's x-max-iterations).")
    var maxIterations: String?
    @Flag(help: "Throttle the vCPUs when the migration does not converge.")
    var autoConverge = false
    @Flag(help: "Treat all memory mapped by devices without dirty tracking as dirty instead of refusing to migrate.")
    var allowUntrackedDevices = false
    @Flag(help: "Checksum RAM page data end to end (capability x-vfio-live-payload-checksum; off by default, as QEMU, which relies on the transport; costs a copy at the source and a pass at the destination).")
    var payloadChecksum = false
    @Option(parsing: .unconditional, help: "Carry RAM and device state on N extra connections to the same URI beside the main one (QEMU's multifd capability with multifd-channels N; 1-255). Example: --multifd-channels 2")
    var multifdChannels: String?
    @Option(parsing: .unconditional, help: "Seconds the VM's QMP socket may take to answer any command.")
    var qmpTimeout = "10"
    @OptionGroup var global: GlobalOptions

    func validate() throws {
        try checkSocketPath(qmp, option: "--qmp")
        try checkUnixURI(to, option: "--to")
        guard to.hasPrefix("tcp:") || to.hasPrefix("unix:") else { throw ValidationError("--to takes tcp:HOST:PORT or unix:PATH (got '\(to)')") }
        _ = try parseInteger(downtimeLimit, option: "--downtime-limit", range: 0...2_000_000)
        _ = try Self.bandwidth(maxBandwidth)
        if let m = maxIterations { _ = try parseInteger(m, option: "--max-iterations", range: 1...1_000_000) }
        if let n = multifdChannels { _ = try parseInteger(n, option: "--multifd-channels", range: 1...255) }
        _ = try parseSeconds(qmpTimeout, option: "--qmp-timeout")
    }

    /// Bytes per second: a size (10M, 1G), optionally written with "/s".
    static func bandwidth(_ s: String) throws -> UInt64 {
        var t = s
        if t.lowercased().hasSuffix("/s") { t = String(t.dropLast(2)) }
        do { return try parseSize(t) } catch let e as ValidationError { throw ValidationError("--max-bandwidth: \(e.message)") }
    }

    func run() throws {
        global.apply()
        let limit = UInt64(try parseInteger(downtimeLimit, option: "--downtime-limit", range: 0...2_000_000))
        let timeoutMS = Int32(try parseSeconds(qmpTimeout, option: "--qmp-timeout") * 1000)
        // SIGINT/SIGTERM from here on cancel the migration instead of killing this process.
        let stop = try EventFD(nonBlocking: true)
        installStopSignals(stop.fd.rawValue)
        let c: QMPClient
        do { c = try QMPClient(path: qmp, timeoutMilliseconds: timeoutMS) } catch { throw Failure("\(error)") }
        // Who runs the VM, and the last live update's report: a live update that takes the VM
        // over meanwhile would also end in "completed", which is not this migration's.
        let pid0 = c.vmmPID()
        let before = try? c.execute("query-migrate")
        // A migration already under way is not joined: its status would be read as ours.
        if let st = before?["status"]?.stringValue, ["setup", "active", "device", "pre-switchover", "cancelling", "wait-unplug"].contains(st) {
            throw Failure("a migration is already in progress on the VM behind \(qmp) (query-migrate: \(st)); not starting another")
        }
        // Exact integers: --max-bandwidth 18446744073709551615 (QEMU's unlimited) must not round.
        var params: [(String, QMPValue)] = [("downtime-limit", .uint(limit)), ("max-bandwidth", .uint(try Self.bandwidth(maxBandwidth)))]
        if let m = maxIterations { params.append(("x-max-iterations", .int(Int64(try parseInteger(m, option: "--max-iterations", range: 1...1_000_000))))) }
        if let n = multifdChannels { params.append(("multifd-channels", .int(Int64(try parseInteger(n, option: "--multifd-channels", range: 1...255))))) }
        do {
            _ = try c.execute("migrate-set-parameters", exact: params)
            _ = try c.execute("migrate-set-capabilities", [("capabilities", .array([
                .object([("capability", .string("auto-converge")), ("state", .bool(autoConverge))]),
                .object([("capability", .string("x-allow-untracked-devices")), ("state", .bool(allowUntrackedDevices))]),
                .object([("capability", .string("x-vfio-live-payload-checksum")), ("state", .bool(payloadChecksum))]),
                .object([("capability", .string("multifd")), ("state", .bool(multifdChannels != nil))]),
            ]))])
            _ = try c.execute("migrate", [("uri", .string(to))])
        } catch let e as QMPClientError {
            throw Failure("the migration did not start: \(e)\(e.isConnectionLost ? "" : "; the source VM is \(c.runStatus() ?? "in an unknown state")")")
        }
        let tty = isatty(1) != 0
        var last = JSONValue.null
        while true {
            if (try? Poll.waitReadable(stop.fd, timeoutMilliseconds: 100)) == true {
                if tty { print("") }
                try cancel(c, stop: stop)
            }
            let q: JSONValue
            do { q = try c.execute("query-migrate") } catch {
                if tty { print("") }
                throw Failure("lost the source VM's QMP socket during the migration (\(error)); its last status was \(last["status"]?.stringValue ?? "unknown"): the outcome is unknown, check both VMs")
            }
            last = q
            guard let status = q["status"]?.stringValue else { continue }
            let ram = q["ram"]
            let total = ram?["total"]?.uint64 ?? 0, sent = ram?["transferred"]?.uint64 ?? 0, rem = ram?["remaining"]?.uint64 ?? 0
            let line = "\(status): \(formatBytes(sent)) sent, \(formatBytes(rem)) remaining of \(formatBytes(total)), dirty \(ram?["dirty-pages-rate"]?.uint64 ?? 0) pages/s, iteration \(ram?["dirty-sync-count"]?.uint64 ?? 0), expected downtime \(q["expected-downtime"]?.uint64 ?? 0) ms"
            let width = 30
            let done = total == 0 ? 0 : min(width, Int(Double(sent) / Double(max(total, sent + rem)) * Double(width)))
            let bar = "[" + String(repeating: "#", count: done) + String(repeating: ".", count: width - done) + "] "
            if tty { print("\r" + bar + line + "   ", terminator: ""); fflush(stdout) } else { print(bar + line); fflush(stdout) }
            if status == "completed" || status == "failed" || status == "cancelled" { break }
        }
        if tty { print("") }
        let status = last["status"]?.stringValue ?? "?"
        guard status == "completed" else {
            print("migration \(status): \(last["error-desc"]?.stringValue ?? "no reason given")")
            reportSource(c)
            throw ExitCode(1)
        }
        if let r = last["x-vfio-live-cpr"], r != before?["x-vfio-live-cpr"] || c.vmmPID() != pid0 {
            print("the migration did not complete: a live update took the VM over meanwhile (new VMM pid \(r["pid"]?.uint64 ?? 0)), and query-migrate reports that update")
            throw ExitCode(1)
        }
        let ram = last["ram"]
        let downtime = last["downtime"]?.uint64 ?? 0
        let forced = last["x-vfio-live"]?["forced-switchover"]?.boolValue == true
        print(forced ? "migration completed with a forced switch-over: it did not converge, so the VM was stopped after \(ram?["dirty-sync-count"]?.uint64 ?? 0) iterations whatever the downtime"
                     : "migration completed")
        print("  total time:       \(last["total-time"]?.uint64 ?? 0) ms")
        let over = downtime > limit ? ", exceeded by \(downtime - limit) ms" : ""
        print("  downtime:         \(downtime) ms (limit \(limit) ms\(over))")
        if let b = last["x-downtime-breakdown"] {
            print("  downtime phases:  \(Self.phasesText(b))")
            print("  predicted:        \(last["expected-downtime"]?.uint64 ?? 0) ms at switch-over\(last["x-expected-downtime-breakdown"].map { " (" + Self.phasesText($0) + ")" } ?? "")")
        }
        print("  iterations:       \(ram?["dirty-sync-count"]?.uint64 ?? 0)")
        print("  transferred:      \(formatBytes(ram?["transferred"]?.uint64 ?? 0)) (\(ram?["normal"]?.uint64 ?? 0) pages, \(ram?["duplicate"]?.uint64 ?? 0) zero pages elided)")
        print("  device state:     \(formatBytes(last["vfio"]?["transferred"]?.uint64 ?? 0))")
        print("  throughput:       \(formatFixed(Double(ram?["mbps"]?.uint64 ?? 0) / 8000, 2)) GB/s (last iteration)")
    }

    /// "pause 0.2, RAM 1.5, device 0 3.1, vCPUs 0.1, destination load 2.0, handshake 0.4,
    /// resume 0.9 ms" from query-migrate's x-downtime-breakdown.
    static func phasesText(_ b: JSONValue) -> String {
        func ms(_ v: JSONValue?) -> String { if case let .number(d)? = v { return formatFixed(d, 1) }; return "?" }
        var parts = ["pause \(ms(b["pause"]))", "RAM \(ms(b["ram-remainder"]))"]
        if case let .array(ds)? = b["devices"] { for (i, d) in ds.enumerated() { parts.append("device \(i) \(ms(d))") } }
        parts += ["vCPUs \(ms(b["vcpu-state"]))", "destination load \(ms(b["destination-load"]))", "handshake \(ms(b["handshake"]))", "resume \(ms(b["resume"])) ms"]
        return parts.joined(separator: ", ")
    }

    /// What the source VM is doing now, as query-status says (never assumed).
    func reportSource(_ c: QMPClient) {
        switch c.runStatus() {
        case "running"?: print("the source VM keeps running (query-status: running)")
        case let s?: print("the source VM is \(s), not running")
        case nil: print("the source VM does not answer query-status: its state is unknown")
        }
    }

    /// SIGINT/SIGTERM: migrate_cancel, then wait (bounded, with progress) until query-migrate
    /// says cancelled. Always ends the command: exit 1, or a thrown failure.
    /// A second signal meanwhile ends the wait at once.
    func cancel(_ c: QMPClient, stop: EventFD) throws -> Never {
        _ = try? stop.consume()
        print("signal received: cancelling the migration (migrate_cancel); a second signal stops waiting for it")
        fflush(stdout)
        do { _ = try c.execute("migrate_cancel") } catch { throw Failure("migrate_cancel failed: \(error); the migration may still be running") }
        let bound: UInt64 = 15
        let start = monotonicNanoseconds()
        var lastShown = start
        var status = "?"
        while monotonicNanoseconds() - start < bound * 1_000_000_000 {
            guard let q = try? c.execute("query-migrate") else { throw Failure("lost the source VM's QMP socket while cancelling the migration: the outcome is unknown") }
            status = q["status"]?.stringValue ?? "?"
            switch status {
            case "cancelled":
                print("migration cancelled by the signal")
                reportSource(c)
                throw ExitCode(1)
            case "completed":
                print("the cancel came too late: the migration completed, the VM now runs on the destination")
                throw ExitCode(1)
            case "failed":
                print("migration failed while being cancelled: \(q["error-desc"]?.stringValue ?? "no reason given")")
                reportSource(c)
                throw ExitCode(1)
            default: break
            }
            if monotonicNanoseconds() - lastShown >= 3_000_000_000 {
                lastShown = monotonicNanoseconds()
                print("  still waiting for the migration to cancel: status \(status) after \((lastShown - start) / 1_000_000_000) s")
                fflush(stdout)
            }
            if (try? Poll.waitReadable(stop.fd, timeoutMilliseconds: 50)) == true {
                throw Failure("second signal: stopped waiting; migrate_cancel was sent and the migration was \(status)")
            }
        }
        throw Failure("migrate_cancel was sent, but after \(bound) s the migration is still \(status)")
    }
}
