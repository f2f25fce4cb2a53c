import ArgumentParser
import Devices
import Foundation
import Glibc
import SystemCalls
import VFIO
import VFIOUser

struct DemoCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "demo",
        abstract: "Run the end-to-end demonstration and verify it.",
        discussion: HelpText.reflow("""
            From nothing: starts two dma-engine device servers and two VMMs as separate processes,
            runs the guest workload (page writes with per-page invariants, DMA round trips through
            the device) on KVM in the first VM, live-migrates the running VM with its device over
            loopback TCP through QMP (pre-copy, then stop-and-copy within the downtime limit), and
            verifies on the destination every page's invariant, that device jobs go on after the
            switch, and that the device's memory arrived intact. Prints a report; exits 0 only
            when every check passed.

            --device-only runs the device-level demonstration instead: a device's state moves
            between two servers with a DMA job interrupted mid-flight that completes on the
            destination.
            """))
    @Option(help: "dma-engine device memory (the device state that migrates).")
    var stateSize = "32M"
    @Option(help: "Guest RAM shared with the devices.")
    var ramSize = "64M"
    @Option(help: "Seconds the workload runs before the switch-over.")
    var seconds = 2.0
    @Option(help: "Guest page writes per second during the migration.")
    var dirtyRate: UInt64 = 50000
    @Option(help: "Downtime limit (ms).")
    var downtimeLimit: UInt64 = 300
    @Flag(help: "Demonstrate device-state migration alone (two device servers, no VM).")
    var deviceOnly = false
    @OptionGroup var global: GlobalOptions

    func run() throws {
        global.apply()
        if deviceOnly { try runDeviceDemo() } else { try runVMDemo() }
    }

    func runDeviceDemo() throws {
        let state = try parseSize(stateSize), ramBytes = try parseSize(ramSize)
        let dir = "/tmp/vfio-live-demo-\(getpid())"
        mkdir(dir, 0o700)
        defer { rmdir(dir) }
        var checks: [(String, Bool, String)] = []
        func check(_ name: String, _ ok: Bool, _ detail: String = "") {
            checks.append((name, ok, detail))
            print("  [\(ok ? "ok" : "FAILED")] \(name)\(detail.isEmpty ? "" : ": " + detail)")
        }

        print("1. starting two dma-engine device servers (separate processes)")
        let servers = try ["source", "destination"].map { try ChildServer(socket: "\(dir)/\($0).sock", stateSize: stateSize) }
        defer { for s in servers { s.stop() } }
        let a = try servers[0].connect(), b = try servers[1].connect()
        defer { a.close(); b.close() }
        print("   source pid \(servers[0].pid), destination pid \(servers[1].pid), device memory \(formatBytes(state))")

        print("2. guest RAM: \(formatBytes(ramBytes)) memfd, DMA-mapped into both devices by fd")
        let ram = try MemFD.create(name: "demo-guest-ram", size: ramBytes)
        let mem = try MappedRegion(fd: ram, length: Int(ramBytes))
        let iova: UInt64 = 0x1_0000_0000
        for c in [a, b] { try c.mapDMA(iova: iova, size: ramBytes, local: mem.base, fd: ram) }
        let msiA = try EventFD(), msiB = try EventFD()
        try a.setIRQs(index: 1, eventfds: [msiA]); try a.write32(7, 0x40, 0x0081_0005)
        try b.setIRQs(index: 1, eventfds: [msiB])

        print("3. workload: DMA jobs in both directions with checksums, for \(seconds) s")
        let work = DemoWorkload(client: a, irq: msiA, ram: mem, ramSize: ramBytes, iova: iova, dataWindow: state - DMAEngine.journalSize)
        try work.start()
        usleep(UInt32(seconds * 1e6))

        print("4. live migration of the device: pre-copy while jobs run, then stop-copy")
        let transfer = DeviceStateTransfer(source: try DeviceMigration(device: a), destination: try DeviceMigration(device: b))
        transfer.afterPreCopyRound = { r, n in print("   pre-copy round \(r): \(formatBytes(n)) (jobs so far \(work.completed))") }
        // "Stop the vCPUs": the workload stops and leaves one large job in flight.
        transfer.beforeStopCopy = { try work.stopLeavingJobInFlight() }
        let report = try transfer.run()
        print("   source:      \(report.sourcePath.map(\.description).joined(separator: " → "))")
        print("   destination: \(report.destinationPath.map(\.description).joined(separator: " → "))")

        print("5. verification on the destination")
        let inFlight = work.inFlight!
        let progressAtStop = try a.read64(0, DMAEngine.Reg.jobProgress)
        check("jobs verified on the source before the switch", work.failures.isEmpty && work.completed > 0,
              "\(work.completed) jobs, \(work.failures.count) checksum mismatches")
        check("a job was in flight at the switch", progressAtStop < inFlight.count,
              "\(formatBytes(progressAtStop)) of \(formatBytes(inFlight.count)) moved on the source")
        let done = try msiB.wait(timeoutMilliseconds: 30_000) > 0
        let jobsB = try b.read64(0, DMAEngine.Reg.jobsCompleted)
        check("the interrupted job completed on the destination and raised its MSI", done && jobsB == UInt64(work.completed + 1),
              "destination jobs completed \(jobsB)")
        let sumB = try b.read64(0, DMAEngine.Reg.lastJobChecksum)
        let expected = DMAEngine.jobChecksum(of: UnsafeRawBufferPointer(start: mem.base + Int(inFlight.ramOffset), count: Int(inFlight.count)))
        let statusB = try b.read64(0, DMAEngine.Reg.lastJobStatus)
        check("its data landed in guest RAM intact", sumB == expected && statusB == 0,
              "checksum \(hex(sumB))")
        let viewA = try a.mapRegion(4)!, viewB = try b.mapRegion(4)!
        let journalSlot = Int(state - DMAEngine.journalSize) + (work.completed % 1024) * 64
        let pa = viewA.areas[0].memory.base, pb = viewB.areas[0].memory.base
        let sameBefore = memcmp(pa, pb, journalSlot) == 0
        let sameAfter = memcmp(pa + journalSlot + 64, pb + journalSlot + 64, Int(state) - journalSlot - 64) == 0
        check("device memory identical to the source's (but for the new journal record)", sameBefore && sameAfter, formatBytes(state))
        let deviceRange = UnsafeRawBufferPointer(start: pb + Int(inFlight.deviceOffset), count: Int(inFlight.count))
        check("the destination's device memory is what the job read", DMAEngine.jobChecksum(of: deviceRange) == expected)
        let liveness = try b.read32(0, DMAEngine.Reg.liveness), factorial = try b.read32(0, DMAEngine.Reg.factorial)
        check("registers restored (liveness, factorial)", liveness == ~UInt32(0xc0ffee) && factorial == 479_001_600)

        print("")
        print("report")
        print("  jobs before the switch:   \(work.completed) (\(formatBytes(work.bytes)) moved)")
        print("  pre-copy:                 \(report.preCopyRounds) round(s), \(formatBytes(report.preCopyBytes))")
        print("  stop-copy (downtime):     \(formatBytes(report.stopCopyBytes)) in \(formatFixed(Double(report.stopCopyNanoseconds) / 1e6, 2)) ms")
        print("  total:                    \(formatBytes(report.totalBytes)) in \(formatFixed(Double(report.totalNanoseconds) / 1e6, 1)) ms, \(gbps(Double(report.totalBytes) / (Double(report.totalNanoseconds) / 1e9)))")
        let failed = checks.filter { !$0.1 }
        print("  checks:                   \(checks.count - failed.count) passed, \(failed.count) failed")
        if !failed.isEmpty { throw ExitCode(1) }
    }
}

