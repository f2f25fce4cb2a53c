import ArgumentParser
import Glibc
import SystemCalls
import VFIOUser

/// A minimal QMP client (the CLI's; tests also use Python's qemu.qmp).
final class QMPClient {
    let socket: UnixSocket
    let path: String
    private var buffer: [UInt8] = []
    private var nextID = 0

    init(path: String) throws {
        self.path = path
        socket = try UnixSocket.connect(path: path)
        _ = try readMessage()  // greeting
        _ = try execute("qmp_capabilities")
    }

    func readMessage() throws -> JSONValue {
        while true {
            if let nl = buffer.firstIndex(of: 10) {
                let line = Array(buffer[..<nl]); buffer.removeFirst(nl + 1)
                if line.isEmpty { continue }
                return try JSONValue.parse(line[...])
            }
            var chunk = [UInt8](repeating: 0, count: 65536)
            let n = try chunk.withUnsafeMutableBytes { try socket.fd.read(into: $0) }
            if n == 0 { throw ValidationError("the VM behind \(path) closed its QMP socket") }
            buffer += chunk[0..<n]
        }
    }

    /// Run a command; events that arrive meanwhile are passed to `onEvent`.
    func execute(_ cmd: String, _ args: [(String, JSONValue)] = [], onEvent: ((JSONValue) -> Void)? = nil) throws -> JSONValue {
        nextID += 1
        var o: [(String, JSONValue)] = [("execute", .string(cmd)), ("id", .number(Double(nextID)))]
        if !args.isEmpty { o.append(("arguments", .object(args))) }
        do { try socket.send(Array(JSONValue.object(o).description.utf8)) } catch {
            throw ValidationError("\(cmd): the VM behind \(path) is gone (\(error))")
        }
        while true {
            let m = try readMessage()
            if m["event"] != nil { onEvent?(m); continue }
            if let e = m["error"] {
                if case let .string(d)? = e["desc"] { throw ValidationError("\(cmd): \(d)") }
                throw ValidationError("\(cmd) failed: \(e)")
            }
            return m["return"] ?? .null
        }
    }
}

struct MigrateCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "migrate",
        abstract: "Live-migrate a running VM (through its QMP socket) to a VM waiting with --incoming.",
        discussion: """
            Sets the parameters, starts the migration, shows a live progress line (transferred and
            remaining, dirty rate, iteration, expected downtime) and ends with a report. Exits 0
            only if the migration completed; on failure the source VM keeps running and the
            reason is printed.

            Example:
              vfio-live vm run --memory 256M --device vfio-user,socket=/tmp/b.sock --incoming tcp:127.0.0.1:4444 --qmp /tmp/b.qmp &
              vfio-live migrate --qmp /tmp/a.qmp --to tcp:127.0.0.1:4444 --downtime-limit 300
            """)
    @Option(help: "The source VM's QMP socket.")
    var qmp: String
    @Option(help: "Destination: tcp:HOST:PORT or unix:PATH.")
    var to: String
    @Option(help: "Maximum downtime in milliseconds.")
    var downtimeLimit: UInt64 = 300
    @Option(help: "Maximum bandwidth in bytes per second (0 = unlimited).")
    var maxBandwidth: UInt64 = 0
    @Flag(help: "Throttle the vCPUs when the migration does not converge.")
    var autoConverge = false
    @Flag(help: "Treat all memory mapped by devices without dirty tracking as dirty instead of refusing to migrate.")
    var allowUntrackedDevices = false
    @OptionGroup var global: GlobalOptions

    func run() throws {
        global.apply()
        let c: QMPClient
        do { c = try QMPClient(path: qmp) } catch { throw ValidationError("cannot reach the VM's QMP socket \(qmp): \(error)") }
        _ = try c.execute("migrate-set-parameters", [("downtime-limit", .number(Double(downtimeLimit))), ("max-bandwidth", .number(Double(maxBandwidth)))])
        _ = try c.execute("migrate-set-capabilities", [("capabilities", .array([
            .object([("capability", .string("auto-converge")), ("state", .bool(autoConverge))]),
            .object([("capability", .string("x-allow-untracked-devices")), ("state", .bool(allowUntrackedDevices))]),
        ]))])
        _ = try c.execute("migrate", [("uri", .string(to))])
        let tty = isatty(1) != 0
        var last = JSONValue.null
        while true {
            usleep(100_000)
            let q: JSONValue
            do { q = try c.execute("query-migrate") } catch {
                // The source exits right after a completed migration.
                if case .string("device")? = last["status"] { print(""); print("the source VM exited after completing the migration"); return }
                throw error
            }
            last = q
            guard case let .string(status)? = q["status"] else { continue }
            let ram = q["ram"]
            let total = ram?["total"]?.uint64 ?? 0, sent = ram?["transferred"]?.uint64 ?? 0, rem = ram?["remaining"]?.uint64 ?? 0
            let line = "\(status): \(formatBytes(sent)) sent, \(formatBytes(rem)) remaining of \(formatBytes(total)), dirty \(ram?["dirty-pages-rate"]?.uint64 ?? 0) pages/s, iteration \(ram?["dirty-sync-count"]?.uint64 ?? 0), expected downtime \(q["expected-downtime"]?.uint64 ?? 0) ms"
            let width = 30
            let done = total == 0 ? 0 : min(width, Int(Double(sent) / Double(max(total, sent + rem)) * Double(width)))
            let bar = "[" + String(repeating: "#", count: done) + String(repeating: ".", count: width - done) + "] "
            if tty { print("\r" + bar + line + "   ", terminator: ""); fflush(stdout) } else { print(bar + line) }
            if status == "completed" || status == "failed" || status == "cancelled" { break }
        }
        if tty { print("") }
        let status: String = { if case let .string(s)? = last["status"] { return s }; return "?" }()
        guard status == "completed" else {
            let why: String = { if case let .string(s)? = last["error-desc"] { return s }; return "unknown" }()
            print("migration \(status): \(why)")
            print("the source VM keeps running")
            throw ExitCode(1)
        }
        let ram = last["ram"]
        print("migration completed")
        print("  total time:       \(last["total-time"]?.uint64 ?? 0) ms")
        print("  downtime:         \(last["downtime"]?.uint64 ?? 0) ms (limit \(downtimeLimit) ms)")
        print("  iterations:       \(ram?["dirty-sync-count"]?.uint64 ?? 0)")
        print("  transferred:      \(formatBytes(ram?["transferred"]?.uint64 ?? 0)) (\(ram?["normal"]?.uint64 ?? 0) pages, \(ram?["duplicate"]?.uint64 ?? 0) zero pages elided)")
        print("  device state:     \(formatBytes(last["vfio"]?["transferred"]?.uint64 ?? 0))")
        print("  throughput:       \(formatFixed(Double(ram?["mbps"]?.uint64 ?? 0) / 8000, 2)) GB/s (last iteration)")
    }
}
