import ArgumentParser
import Glibc
import Machine
import Migration
import SystemCalls
import VFIO

struct MigrationBench: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "migration",
        abstract: "RAM transfer throughput beside raw loopback TCP, and downtime against the limit at three dirty rates.")
    @Option(help: "Guest RAM.")
    var memory = "512M"
    @Option(help: "Downtime limit in ms for the downtime table.")
    var downtimeLimit: UInt64 = 300
    @Flag(help: "Leave out QEMU 11.1's figures even when scripts/qemu11.sh finds it.")
    var noQemu = false
    @Option(help: "Guest RAM sizes of the scale table (BenchScale.swift); add 8G for the largest (about 50 s more, 16 GiB resident); a size the machine's memory cannot hold is skipped with the reason; \"\" leaves it out.")
    var sizes = "256M,1G,4G"
    @Flag(help: "Only the downtime table (predicted beside measured at the three dirty rates), e.g. `vfio-live bench migration --downtime-only --runs 3`.")
    var downtimeOnly = false
    @Option(help: "Migrations per dirty rate in the downtime table.")
    var runs = 1
    @Option(help: "The guest's working set in the downtime table (a larger one leaves a larger stop-copy remainder at 200 K pages/s), e.g. `--downtime-only --working-set 256M`.")
    var workingSet = "64M"
    @OptionGroup var output: BenchOutputOptions
    @OptionGroup var global: GlobalOptions

    static func phaseList(_ p: DowntimePhases) -> [(String, Double)] {
        var l = [("pause", p.pause), ("RAM remainder", p.ramRemainder)]
        for (i, d) in p.devices.enumerated() { l.append(("device \(i)", d)) }
        l += [("vCPU state", p.vcpuState), ("destination load", p.destinationLoad), ("handshake", p.handshake), ("resume", p.resume)]
        return l
    }

    static func phasesText(_ p: DowntimePhases) -> String {
        phaseList(p).map { "\($0.0) \(formatFixed($0.1, 1))" }.joined(separator: ", ") + " ms"
    }

    /// Raw TCP loopback: one thread sends `bytes` in 4 MiB writes, this one receives them.
    /// By default both sides reuse one 4 MiB buffer, which stays in cache. With `ramSized`
    /// the sender sends from, and the receiver receives into, `bytes`-sized shared memfd
    /// mappings (as guest RAM is), populated beforehand: every byte crosses main memory twice,
    /// as a migration's must, which is the physical limit of moving RAM.
    static func rawTCP(bytes: Int, ramSized: Bool = false, gate: StartGate? = nil) throws -> Double {
        // A stream that fails before the start still arrives, so that the others are not held.
        var arrived = false
        defer { if !arrived { gate?.arrive() } }
        let chunk = 4 << 20
        let span = ramSized ? bytes : chunk
        let from = try MappedRegion(fd: MemFD.create(name: "raw-tcp-from", size: UInt64(span)), length: span, populate: true)
        let into = try MappedRegion(fd: MemFD.create(name: "raw-tcp-into", size: UInt64(span)), length: span, populate: true)
        // `into` is populated with the memfd's zero pages already.
        if ramSized { fillRandom(from.base, bytes: span) } else { memset(from.base, 0x5a, span) }
        let l = try TCPListener(host: "127.0.0.1", port: 0)
        // Streams in parallel start together, once each has its buffers.
        arrived = true
        gate?.arriveAndWait()
        let sender = try OSThread(name: "raw-tcp") {
            guard let s = try? TCPSocket.connect(host: "127.0.0.1", port: l.port) else { return }
            var at = 0
            while at < bytes {
                let n = min(bytes - at, chunk)
                _ = try? s.send([UnsafeRawBufferPointer(start: from.base + at % span, count: n)])
                at += n
            }
            s.fd.close()
        }
        guard let r = try l.accept(timeoutMilliseconds: 10_000) else { sender.join(); l.close(); throw ValidationError("the raw TCP sender did not connect") }
        let t = monotonicNanoseconds()
        var got = 0
        while got < bytes {
            let n = min(bytes - got, chunk)
            _ = try r.receiveExactly(into: UnsafeMutableRawBufferPointer(start: into.base + got % span, count: n), maxFDs: 0)
            got += n
        }
        let end = monotonicNanoseconds()
        gate?.finished(at: end)
        let dt = Double(end - t) / 1e9
        sender.join(); l.close()
        return Double(bytes) / dt
    }

    /// `streams` raw loopback TCP connections in parallel, `bytes` in all: the reference for
    /// multifd with as many channels.
    static func rawTCP(bytes: Int, streams: Int, ramSized: Bool = false) throws -> Double {
        // Timed from the moment every stream has its buffers (filling RAM-sized ones with
        // random data takes longer than sending them) to the last stream's last byte (freeing
        // the buffers afterwards is not part of moving them).
        let gate = StartGate(parties: streams + 1)
        var threads: [OSThread] = []
        do {
            for _ in 0..<streams {
                threads.append(try OSThread(name: "raw-tcp-n") { _ = try? rawTCP(bytes: bytes / streams, ramSized: ramSized, gate: gate) })
            }
        } catch {
            for _ in threads.count..<streams + 1 { gate.arrive() }
            for t in threads { t.join() }
            throw error
        }
        gate.arriveAndWait()
        for t in threads { t.join() }
        guard gate.finishes == streams else { throw ValidationError("a raw TCP stream failed") }
        return Double(bytes / streams * streams) / (Double(gate.lastFinish - gate.openedAt) / 1e9)
    }

    /// Lets `parties` threads go on together once all have arrived, and keeps when it opened
    /// (under its lock, by the last to arrive: a stream may finish before the main thread runs
    /// again) and when the last of them finished.
    final class StartGate: @unchecked Sendable {
        private let cond = Condition()
        private var waiting: Int
        private(set) var openedAt: UInt64 = 0, lastFinish: UInt64 = 0, finishes = 0
        init(parties: Int) { waiting = parties }
        func arriveAndWait() {
            cond.mutex.withLock {
                arriveLocked()
                while waiting > 0 { cond.wait() }
            }
        }
        /// Arrive without waiting (a party that will not start).
        func arrive() { cond.mutex.withLock { arriveLocked() } }
        private func arriveLocked() {
            waiting -= 1
            if waiting == 0 { openedAt = monotonicNanoseconds(); cond.broadcast() }
        }
        func finished(at t: UInt64) { cond.mutex.withLock { lastFinish = max(lastFinish, t, openedAt + 1); finishes += 1 } }
    }

    /// Migrate a VM to a destination in this process over loopback TCP.
    static func migrate(memory: UInt64, workload: WorkloadConfig, run: Bool, fill: Bool, parameters: MigrationParameters) throws -> MigrationStats {
        let src = try MicroVM(memorySize: memory, workload: workload)
        let dst = try MicroVM(memorySize: memory, workload: workload, populateMemory: true)
        defer { src.stop(); dst.stop() }
        if fill {
            // Random data everywhere past the guest's own areas (as a used guest's RAM is), from
            // the generator that fills QEMU's RAM file for its figures.
            let start = Int(GuestLayout.workingSetBase + workload.workingSet)
            fillRandom(src.memory.base + start, bytes: Int(memory) - start)
        }
        try src.start(); try dst.start()
        if run { src.resume(); usleep(200_000) }
        let l = try TCPListener(host: "127.0.0.1", port: 0, backlog: 16)
        let dthread = try OSThread(name: "bench-dst") {
            if let s = try? l.accept(), let d = try? MigrationDestination(vm: dst, from: s) {
                d.acceptChannel = { ms in try l.accept(timeoutMilliseconds: ms) }
                try? d.run()
            }
        }
        let m = try MigrationSource(vm: src, to: TCPSocket.connect(host: "127.0.0.1", port: l.port), parameters: parameters, policies: [])
        let port = l.port
        m.openChannel = { try TCPSocket.connect(host: "127.0.0.1", port: port) }
        try m.run()
        dthread.join(); l.close()
        return m.stats
    }

    /// An idle VM's whole RAM migrated, in bytes per second of the whole migration.
    static func migrationRate(memory: UInt64, workload: WorkloadConfig, parameters: MigrationParameters) throws -> Double {
        let r = try migrate(memory: memory, workload: workload, run: false, fill: true, parameters: parameters)
        return Double(r.ramBytes) / (r.totalTimeMS / 1000)
    }

    /// The medians of three rounds of `runs`, each round running them in order, so that a
    /// figure and its references see the same moments of the machine.
    static func interleavedMedians(_ runs: [() throws -> Double]) throws -> [Double] {
        var values = [[Double]](repeating: [], count: runs.count)
        for _ in 0..<3 { for (i, run) in runs.enumerated() { values[i].append(try run()) } }
        return values.map { $0.sorted()[1] }
    }

    func run() throws {
        global.apply()
        let ticks = CPUTicks.now()
        if !global.verbose { Log.level = .error }
        let mem = try parseSize(memory)
        var w = WorkloadConfig(); w.workingSet = try parseSize(workingSet); w.dmaEvery = 0
        let out = BenchOutput("migration", output)
        defer { out.stolenTime(since: ticks) }
        if downtimeOnly {
            out.say("vfio-live bench migration (\(KVMSystem.unavailableReason == nil ? "KVM" : "software vCPUs"), \(formatBytes(mem)) guest RAM, loopback TCP)")
            try downtimeTable(mem: mem, workload: w, out: out)
            return
        }
        // Loopback's own rate swings 2-3x from one second to the next on these machines, so
        // each figure and its reference are the medians of three runs, taken in turn.
        // Beside the issue's reference (cache-hot buffers), the same bytes from and to RAM-sized
        // buffers: what moving RAM can reach at best on this machine.
        let medians = try Self.interleavedMedians([
            { try Self.rawTCP(bytes: Int(mem)) },
            { try Self.migrationRate(memory: mem, workload: w, parameters: MigrationParameters()) },
            { try Self.rawTCP(bytes: Int(mem), ramSized: true) }])
        let (raw, ramRate, rawRAM) = (medians[0], medians[1], medians[2])
        out.say("vfio-live bench migration (\(KVMSystem.unavailableReason == nil ? "KVM" : "software vCPUs"), \(formatBytes(mem)) guest RAM, loopback TCP)")
        out.say("figure                              value             reference                        ratio   target")
        out.say("RAM transfer (idle VM, full RAM)    \(pad(gbps(ramRate), 17)) raw loopback TCP   \(pad(gbps(raw), 12)) \(pad(formatFixed(100 * ramRate / raw, 0) + "%", 7)) ≥ 90%")
        out.figure("RAM transfer (idle VM, full RAM)", ramRate, "bytes/s", reference: "raw loopback TCP, one stream", referenceValue: raw, target: "≥ 0.9×", met: ramRate >= 0.9 * raw)
        out.say("  vs RAM-sized raw TCP              \(pad(gbps(ramRate), 17)) raw TCP, RAM bufs  \(pad(gbps(rawRAM), 12)) \(pad(formatFixed(100 * ramRate / rawRAM, 0) + "%", 7)) (memory-bound limit)")
        out.figure("RAM transfer vs RAM-sized raw TCP", ramRate, "bytes/s", reference: "raw loopback TCP, one stream, from and to RAM-sized memfd buffers", referenceValue: rawRAM)
        // The cost of capability x-vfio-live-payload-checksum (a staging copy with a fused
        // checksum at the source, a checksum pass at the destination).
        var checked = MigrationParameters(); checked.payloadChecksum = true
        let checkedRate = try Self.migrationRate(memory: mem, workload: w, parameters: checked)
        out.say("  with payload checksum             \(pad(gbps(checkedRate), 17)) raw loopback TCP   \(pad(gbps(raw), 12)) \(pad(formatFixed(100 * checkedRate / raw, 0) + "%", 7)) (cost)")
        out.figure("RAM transfer with x-vfio-live-payload-checksum", checkedRate, "bytes/s", reference: "raw loopback TCP, one stream", referenceValue: raw)
        // Multifd with 2 channels beside two raw streams in parallel, same run.
        var mfd = MigrationParameters(); mfd.multifd = true; mfd.multifdChannels = 2
        // Its memory-bound limit as for one stream: each raw stream moves half of RAM, from and
        // to its own RAM-sized buffers (with 2 cores, four busy threads share them).
        let multifdMedians = try Self.interleavedMedians([
            { try Self.rawTCP(bytes: Int(mem), streams: 2) },
            { try Self.migrationRate(memory: mem, workload: w, parameters: mfd) },
            { try Self.rawTCP(bytes: Int(mem), streams: 2, ramSized: true) }])
        let (raw2, multifdRate, raw2RAM) = (multifdMedians[0], multifdMedians[1], multifdMedians[2])
        out.say("RAM transfer, multifd 2 channels    \(pad(gbps(multifdRate), 17)) 2 raw TCP streams  \(pad(gbps(raw2), 12)) \(pad(formatFixed(100 * multifdRate / raw2, 0) + "%", 7)) ≥ 90%")
        out.figure("RAM transfer, multifd 2 channels", multifdRate, "bytes/s", reference: "two raw loopback TCP streams in parallel", referenceValue: raw2,
                   target: "≥ 0.9×", met: multifdRate >= 0.9 * raw2)
        out.say("  vs RAM-sized raw TCP, 2 streams   \(pad(gbps(multifdRate), 17)) 2 streams, RAM bufs \(pad(gbps(raw2RAM), 11)) \(pad(formatFixed(100 * multifdRate / raw2RAM, 0) + "%", 7)) (memory-bound limit)")
        out.figure("RAM transfer, multifd 2 channels, vs RAM-sized raw TCP", multifdRate, "bytes/s",
                   reference: "two raw loopback TCP streams in parallel, from and to RAM-sized memfd buffers", referenceValue: raw2RAM)
        if noQemu {
            out.skipped("QEMU 11.1 RAM transfer", "left out (--no-qemu)")
        } else {
            switch QEMUPeer.find() {
            case let .failure(why): out.skipped("QEMU 11.1 RAM transfer", "\(why)")
            case let .success(peer):
                // The same sizes and content: QEMU's RAM is a file of the generator's bytes.
                do {
                    let file = try randomRAMFile(size: mem)
                    defer { unlink(file) }
                    for (name, channels) in [("1 stream", nil), ("multifd 2", 2)] as [(String, Int?)] {
                        let label = "QEMU 11.1 RAM transfer, \(name)"
                        do {
                            let q = try peer.migrationThroughput(ramFile: file, size: mem, multifdChannels: channels)
                            // Each beside ours with the same number of streams.
                            let ours = channels == nil ? ramRate : multifdRate
                            let what = channels == nil ? "one channel" : "multifd 2 channels"
                            out.say("\(pad(label, 35)) \(pad(gbps(q), 17)) vfio-live (above)  \(pad(gbps(ours), 12)) \(pad(ratioText(q / ours), 7)) peer")
                            out.figure(label, q, "bytes/s", reference: "vfio-live RAM transfer, \(what)", referenceValue: ours)
                        } catch { out.skipped(label, "\(error)") }
                    }
                } catch { out.skipped("QEMU 11.1 RAM transfer", "\(error)") }
            }
        }
        out.say("")
        try downtimeTable(mem: mem, workload: w, out: out)
        try ScaleBench.run(sizes: sizes, out: out)
    }

    /// Downtime against the limit, predicted beside measured, with both breakdowns.
    func downtimeTable(mem: UInt64, workload w: WorkloadConfig, out: BenchOutput) throws {
        out.say("downtime against downtime-limit \(downtimeLimit) ms (\(formatBytes(w.workingSet)) working set, 2 vCPUs' worth of writes)")
        out.say("dirty rate (pages/s)   iterations   downtime (ms)   predicted (ms)   within max(20%, 5 ms)   within limit")
        for rate: UInt64 in [10_000, 50_000, 200_000] {
            for _ in 0..<max(runs, 1) {
                var wl = w; wl.dirtyRate = rate
                var p = MigrationParameters(); p.downtimeLimitMS = downtimeLimit
                let s = try Self.migrate(memory: mem, workload: wl, run: true, fill: false, parameters: p)
                // Predicted beside measured: the issue-12 goal is within max(20%, 5 ms).
                let predicted = s.expectedBreakdown?.totalMS ?? Double(s.expectedDowntimeMS)
                let close = abs(predicted - s.downtimeMS) <= max(0.2 * s.downtimeMS, 5)
                out.say("\(pad(String(rate), 22)) \(pad(String(s.iterations), 12)) \(pad(formatFixed(s.downtimeMS, 1), 15)) \(pad(formatFixed(predicted, 1), 16)) \(pad(close ? "yes" : "NO", 23)) \(s.downtimeMS <= Double(downtimeLimit) ? "yes" : "NO")\(s.forcedSwitchover ? " (forced switch-over)" : "")")
                if let m = s.downtimeBreakdown { out.say("    measured:  \(Self.phasesText(m))") }
                if let e = s.expectedBreakdown { out.say("    predicted: \(Self.phasesText(e))") }
                out.figure("downtime at \(rate) pages/s", s.downtimeMS, "ms", reference: "downtime-limit", referenceValue: Double(downtimeLimit),
                           target: "≤ downtime-limit", met: s.downtimeMS <= Double(downtimeLimit))
                out.figure("expected downtime at \(rate) pages/s", predicted, "ms", reference: "measured downtime", referenceValue: s.downtimeMS,
                           target: "within max(20%, 5 ms) of measured", met: close)
                if let m = s.downtimeBreakdown {
                    for (name, v) in Self.phaseList(m) { out.figure("downtime at \(rate) pages/s: \(name)", v, "ms") }
                }
                if let e = s.expectedBreakdown {
                    for (name, v) in Self.phaseList(e) { out.figure("expected downtime at \(rate) pages/s: \(name)", v, "ms") }
                }
                out.figure("iterations at \(rate) pages/s", Double(s.iterations), "iterations")
            }
        }
    }
}