/// A child process of this binary; its output goes to `log`, or is inherited.
final class Child {
    let process = Process()
    var pid: Int32 { process.processIdentifier }
    init(_ args: [String], log: String? = nil) throws {
        process.executableURL = URL(fileURLWithPath: ChildProcess.currentExecutable())
        process.arguments = args
        if let log {
            _ = FileManager.default.createFile(atPath: log, contents: nil)
            let h = FileHandle(forWritingAtPath: log)
            process.standardOutput = h
            process.standardError = h
        }
        try process.run()
    }
    /// Terminate and reap. Plain kill/waitpid: a child that already exited on its own (a VMM
    /// that handed its VM over) must not leave us waiting on Foundation's bookkeeping.
    func stop() {
        let pid = process.processIdentifier
        guard pid > 0 else { return }
        kill(pid, SIGTERM)
        let deadline = monotonicNanoseconds() + 10_000_000_000
        var st: Int32 = 0
        while waitpid(pid, &st, WNOHANG) == 0 && monotonicNanoseconds() < deadline { usleep(5_000) }
    }
}

/// A `vfio-live device serve` child process.
final class ChildServer {
    let child: Child
    let socket: String
    var pid: Int32 { child.pid }

    init(socket: String, stateSize: String) throws {
        self.socket = socket
        child = try Child(["device", "serve", "--device", "dma-engine", "--socket", socket, "--state-size", stateSize, "--quiet"])
    }

