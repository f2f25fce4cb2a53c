import ArgumentParser
import Foundation
import Glibc
import SystemCalls
import VFIOUser

/// QEMU 11.1 as the measured peer of the benchmarks, run through scripts/qemu11.sh (the one
/// wrapper: a trixie-backports root, run through its own loader in our namespaces). Every
/// figure comes from two QEMUs with no guest kernel, which is all RAM migration and CPR need.
struct QEMUPeer {
    let wrapper: String
    let version: String

    /// The peer, or why there is none (printed in place of its figures).
    static func find() -> Result<QEMUPeer, QEMUPeerError> {
        let candidates: [String]
        if let w = ProcessInfo.processInfo.environment["VFIO_LIVE_QEMU11"] { candidates = [w] } else {
            // The checkout's scripts/, from .build/<config>/vfio-live or .build/<triple>/<config>/vfio-live.
            var dir = (ChildProcess.currentExecutable() as NSString).deletingLastPathComponent
            var found: [String] = []
            for _ in 0..<5 { dir = (dir as NSString).deletingLastPathComponent; found.append(dir + "/scripts/qemu11.sh") }
            candidates = found
        }
        guard let w = candidates.first(where: { access($0, R_OK) == 0 }) else {
            return .failure(.unavailable("scripts/qemu11.sh not found beside this build (set VFIO_LIVE_QEMU11)"))
        }
        let check = Self.capture(["/bin/bash", w, "--check"])
        guard check.status == 0 else { return .failure(.unavailable(check.output.trimmingCharacters(in: .whitespacesAndNewlines))) }
        let v = Self.capture(["/bin/bash", w, "--version"]).output.split(separator: "\n").first.map(String.init) ?? "QEMU"
        return .success(QEMUPeer(wrapper: w, version: v))
    }

    static func capture(_ argv: [String]) -> (status: Int32, output: String) {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: argv[0])
        p.arguments = Array(argv.dropFirst())
        let pipe = Pipe()
        p.standardOutput = pipe
        p.standardError = pipe
        do { try p.run() } catch { return (127, "\(argv[0]): \(error)") }
        let out = String(decoding: pipe.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        p.waitUntilExit()
        return (p.terminationStatus, out)
    }

    /// One QEMU process; its stderr (traces, errors) goes to `log`.
    final class Instance {
        let process = Process()
        let log: String
        let qmpPath: String
        init(_ peer: QEMUPeer, _ args: [String], qmp: String, log: String) throws {
            self.log = log
            qmpPath = qmp
            process.executableURL = URL(fileURLWithPath: "/bin/bash")
            process.arguments = [peer.wrapper] + args + ["-qmp", "unix:\(qmp),server=on,wait=off", "-monitor", "none", "-serial", "none"]
            _ = FileManager.default.createFile(atPath: log, contents: nil)
            process.standardError = FileHandle(forWritingAtPath: log)
            process.standardOutput = FileHandle.nullDevice
            try process.run()
        }
        /// Connect to its QMP socket, waiting (bounded) for QEMU to create it.
        func qmp(timeoutSeconds: Double = 30) throws -> QMPClient {
            let deadline = monotonicNanoseconds() + UInt64(timeoutSeconds * 1e9)
            while true {
                if access(qmpPath, F_OK) == 0, let c = try? QMPClient(path: qmpPath) { return c }
                guard process.isRunning else { throw QEMUPeerError.failed("QEMU exited before its QMP socket answered: \(tail())") }
                guard monotonicNanoseconds() < deadline else { throw QEMUPeerError.failed("QEMU's QMP socket did not answer in \(Int(timeoutSeconds)) s: \(tail())") }
                usleep(20_000)
            }
        }
        func tail() -> String {
            let text = (try? String(contentsOfFile: log, encoding: .utf8)) ?? ""
            return text.split(separator: "\n").suffix(3).joined(separator: " | ")
        }
        /// SIGTERM, then SIGKILL after 10 s; always reaped.
        func stop() {
            let pid = process.processIdentifier
            guard pid > 0 else { return }
            kill(pid, SIGTERM)
            var st: Int32 = 0
            let deadline = monotonicNanoseconds() + 10_000_000_000
            while waitpid(pid, &st, WNOHANG) == 0 {
                if monotonicNanoseconds() > deadline { kill(pid, SIGKILL); waitpid(pid, &st, 0); break }
                usleep(5_000)
            }
        }
    }

