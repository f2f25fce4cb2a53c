import ArgumentParser
import Foundation
import Glibc
import SystemCalls
import VFIOUser

struct UpdateBench: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "update",
        abstract: "Live-update blackout at several guest RAM sizes, cpr-exec beside a plain exec holding the same mappings.",
        discussion: HelpText.reflow("""
            For each size a device server and a VM (guest RAM preallocated, the workload and its
            device DMA running) are started as processes; the VM is then live-updated by
            cpr-transfer and by cpr-exec, --repeat times each, and the median blackout (vCPUs
            paused in the old VMM → running in the new) is printed. The reference, measured in
            the same run: a process holding the same populated memfd mapping (the memfd kept open
            across exec, as cpr-exec keeps it) exec's this binary
            and reports how long it took to start (exec tears the old mappings down).

            When scripts/qemu11.sh finds QEMU 11.1, its blackouts are measured in the same run at
            the same sizes, with the ratio to ours: cpr-transfer (the old QEMU with
            aux-ram-share=on and preallocated memfd RAM, the new one started with a main and a
            cpr incoming channel) and cpr-exec, each from the old QEMU's stop to the new one's
            run as `-trace vm_state_notify` with `-msg timestamp=on` stamps them.

            Example:
              vfio-live bench update --sizes 256M,1G --repeat 3 --json
            """))
    @Option(help: "Guest RAM sizes.")
    var sizes = "256M,1G,4G"
    @Option(help: "Updates per mode and size.")
    var `repeat` = 3
    @Option(help: "Internal: exec baseline (the populated size), then report the time since --since.")
    var execBaseline: String?
    @Option(help: "Internal.")
    var since: UInt64?
    @Flag(help: "Leave out QEMU 11.1's figures even when scripts/qemu11.sh finds it.")
    var noQemu = false
    @OptionGroup var output: BenchOutputOptions
    @OptionGroup var global: GlobalOptions

    func run() throws {
        if let t0 = since { print("exec-baseline-ns \(monotonicNanoseconds() - t0)"); return }
        if let size = execBaseline { try Self.holdAndExec(size: try parseSize(size)) }
        global.apply()
        let ticks = CPUTicks.now()
        let list = try sizes.split(separator: ",").map { try parseSize(String($0)) }
        let out = BenchOutput("update", output)
        defer { out.stolenTime(since: ticks) }
        let peer: Result<QEMUPeer, QEMUPeerError> = noQemu ? .failure(.unavailable("left out (--no-qemu)")) : QEMUPeer.find()
        out.say("live update blackout, median of \(self.repeat) (ms); reference: exec of a process holding the same populated mapping")
        if case let .success(p) = peer { out.say("peer: \(p.version), in the same run (ratio: QEMU / vfio-live)") }
        if case let .failure(why) = peer { out.skipped("QEMU 11.1 live-update blackouts", "\(why)") }
        out.say("  guest RAM | cpr-transfer | cpr-exec | exec reference | cpr-exec / reference" + (peerAvailable(peer) ? " | QEMU cpr-transfer       | QEMU cpr-exec" : ""))
        for size in list {
            let (transfer, exec) = try measure(size: size)
            var refs: [Double] = []
            for _ in 0..<self.repeat { refs.append(try Self.execReference(size: size)) }
            let ref = median(refs)
            var row = "  \(formatBytes(size).padding(toLength: 9, withPad: " ", startingAt: 0)) | \(formatFixed(transfer, 2).padding(toLength: 12, withPad: " ", startingAt: 0)) | \(formatFixed(exec, 2).padding(toLength: 8, withPad: " ", startingAt: 0)) | \(formatFixed(ref, 2).padding(toLength: 14, withPad: " ", startingAt: 0)) | \((formatFixed(exec / ref, 2) + "×").padding(toLength: 20, withPad: " ", startingAt: 0))"
            let at = formatBytes(size)
            out.figure("cpr-transfer blackout, \(at)", transfer, "ms")
            out.figure("cpr-exec blackout, \(at)", exec, "ms", reference: "exec of a process holding the same populated mapping", referenceValue: ref)
            if case let .success(p) = peer {
                for (mode, ours) in [(QEMUPeer.CPRMode.transfer, transfer), (.exec, exec)] {
                    let label = "QEMU 11.1 \(mode.rawValue) blackout, \(at)"
                    do {
                        var runs: [Double] = []
                        for _ in 0..<self.repeat { runs.append(try p.cprBlackout(size: size, mode: mode)) }
                        let q = median(runs)
                        row += " | " + "\(formatFixed(q, 2)) (\(formatFixed(q / ours, 1))×)".padding(toLength: 22, withPad: " ", startingAt: 0)
                        out.figure(label, q, "ms", reference: "vfio-live \(mode.rawValue) blackout", referenceValue: ours)
                    } catch {
                        row += " | failed".padding(toLength: 24, withPad: " ", startingAt: 0)
                        out.skipped(label, "\(error)")
                    }
                }
            }
            out.say(row)
        }
    }

    func peerAvailable(_ p: Result<QEMUPeer, QEMUPeerError>) -> Bool { if case .success = p { return true }; return false }

    func median(_ v: [Double]) -> Double { v.sorted()[v.count / 2] }

    /// A VM of `size` in its own processes, live-updated `repeat` times per mode. Each cpr-exec
    /// starts from a fresh VM whose guest RAM is populated in the VMM (a successor maps it
    /// lazily, which would make a second exec cheaper than the reference); cpr-transfer runs
    /// `repeat` times in a row on one VM.
    func measure(size: UInt64) throws -> (Double, Double) {
        var exec: [Double] = []
        for _ in 0..<self.repeat { exec += try updates(size: size, mode: "cpr-exec", count: 1) }
        let transfer = try updates(size: size, mode: "cpr-transfer", count: self.repeat)
        return (median(transfer), median(exec))
    }

    func updates(size: UInt64, mode: String, count: Int) throws -> [Double] {
        let dir = "/tmp/vfio-live-bench-update-\(getpid())"
        mkdir(dir, 0o700)
        let dev = try Child(["device", "serve", "--socket", "\(dir)/dev.sock", "--state-size", "1M", "-q"], log: "\(dir)/dev.log")
        defer { dev.stop() }
        usleep(200_000)
        let qmp = "\(dir)/vm.qmp"
        let vm = try Child(["vm", "run", "--memory", formatSizeArgument(size), "--prealloc", "--device", "vfio-user,socket=\(dir)/dev.sock",
                            "--workload", "working-set=16M,dirty-rate=20000,dma-every=4", "--qmp", qmp, "-q"], log: "\(dir)/vm.log")
        defer { _ = try? QMPClient(path: qmp).execute("quit"); vm.stop() }
        _ = try DemoCommand.connectQMP(qmp, vm)
        var out: [Double] = []
        for _ in 0..<count {
            let c = try QMPClient(path: qmp)
            _ = try c.execute("x-vfio-live-update", [("mode", .string(mode))])
            let q = UpdateCommand.awaitLiveUpdate(qmp: qmp, client: c)
            guard case .string("completed")? = q["status"], let r = q["x-vfio-live-cpr"] else { throw ValidationError("\(mode) failed: \(q["error-desc"] ?? .null)") }
            let b = Double(r["blackout-ns"]?.uint64 ?? 0) / 1e6
            out.append(b)
            if mode == "cpr-transfer" { usleep(1_600_000) }  // the old VMM exits 1.5 s after handing over
            let v = try QMPClient(path: qmp).execute("x-vfio-live-verify")
            guard v["ok"] == .bool(true) else { throw ValidationError("guest fails verification after \(mode): \(v)") }
        }
        return out
    }

    func formatSizeArgument(_ n: UInt64) -> String { n % (1 << 30) == 0 ? "\(n >> 30)G" : "\(n >> 20)M" }

    /// Start a process that populates a memfd mapping of `size` and exec's this binary, which
    /// reports the time from just before exec to its own start of run().
    static func execReference(size: UInt64) throws -> Double {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: ChildProcess.currentExecutable())
        p.arguments = ["bench", "update", "--exec-baseline", "\(size >> 20)M"]
        let pipe = Pipe()
        p.standardOutput = pipe
        try p.run()
        let out = String(decoding: pipe.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        p.waitUntilExit()
        guard let line = out.split(separator: "\n").first(where: { $0.hasPrefix("exec-baseline-ns ") }),
              let ns = Double(line.dropFirst("exec-baseline-ns ".count)) else { throw ValidationError("exec reference failed: \(out)") }
        return ns / 1e6
    }

    static func holdAndExec(size: UInt64) throws -> Never {
        let fd = try MemFD.create(name: "exec-reference", size: size)
        let m = try MappedRegion(fd: fd, length: Int(size), populate: true)
        _ = m
        // As in cpr-exec, the memfd stays open across exec: exec unmaps it but frees nothing.
        try fd.setCloseOnExec(false)
        let argv = [ChildProcess.currentExecutable(), "bench", "update", "--since", "\(monotonicNanoseconds())"]
        throw ValidationError("execv: \(ChildProcess.replaceImage(argv[0], argv))")
    }
}