    func connect() throws -> VFIOUserClient {
        let deadline = monotonicNanoseconds() + 10_000_000_000
        while true {
            if let c = try? VFIOUserClient(path: socket) { return c }
            guard child.process.isRunning, monotonicNanoseconds() < deadline else {
                throw Failure("device server for \(socket) did not come up")
            }
            usleep(5000)
        }
    }

    func stop() { child.stop() }
}

/// DMA jobs with known checksums against one dma-engine, on its own thread.
final class DemoWorkload: @unchecked Sendable {
    struct Job { var toRAM: Bool; var ramOffset: UInt64; var deviceOffset: UInt64; var count: UInt64 }
    let client: VFIOUserClient, irq: EventFD, ram: MappedRegion
    let ramSize: UInt64, iova: UInt64, dataWindow: UInt64
    private(set) var completed = 0
    private(set) var bytes: UInt64 = 0
    private(set) var failures: [String] = []
    private(set) var inFlight: Job?
    private var stopRequested = false
    private let lock = Mutex()
    private var thread: OSThread?
    private var rng: UInt64 = 0x9e3779b97f4a7c15

    init(client: VFIOUserClient, irq: EventFD, ram: MappedRegion, ramSize: UInt64, iova: UInt64, dataWindow: UInt64) {
        self.client = client; self.irq = irq; self.ram = ram; self.ramSize = ramSize; self.iova = iova; self.dataWindow = dataWindow
    }

    private func next() -> UInt64 { rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17; return rng }

    func start() throws {
        try? client.write32(0, DMAEngine.Reg.liveness, 0xc0ffee)
        try? client.write32(0, DMAEngine.Reg.factorial, 12)
        thread = try OSThread(name: "demo-workload") { [self] in
            while !lock.withLock({ stopRequested }) {
                do { try runOne(wait: true) } catch { lock.withLock { failures.append("\(error)") }; return }
            }
        }
    }

    private func submit(_ j: Job) throws {
        try client.write64(0, DMAEngine.Reg.dmaSource, j.toRAM ? DMAEngine.deviceMemoryBase + j.deviceOffset : iova + j.ramOffset)
        try client.write64(0, DMAEngine.Reg.dmaDestination, j.toRAM ? iova + j.ramOffset : DMAEngine.deviceMemoryBase + j.deviceOffset)
        try client.write64(0, DMAEngine.Reg.dmaCount, j.count)
        try client.write64(0, DMAEngine.Reg.dmaCommand, DMAEngine.dmaCommandStart | DMAEngine.dmaCommandIRQ | (j.toRAM ? DMAEngine.dmaCommandToRAM : 0))
    }