    /// Poll query-migrate until it ends (bounded); the final answer, or the failure's reason.
    static func awaitMigration(_ c: QMPClient, timeoutSeconds: Double) throws -> JSONValue {
        let deadline = monotonicNanoseconds() + UInt64(timeoutSeconds * 1e9)
        while true {
            let q = try c.execute("query-migrate")
            switch q["status"] {
            case .string("completed")?: return q
            case .string("failed")?, .string("cancelled")?:
                throw QEMUPeerError.failed("QEMU's migration \(q["status"]!): \(q["error-desc"] ?? .null)")
            default: break
            }
            guard monotonicNanoseconds() < deadline else { throw QEMUPeerError.failed("QEMU's migration did not end in \(Int(timeoutSeconds)) s: \(q)") }
            usleep(5_000)
        }
    }

    static func workDirectory(_ what: String) -> String {
        let d = "/tmp/vfio-live-bench-qemu-\(what)-\(getpid())"
        mkdir(d, 0o700)
        return d
    }

    static func sizeArgument(_ n: UInt64) -> String { "\(n >> 20)M" }

    /// RAM throughput of a migration between two QEMUs over loopback TCP: the source paused
    /// (-S) with its RAM in `ramFile` (random bytes, memory-backend-file,share=on), the
    /// destination -incoming, max-bandwidth raised; one stream or multifd with `channels`.
    /// Bytes per second from QEMU's own ram.transferred and total-time, as ours are. Both
    /// QEMUs preallocate (prealloc=on, which populates the file's pages without changing them),
    /// as our source's RAM is written and our destination's populated before we time: a page
    /// fault costs 10–20 µs on these shadow-paging hosts, and left in, faults made QEMU look
    /// 2–5× slower (0.38 against 1.87 GB/s on one stream, 1 GiB, measured here).
    func migrationThroughput(ramFile: String, size: UInt64, multifdChannels: Int?) throws -> Double {
        let dir = Self.workDirectory("migration")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let sz = Self.sizeArgument(size)
        let src = try Instance(self, ["-machine", "q35,memory-backend=mem", "-nodefaults", "-display", "none", "-S", "-m", sz,
                                      "-object", "memory-backend-file,id=mem,size=\(sz),mem-path=\(ramFile),share=on,prealloc=on"],
                               qmp: "\(dir)/src.qmp", log: "\(dir)/src.log")
        defer { src.stop() }
        let dst = try Instance(self, ["-machine", "q35,memory-backend=mem", "-nodefaults", "-display", "none", "-m", sz,
                                      "-object", "memory-backend-ram,id=mem,size=\(sz),prealloc=on", "-incoming", "defer"],
                               qmp: "\(dir)/dst.qmp", log: "\(dir)/dst.log")
        defer { dst.stop() }
        let s = try src.qmp(timeoutSeconds: 120), d = try dst.qmp(timeoutSeconds: 120)  // preallocation first
        if let n = multifdChannels {
            for c in [s, d] {
                _ = try c.execute("migrate-set-capabilities", [("capabilities", .array([.object([("capability", .string("multifd")), ("state", .bool(true))])]))])
                _ = try c.execute("migrate-set-parameters", [("multifd-channels", .number(Double(n)))])
            }
        }
        _ = try s.execute("migrate-set-parameters", [("max-bandwidth", .number(Double(UInt64(1) << 40)))])
        // A free port: bind 0, read it, close; QEMU listens on it next.
        let l = try TCPListener(host: "127.0.0.1", port: 0)
        let port = l.port
        l.close()
        _ = try d.execute("migrate-incoming", [("uri", .string("tcp:127.0.0.1:\(port)"))])
        _ = try s.execute("migrate", [("uri", .string("tcp:127.0.0.1:\(port)"))])
        let q = try Self.awaitMigration(s, timeoutSeconds: 300)
        guard let bytes = q["ram"]?["transferred"]?.uint64, let ms = q["total-time"]?.uint64, ms > 0 else {
            throw QEMUPeerError.failed("QEMU's query-migrate has no ram.transferred / total-time: \(q)")
        }
        return Double(bytes) / (Double(ms) / 1000)
    }

    enum CPRMode: String { case transfer = "cpr-transfer", exec = "cpr-exec" }

    /// Blackout of a QEMU live update at `size` of preallocated memfd RAM: from the old QEMU's
    /// stop to the new one's run, both from `-trace vm_state_notify` with `-msg timestamp=on`
    /// (one clock: both QEMUs stamp CLOCK_REALTIME on this host), in ms.
    func cprBlackout(size: UInt64, mode: CPRMode) throws -> Double {
        let dir = Self.workDirectory("cpr")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let sz = Self.sizeArgument(size)
        let machine = ["-machine", "q35,aux-ram-share=on,memory-backend=ram0", "-nodefaults", "-display", "none", "-m", sz,
                       "-object", "memory-backend-memfd,id=ram0,size=\(sz),share=on,prealloc=on",
                       "-trace", "vm_state_notify", "-msg", "timestamp=on"]
        let old = try Instance(self, machine, qmp: "\(dir)/old.qmp", log: "\(dir)/old.log")
        defer { old.stop() }
        let c = try old.qmp(timeoutSeconds: 120)  // preallocating 4 GiB takes a while
        var new: Instance?
        defer { new?.stop() }
        switch mode {
        case .transfer:
            func channel(_ type: String, _ path: String) -> JSONValue {
                .object([("channel-type", .string(type)), ("addr", .object([("transport", .string("socket")), ("type", .string("unix")), ("path", .string(path))]))])
            }
            let main = channel("main", "\(dir)/main.sock"), cpr = channel("cpr", "\(dir)/cpr.sock")
            new = try Instance(self, machine + ["-incoming", main.description, "-incoming", cpr.description], qmp: "\(dir)/new.qmp", log: "\(dir)/new.log")
            // The new QEMU listens on its cpr channel before anything else.
            let deadline = monotonicNanoseconds() + 30_000_000_000
            while access("\(dir)/cpr.sock", F_OK) != 0 {
                guard new!.process.isRunning, monotonicNanoseconds() < deadline else { throw QEMUPeerError.failed("the new QEMU did not listen on its cpr channel: \(new!.tail())") }
                usleep(10_000)
            }
            _ = try c.execute("migrate-set-parameters", [("mode", .string(mode.rawValue))])
            _ = try c.execute("migrate", [("channels", .array([main, cpr]))])
        case .exec:
            // The old QEMU exec's the wrapper with the same machine and -incoming from the file.
            let argv = ["/bin/bash", wrapper] + machine + ["-qmp", "unix:\(dir)/new.qmp,server=on,wait=off", "-monitor", "none", "-serial", "none",
                                                           "-incoming", "file:\(dir)/vm.state"]
            _ = try c.execute("migrate-set-parameters", [("mode", .string(mode.rawValue)), ("cpr-exec-command", .array(argv.map { .string($0) }))])
            _ = try c.execute("migrate", [("uri", .string("file:\(dir)/vm.state"))])
        }
        // The new QEMU's "running 1" after the old one's "running 0" ends the blackout.
        let log = mode == .transfer ? "\(dir)/new.log" : "\(dir)/old.log"
        let deadline = monotonicNanoseconds() + 120_000_000_000
        while true {
            let stops = Self.vmStateTimes(old.log, running: false)
            if let stop = stops.last {
                let runs = Self.vmStateTimes(log, running: true).filter { $0 > stop }
                if let run = runs.first { return Double(run - stop) / 1000 }
            }
            guard monotonicNanoseconds() < deadline else {
                throw QEMUPeerError.failed("no vm_state_notify stop and run pair in 120 s: old: \(old.tail()) new: \(new?.tail() ?? "")")
            }
            if mode == .transfer, let n = new, !n.process.isRunning { throw QEMUPeerError.failed("the new QEMU exited: \(n.tail())") }
            usleep(10_000)
        }
    }