    private func runOne(wait: Bool) throws {
        let count = (next() % 256 + 1) * 4096
        let toRAM = next() % 2 == 0
        let ramOffset = next() % ((ramSize - count) / 4096) * 4096
        let devOffset = next() % ((dataWindow - count) / 4096) * 4096
        let j = Job(toRAM: toRAM, ramOffset: ramOffset, deviceOffset: devOffset, count: count)
        if !toRAM {
            // Fresh data in guest RAM for the device to read.
            let p = ram.base.advanced(by: Int(ramOffset)).assumingMemoryBound(to: UInt64.self)
            for i in 0..<Int(count / 8) { p[i] = next() }
        }
        try submit(j)
        guard try irq.wait(timeoutMilliseconds: 30_000) > 0 else { throw Failure("job did not complete") }
        try client.write32(0, DMAEngine.Reg.irqAck, DMAEngine.irqDMA)
        let sum = try client.read64(0, DMAEngine.Reg.lastJobChecksum)
        let ramSum = DMAEngine.jobChecksum(of: UnsafeRawBufferPointer(start: ram.base + Int(ramOffset), count: Int(count)))
        lock.withLock {
            if sum != ramSum || (try? client.read64(0, DMAEngine.Reg.lastJobStatus)) != 0 {
                failures.append("job \(completed + 1): device checksum \(hex(sum)), guest RAM \(hex(ramSum))")
            }
            completed += 1
            bytes += count
        }
    }

    /// Stop submitting, then start one large device→RAM job and return without waiting for it.
    func stopLeavingJobInFlight() throws {
        lock.withLock { stopRequested = true }
        thread?.join()
        let count = min(dataWindow, ramSize / 2) / 4096 * 4096
        let j = Job(toRAM: true, ramOffset: ramSize / 2, deviceOffset: 0, count: count)
        inFlight = j
        // Throttled (1 ms per 64 KiB step), so that the job is certainly part-way at the switch.
        try client.write64(0, DMAEngine.Reg.dmaStepDelay, 1000)
        try submit(j)
        usleep(3000)
    }
}

extension DemoCommand {
    static func connectQMP(_ path: String, _ child: Child) throws -> QMPClient {
        let deadline = monotonicNanoseconds() + 30_000_000_000
        while true {
            if let c = try? QMPClient(path: path) { return c }
            guard child.process.isRunning, monotonicNanoseconds() < deadline else { throw Failure("the VM for \(path) did not come up") }
            usleep(20_000)
        }
    }