    /// Seconds since the epoch of each `vm_state_notify running N` line (N = 1 or 0) in a log
    /// written with -msg timestamp=on ("2026-12-01T20:45:14.749692Z vm_state_notify running 0 ...").
    static func vmStateTimes(_ path: String, running: Bool) -> [Int64] {
        guard let text = try? String(contentsOfFile: path, encoding: .utf8) else { return [] }
        let marker = "vm_state_notify running \(running ? 1 : 0) "
        return text.split(separator: "\n").compactMap { line -> Int64? in
            guard line.contains(marker), let stamp = line.split(separator: " ").first else { return nil }
            return parseTimestamp(String(stamp))
        }
    }

    /// "YYYY-MM-DDTHH:MM:SS.ffffffZ" (UTC) → microseconds since the epoch (integers: a Double
    /// of epoch seconds would blur the microseconds).
    static func parseTimestamp(_ s: String) -> Int64? {
        let parts = s.split(whereSeparator: { "-T:.Z".contains($0) })
        guard parts.count == 7, let y = Int32(parts[0]), let mo = Int32(parts[1]), let d = Int32(parts[2]),
              let h = Int32(parts[3]), let mi = Int32(parts[4]), let sec = Int64(parts[5]), parts[6].count <= 6,
              let frac = Int64(parts[6].padding(toLength: 6, withPad: "0", startingAt: 0)) else { return nil }
        var t = tm()
        t.tm_year = y - 1900; t.tm_mon = mo - 1; t.tm_mday = d; t.tm_hour = h; t.tm_min = mi; t.tm_sec = 0
        return (Int64(timegm(&t)) + sec) * 1_000_000 + frac
    }
}

enum QEMUPeerError: Error, CustomStringConvertible {
    case unavailable(String)
    case failed(String)
    var description: String {
        switch self {
        case let .unavailable(why): return "QEMU 11.1 peer skipped: \(why)"
        case let .failed(why): return "QEMU 11.1 peer failed: \(why)"
        }
    }
}

/// Fill `bytes` at `p` with xorshift64 output from `seed`: incompressible, and the same bytes
/// for our VM's RAM and QEMU's RAM file.
func fillRandom(_ p: UnsafeMutableRawPointer, bytes: Int, seed: UInt64 = 0x9e37_79b9_7f4a_7c15) {
    var x = seed
    let w = p.assumingMemoryBound(to: UInt64.self)
    for i in 0..<(bytes / 8) { x ^= x << 13; x ^= x >> 7; x ^= x << 17; w[i] = x }
}

/// A file of `size` random bytes in /dev/shm (RAM, as guest RAM is), removed by the caller.
func randomRAMFile(size: UInt64) throws -> String {
    let path = "/dev/shm/vfio-live-bench-ram-\(getpid())"
    let fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
    guard fd >= 0 else { throw QEMUPeerError.failed("open \(path): \(Errno.current)") }
    let file = FileDescriptor(adopting: fd)
    defer { file.close() }
    guard ftruncate(fd, off_t(size)) == 0 else { throw QEMUPeerError.failed("ftruncate \(path): \(Errno.current)") }
    let m = try MappedRegion(fd: file, length: Int(size), populate: false)
    fillRandom(m.base, bytes: Int(size))
    m.unmap()
    return path
}