    func runVMDemo() throws {
        let dir = "/tmp/vfio-live-demo-\(getpid())"
        mkdir(dir, 0o700)
        var checks: [(String, Bool)] = []
        func check(_ name: String, _ ok: Bool, _ detail: String = "") {
            checks.append((name, ok))
            print("  [\(ok ? "ok" : "FAILED")] \(name)\(detail.isEmpty ? "" : ": " + detail)")
        }
        let ram = "256M"
        let l = try TCPListener(host: "127.0.0.1", port: 0)
        let port = l.port
        l.close()
        print("1. two dma-engine device servers and two VMMs, each its own process (logs in \(dir))")
        var children: [Child] = []
        defer { for c in children { c.stop() } }
        children.append(try Child(["device", "serve", "--socket", "\(dir)/dev-a.sock", "--state-size", stateSize, "-q"], log: "\(dir)/dev-a.log"))
        children.append(try Child(["device", "serve", "--socket", "\(dir)/dev-b.sock", "--state-size", stateSize, "-q"], log: "\(dir)/dev-b.log"))
        usleep(300_000)
        let workload = "working-set=64M,dirty-rate=\(dirtyRate),dma-every=8"
        let vmA = try Child(["vm", "run", "--memory", ram, "--vcpus", "2", "--device", "vfio-user,socket=\(dir)/dev-a.sock",
                             "--workload", workload, "--qmp", "\(dir)/vm-a.qmp", "-q"], log: "\(dir)/vm-a.log")
        let vmB = try Child(["vm", "run", "--memory", ram, "--vcpus", "2", "--device", "vfio-user,socket=\(dir)/dev-b.sock",
                             "--workload", workload, "--qmp", "\(dir)/vm-b.qmp", "--incoming", "tcp:127.0.0.1:\(port)", "-q"], log: "\(dir)/vm-b.log")
        children += [vmA, vmB]
        let a = try Self.connectQMP("\(dir)/vm-a.qmp", vmA), b = try Self.connectQMP("\(dir)/vm-b.qmp", vmB)
        print("   source VM: \(ram) guest RAM, 2 vCPUs, workload \(workload); destination waits on tcp:127.0.0.1:\(port)")

        print("2. the guest runs for \(seconds) s on the source")
        usleep(UInt32(seconds * 1e6))
        let before = try a.execute("x-vfio-live-verify")
        let mode: String = { if case let .string(m)? = before["mode"] { return m }; return "?" }()
        check("source guest consistent before the migration (\(mode))", before["ok"] == .bool(true),
              "\(before["page-writes"]?.uint64 ?? 0) page writes, \(before["dma-round-trips"]?.uint64 ?? 0) DMA round trips")

        print("3. live migration over loopback TCP (downtime limit \(downtimeLimit) ms)")
        _ = try a.execute("migrate-set-parameters", [("downtime-limit", .number(Double(downtimeLimit)))])
        _ = try a.execute("migrate-set-capabilities", [("capabilities", .array([.object([("capability", .string("auto-converge")), ("state", .bool(true))])]))])
        let t0 = monotonicNanoseconds()
        _ = try a.execute("migrate", [("uri", .string("tcp:127.0.0.1:\(port)"))])
        var final = JSONValue.null
        var lastIteration: UInt64 = 0
        while true {
            usleep(50_000)
            let q = try a.execute("query-migrate")
            final = q
            let it = q["ram"]?["dirty-sync-count"]?.uint64 ?? 0
            if it != lastIteration {
                lastIteration = it
                print("   iteration \(it): \(formatBytes(q["ram"]?["transferred"]?.uint64 ?? 0)) sent, \(formatBytes(q["ram"]?["remaining"]?.uint64 ?? 0)) dirty, expected downtime \(q["expected-downtime"]?.uint64 ?? 0) ms")
            }
            if case let .string(s)? = q["status"], ["completed", "failed", "cancelled"].contains(s) { break }
        }
        let total = Double(monotonicNanoseconds() - t0) / 1e6
        let status: String = { if case let .string(s)? = final["status"] { return s }; return "?" }()
        check("migration completed", status == "completed", status == "completed" ? "" : "\(final["error-desc"] ?? .null)")
        let sourceDevices = (try? a.execute("x-vfio-live-devices")) ?? .null
        let sourceStatus = (try? a.execute("query-status"))?["status"]
        check("the source stopped (postmigrate)", sourceStatus == .string("postmigrate"))
        _ = try? a.execute("quit")
        let downtime = final["downtime"]?.uint64 ?? 0

        print("4. verification on the destination")
        let st = try b.execute("query-status")
        check("destination VM running", st["status"] == .string("running"))
        let after1 = try b.execute("x-vfio-live-verify")
        usleep(1_000_000)
        let after2 = try b.execute("x-vfio-live-verify")
        check("every page's invariant holds on the destination", after2["ok"] == .bool(true) && after1["ok"] == .bool(true),
              "\(after2["pages"]?.uint64 ?? 0) pages\(after2["violation"].map { $0 == .null ? "" : ", " + $0.description } ?? "")")
        let w1 = after1["page-writes"]?.uint64 ?? 0, w2 = after2["page-writes"]?.uint64 ?? 0
        check("the guest carries on where it stopped", w1 >= (before["page-writes"]?.uint64 ?? 0) && w2 > w1, "\(w1) → \(w2) page writes")
        let d0 = before["dma-round-trips"]?.uint64 ?? 0, d1 = after1["dma-round-trips"]?.uint64 ?? 0, d2 = after2["dma-round-trips"]?.uint64 ?? 0
        check("device jobs before and after the switch all verified", d1 >= d0 && d2 > d1 && after2["dma-errors"]?.uint64 == 0,
              "DMA round trips \(d0) → \(d1) → \(d2), errors \(after2["dma-errors"]?.uint64 ?? 0)")
        let destDevices = try b.execute("x-vfio-live-devices")
        let da = sourceDevices.arrayFirst?["digest"], db = destDevices.arrayFirst?["digest"]
        check("device memory arrived intact (source at stop = destination at load)", da != nil && da == db && da != .string(""),
              "\(formatBytes(try parseSize(stateSize))) checksum \(db?.description ?? "?")")

        print("5. live update of the migrated VM's VMM: cpr-transfer to a new process, then cpr-exec in place")
        let updates = try Self.liveUpdates(qmp: "\(dir)/vm-b.qmp", check: check)

        let ramBytes = final["ram"]?["transferred"]?.uint64 ?? 0, dev = final["vfio"]?["transferred"]?.uint64 ?? 0
        print("")
        print("report")
        print("  total time:        \(final["total-time"]?.uint64 ?? UInt64(total)) ms")
        // Reported, not checked: it is a wall-clock figure (a debug build or a loaded machine
        // exceeds it); the checks are about correctness.
        print("  downtime:          \(downtime) ms (limit \(downtimeLimit) ms: \(downtime <= downtimeLimit ? "within" : "EXCEEDED"))")
        print("  iterations:        \(final["ram"]?["dirty-sync-count"]?.uint64 ?? 0)")
        print("  transferred:       \(formatBytes(ramBytes)) (\(final["ram"]?["normal"]?.uint64 ?? 0) pages sent, \(final["ram"]?["duplicate"]?.uint64 ?? 0) zero pages elided), device state \(formatBytes(dev))")
        print("  throughput:        \(gbps(Double(ramBytes) / max(Double(final["total-time"]?.uint64 ?? 1) / 1000, 0.001)))")
        for (mode, blackout) in updates { print("  \(mode) blackout: \(formatFixed(blackout, 2)) ms (guest RAM and device handed over, nothing copied)") }
        let failed = checks.filter { !$0.1 }.count
        print("  checks:            \(checks.count - failed) passed, \(failed) failed")
        if failed > 0 { throw ExitCode(1) }
    }

    /// Live-update the VMM behind `qmp` twice (cpr-transfer, then cpr-exec), checking after
    /// each that the guest and its device DMA go on and every page verifies; quits it at the end.
    static func liveUpdates(qmp: String, check: (String, Bool, String) -> Void) throws -> [(String, Double)] {
        var out: [(String, Double)] = []
        for mode in ["cpr-transfer", "cpr-exec"] {
            let c = try QMPClient(path: qmp)
            let pid0 = c.pidOf()
            let before = try c.execute("x-vfio-live-verify")
            _ = try c.execute("x-vfio-live-update", [("mode", .string(mode))])
            let result = UpdateCommand.awaitLiveUpdate(qmp: qmp, client: c, timeoutSeconds: 60)
            let r = result["x-vfio-live-cpr"]
            let blackout = Double(r?["blackout-ns"]?.uint64 ?? 0) / 1e6
            check("\(mode) completed", result["status"] == .string("completed"),
                  result["status"] == .string("completed") ? "blackout \(formatFixed(blackout, 2)) ms, \(r?["handed-over"]?.description ?? "")" : "\(result["error-desc"] ?? .null)")
            usleep(300_000)
            let n = try QMPClient(path: qmp)
            let pid1 = n.pidOf()
            check(mode == "cpr-transfer" ? "a new VMM process runs the VM" : "the VMM re-executed in place (same PID)",
                  mode == "cpr-transfer" ? pid1 != pid0 : pid1 == pid0, "pid \(pid0) → \(pid1)")
            let a1 = try n.execute("x-vfio-live-verify")
            usleep(500_000)
            let a2 = try n.execute("x-vfio-live-verify")
            let w0 = before["page-writes"]?.uint64 ?? 0, w2 = a2["page-writes"]?.uint64 ?? 0
            let d0 = before["dma-round-trips"]?.uint64 ?? 0, d2 = a2["dma-round-trips"]?.uint64 ?? 0
            check("after \(mode): every page verifies, the guest and its DMA go on", a1["ok"] == .bool(true) && a2["ok"] == .bool(true) && w2 > w0 && d2 > d0,
                  "page writes \(w0) → \(w2), DMA round trips \(d0) → \(d2)")
            out.append((mode, blackout))
        }
        _ = try? QMPClient(path: qmp).execute("quit")
        return out
    }
}

extension QMPClient {
    func pidOf() -> UInt64 { (try? execute("x-vfio-live-pid"))?["pid"]?.uint64 ?? 0 }
}

extension JSONValue {
    var arrayFirst: JSONValue? { if case let .array(a) = self { return a.first }; return nil }
}
