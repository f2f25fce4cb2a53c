import ArgumentParser
import Devices
import Glibc
import SystemCalls
import VFIO
import VFIOUser

struct BenchCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "bench",
        abstract: "Measure vfio-live beside the physical references measured in the same run.",
        discussion: HelpText.reflow("""
            Every figure is printed next to its reference (raw UNIX-socket round trip, memcpy
            bandwidth) measured in the same run, as a ratio: the machines vary ±20–50% with load,
            so only same-run ratios mean anything.
            """),
        subcommands: [VFIOUserBench.self, DeviceStateBench.self, VMBench.self, MigrationBench.self, UpdateBench.self])
}

/// `--json`, shared by every bench subcommand.
struct BenchOutputOptions: ParsableArguments {
    @Flag(help: "Print one JSON object per line per figure (bench, figure, value, unit, and where they exist reference, reference_value, ratio, target, met) instead of the table.")
    var json = false
}

/// Where a bench's figures go: the human table (the default) or one JSON object per figure.
/// Every figure is recorded through `figure`; table lines through `say`, which --json silences.
struct BenchOutput {
    let bench: String
    let json: Bool
    init(_ bench: String, _ options: BenchOutputOptions) { self.bench = bench; json = options.json }

    func say(_ line: String) {
        guard !json else { return }
        print(line)
        fflush(stdout)
    }

    /// A figure; `reference` with its value gives the ratio (value / reference unless given),
    /// `target` with `met` says whether the target was reached.
    func figure(_ name: String, _ value: Double, _ unit: String, reference: String? = nil, referenceValue: Double? = nil,
                ratio: Double? = nil, target: String? = nil, met: Bool? = nil) {
        guard json else { return }
        var o: [(String, JSONValue)] = [("bench", .string(bench)), ("figure", .string(name)), ("value", Self.number(value)), ("unit", .string(unit))]
        if let reference, let rv = referenceValue {
            o += [("reference", .string(reference)), ("reference_value", Self.number(rv))]
            let r = ratio ?? (rv != 0 ? value / rv : .nan)
            o.append(("ratio", Self.number(r)))
        }
        if let target { o.append(("target", .string(target))) }
        if let met { o.append(("met", .bool(met))) }
        print(JSONValue.object(o).description)
        fflush(stdout)
    }

    /// A peer or a part that could not run: a line in the table, a figure with value null and
    /// the reason in JSON.
    func skipped(_ name: String, _ reason: String) {
        if json {
            print(JSONValue.object([("bench", .string(bench)), ("figure", .string(name)), ("value", .null), ("skipped", .string(reason))]).description)
            fflush(stdout)
        } else { say("\(name): \(reason)") }
    }

    /// JSON has no NaN or infinity: those are null.
    static func number(_ d: Double) -> JSONValue { d.isFinite ? .number(d) : .null }

    /// The share of CPU time the hypervisor took from this machine since `start` (steal in
    /// /proc/stat): on a shared host every figure swings with it, and a reader should know.
    func stolenTime(since start: CPUTicks?) {
        guard let a = start, let b = CPUTicks.now(), b.total > a.total, b.steal >= a.steal else { return }
        let pct = 100 * Double(b.steal - a.steal) / Double(b.total - a.total)
        say("CPU time stolen by the hypervisor during this bench: \(formatFixed(pct, 1))% (the figures swing with it on a shared host)")
        figure("CPU time stolen by the hypervisor during this bench", pct, "%")
    }
}

/// The machine's CPU time in clock ticks, from /proc/stat's first line.
struct CPUTicks {
    var steal: UInt64, total: UInt64
    static func now() -> CPUTicks? {
        guard let line = readKernelFileLine("/proc/stat"), line.hasPrefix("cpu ") else { return nil }
        // user nice system idle iowait irq softirq steal (guest time is inside user and nice)
        let f = line.split(separator: " ").dropFirst().compactMap { UInt64($0) }
        guard f.count >= 8 else { return nil }
        return CPUTicks(steal: f[7], total: f.prefix(8).reduce(0, &+))
    }
}

/// Median and 99th percentile of a sample, in microseconds.
func percentiles(_ ns: [UInt64]) -> (p50: Double, p99: Double) {
    let s = ns.sorted()
    return (Double(s[s.count / 2]) / 1000, Double(s[min(s.count - 1, s.count * 99 / 100)]) / 1000)
}

/// Raw AF_UNIX round trip of a 64-byte message to an echo thread.
func rawSocketRoundTrip(iterations: Int) throws -> [UInt64] {
    let (a, b) = try UnixSocket.pair()
    let echo = try OSThread(name: "bench-echo") {
        var buf = [UInt8](repeating: 0, count: 64)
        while true {
            guard (try? buf.withUnsafeMutableBytes({ try b.receiveExactly(into: $0, maxFDs: 0) })) != nil else { return }
            guard (try? b.send(buf)) != nil else { return }
        }
    }
    var out: [UInt64] = []
    out.reserveCapacity(iterations)
    var buf = [UInt8](repeating: 1, count: 64)
    for _ in 0..<iterations {
        let t = monotonicNanoseconds()
        try a.send(buf)
        _ = try buf.withUnsafeMutableBytes { try a.receiveExactly(into: $0, maxFDs: 0) }
        out.append(monotonicNanoseconds() - t)
    }
    a.close()
    echo.join()
    b.close()
    return out
}

/// memcpy bandwidth in bytes/s over `size` bytes (best of `rounds`).
func memcpyBandwidth(size: Int, rounds: Int = 5) throws -> Double {
    let src = try MappedRegion(anonymous: size), dst = try MappedRegion(anonymous: size)
    memset(src.base, 0x5a, size)
    memset(dst.base, 0, size)
    var best = Double.infinity
    for _ in 0..<rounds {
        let t = monotonicNanoseconds()
        memcpy(dst.base, src.base, size)
        best = min(best, Double(monotonicNanoseconds() - t))
    }
    return Double(size) / (best / 1e9)
}

/// Raw AF_UNIX stream throughput in bytes/s: one thread sends `total` bytes in `chunk`-byte
/// writes, another receives them into one buffer (best of `rounds`). The sender gets the same
/// SO_SNDBUF as the vfio-user connections (`UnixSocket.streamSendBuffer`), so the reference
/// has every advantage the device-state path has.
func rawUnixThroughput(total: Int, chunk: Int = 1 << 20, rounds: Int = 3) throws -> Double {
    var best = 0.0
    for _ in 0..<rounds {
        let (a, b) = try UnixSocket.pair()
        a.setSendBuffer(); b.setSendBuffer()
        let receiver = try OSThread(name: "bench-unix-rx") {
            let buf = UnsafeMutableRawBufferPointer.allocate(byteCount: chunk, alignment: 64)
            defer { buf.deallocate() }
            memset(buf.baseAddress!, 0, chunk)
            var left = total
            while left > 0 {
                let n = Glibc.read(b.fd.rawValue, buf.baseAddress!, min(chunk, left))
                if n <= 0 { return }
                left -= n
            }
        }
        let buf = UnsafeMutableRawBufferPointer.allocate(byteCount: chunk, alignment: 64)
        memset(buf.baseAddress!, 0x5a, chunk)
        let t = monotonicNanoseconds()
        var sent = 0
        while sent < total { try a.send([UnsafeRawBufferPointer(rebasing: buf[0..<min(chunk, total - sent)])]); sent += min(chunk, total - sent) }
        receiver.join()
        let dt = Double(monotonicNanoseconds() - t)
        buf.deallocate()
        a.close(); b.close()
        best = max(best, Double(total) / (dt / 1e9))
    }
    return best
}

func gbps(_ bytesPerSecond: Double) -> String { formatFixed(bytesPerSecond / 1e9, 2) + " GB/s" }
func ratioText(_ r: Double) -> String { formatFixed(r, 2) + "×" }

struct VFIOUserBench: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "vfio-user",
        abstract: "Region-read round trip and device DMA throughput, beside raw socket and memcpy.")
    @Option(help: "Round trips to time.")
    var iterations = 20000
    @Option(help: "Bytes per DMA job (and device memory size); a power of two.")
    var dmaSize = "64M"
    @OptionGroup var output: BenchOutputOptions
    @OptionGroup var global: GlobalOptions

    func run() throws {
        global.apply()
        let ticks = CPUTicks.now()
        if !global.verbose { Log.level = .warning }
        let size = try parseSize(dmaSize)
        let raw = percentiles(try rawSocketRoundTrip(iterations: iterations))

        let srv = try InProcessServer(path: InProcessServer.temporaryPath("bench"), stateSize: size * 2)
        defer { srv.stop() }
        let c = try VFIOUserClient(path: srv.path)
        defer { c.close() }
        for _ in 0..<1000 { _ = try c.read32(0, DMAEngine.Reg.identification) }
        var rt: [UInt64] = []
        rt.reserveCapacity(iterations)
        for _ in 0..<iterations {
            let t = monotonicNanoseconds()
            _ = try c.read32(0, DMAEngine.Reg.identification)
            rt.append(monotonicNanoseconds() - t)
        }
        let region = percentiles(rt)

        // DMA: guest RAM in a memfd, mapped by fd (the fast path), jobs in both directions.
        let ram = try MemFD.create(name: "bench-guest-ram", size: size)
        let map = try MappedRegion(fd: ram, length: Int(size), populate: true)
        memset(map.base, 0x42, Int(size))
        try c.mapDMA(iova: 0x1_0000_0000, size: size, local: map.base, fd: ram)
        let irq = try EventFD()
        try c.setIRQs(index: 1, eventfds: [irq])
        try c.write32(7, 0x40, 0x0081_0005)
        func job(toRAM: Bool) throws -> Double {
            try c.write64(0, DMAEngine.Reg.dmaSource, toRAM ? DMAEngine.deviceMemoryBase : 0x1_0000_0000)
            try c.write64(0, DMAEngine.Reg.dmaDestination, toRAM ? 0x1_0000_0000 : DMAEngine.deviceMemoryBase)
            try c.write64(0, DMAEngine.Reg.dmaCount, size)
            let t = monotonicNanoseconds()
            try c.write64(0, DMAEngine.Reg.dmaCommand, DMAEngine.dmaCommandStart | DMAEngine.dmaCommandIRQ | (toRAM ? DMAEngine.dmaCommandToRAM : 0))
            guard try irq.wait(timeoutMilliseconds: 60_000) > 0 else { throw ValidationError("DMA job timed out") }
            let dt = Double(monotonicNanoseconds() - t)
            try c.write32(0, DMAEngine.Reg.irqAck, DMAEngine.irqDMA)
            return Double(size) / (dt / 1e9)
        }
        _ = try job(toRAM: false)  // warm up: populate device memory
        var toDevice = 0.0, toRAM = 0.0
        for _ in 0..<3 { toDevice = max(toDevice, try job(toRAM: false)); toRAM = max(toRAM, try job(toRAM: true)) }
        let mc = try memcpyBandwidth(size: Int(size))

        let out = BenchOutput("vfio-user", output)
        defer { out.stolenTime(since: ticks) }
        out.say("vfio-live bench vfio-user (same-run references; \(iterations) round trips, \(formatBytes(size)) DMA jobs)")
        out.say("figure                              value             reference                        ratio   target")
        out.say("region-read round trip p50          \(pad(formatFixed(region.p50, 1) + " µs", 17)) raw UNIX socket p50 \(pad(formatFixed(raw.p50, 1) + " µs", 12)) \(pad(ratioText(region.p50 / raw.p50), 7)) ≤ 2×")
        out.say("region-read round trip p99          \(pad(formatFixed(region.p99, 1) + " µs", 17)) raw UNIX socket p99 \(pad(formatFixed(raw.p99, 1) + " µs", 12)) \(pad(ratioText(region.p99 / raw.p99), 7)) ≤ 2×")
        out.say("device DMA guest RAM → device       \(pad(gbps(toDevice), 17)) memcpy             \(pad(gbps(mc), 12)) \(pad(formatFixed(100 * toDevice / mc, 0) + "%", 7)) ≥ 50%")
        out.say("device DMA device → guest RAM       \(pad(gbps(toRAM), 17)) memcpy             \(pad(gbps(mc), 12)) \(pad(formatFixed(100 * toRAM / mc, 0) + "%", 7)) ≥ 50%")
        out.figure("region-read round trip p50", region.p50, "us", reference: "raw UNIX socket round trip p50", referenceValue: raw.p50, target: "≤ 2×", met: region.p50 <= 2 * raw.p50)
        out.figure("region-read round trip p99", region.p99, "us", reference: "raw UNIX socket round trip p99", referenceValue: raw.p99, target: "≤ 2×", met: region.p99 <= 2 * raw.p99)
        out.figure("device DMA guest RAM → device", toDevice, "bytes/s", reference: "memcpy", referenceValue: mc, target: "≥ 0.5×", met: toDevice >= 0.5 * mc)
        out.figure("device DMA device → guest RAM", toRAM, "bytes/s", reference: "memcpy", referenceValue: mc, target: "≥ 0.5×", met: toRAM >= 0.5 * mc)
    }
}

func pad(_ s: String, _ n: Int) -> String { s.count >= n ? s : s + String(repeating: " ", count: n - s.count) }

struct DeviceStateBench: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "device-state",
        abstract: "Device-state transfer throughput (stop-copy of dma-engine memory) beside raw AF_UNIX and memcpy.")
    @Option(help: "Device memory to move; a power of two.")
    var stateSize = "256M"
    @Option(help: "Protocol: v2 or v1.")
    var `protocol` = "v2"
    @Option(help: "Bytes per MIG_DATA_READ / MIG_DATA_WRITE (v2): both servers advertise it as max_data_xfer_size and the client asks for it. The spec's default is 1M.")
    var chunk = "1M"
    @OptionGroup var output: BenchOutputOptions
    @OptionGroup var global: GlobalOptions

    func run() throws {
        global.apply()
        let ticks = CPUTicks.now()
        if !global.verbose { Log.level = .warning }
        let size = try parseSize(stateSize)
        let chunkBytes = try parseSize(chunk)
        guard chunkBytes >= 4096, chunkBytes <= 64 << 20 else { throw ValidationError("--chunk must be between 4K and 64M") }
        guard let proto = MigrationProtocol(rawValue: `protocol`) else { throw ValidationError("--protocol must be v1 or v2") }
        // Record checksums off (the default, as QEMU relies on the transport), then on: its cost.
        // The reference swings 3-5 GB/s between runs a second apart on these machines, so the
        // figure and the reference are medians of three runs taken in turn, as in `bench
        // migration` (a best-of-three reference beside a single figure favoured the reference).
        var last: DeviceTransferReport?
        let medians = try MigrationBench.interleavedMedians([
            { try rawUnixThroughput(total: Int(min(size, 256 << 20)), rounds: 1) },
            {
                let (r, rate) = try Self.transfer(size: size, proto: proto, checksums: false, chunk: Int(chunkBytes))
                last = r
                return rate
            }])
        let (unix, rate) = (medians[0], medians[1])
        guard let r = last else { throw ValidationError("no transfer ran") }
        let (rc, rateChecked) = try Self.transfer(size: size, proto: proto, checksums: true, chunk: Int(chunkBytes))
        let mc = try memcpyBandwidth(size: Int(min(size, 256 << 20)))
        let out = BenchOutput("device-state", output)
        defer { out.stolenTime(since: ticks) }
        out.say("vfio-live bench device-state (migration \(proto), \(formatBytes(r.totalBytes)) moved server → client → server in \(formatBytes(chunkBytes)) messages, stop-copy to destination RUNNING)")
        out.say("figure                              value             reference                        ratio   target")
        out.say("device-state transfer               \(pad(gbps(rate), 17)) raw AF_UNIX stream \(pad(gbps(unix), 12)) \(pad(ratioText(rate / unix), 7)) ≥ 0.5×")
        out.say("  with record checksums             \(pad(gbps(rateChecked), 17)) raw AF_UNIX stream \(pad(gbps(unix), 12)) \(pad(ratioText(rateChecked / unix), 7))")
        out.say("device-state transfer / memcpy      \(pad(gbps(rate), 17)) memcpy             \(pad(gbps(mc), 12)) \(pad(formatFixed(100 * rate / mc, 0) + "%", 7))")
        out.figure("device-state transfer", rate, "bytes/s", reference: "raw AF_UNIX stream", referenceValue: unix, target: "≥ 0.5×", met: rate >= 0.5 * unix)
        out.figure("device-state transfer with record checksums", rateChecked, "bytes/s", reference: "raw AF_UNIX stream", referenceValue: unix)
        out.say("  of which (last run): source to STOP_COPY \(formatFixed(Double(r.stopTransitionNanoseconds) / 1e6, 1)) ms, data \(formatFixed(Double(r.stopCopyDataNanoseconds) / 1e6, 1)) ms (\(gbps(Double(r.stopCopyBytes) / (Double(max(r.stopCopyDataNanoseconds, 1)) / 1e9)))), destination load and RUNNING \(formatFixed(Double(r.destinationLoadNanoseconds) / 1e6, 1)) ms")
        out.say("  with record checksums: data \(formatFixed(Double(rc.stopCopyDataNanoseconds) / 1e6, 1)) ms")
        out.figure("device-state transfer vs memcpy", rate, "bytes/s", reference: "memcpy", referenceValue: mc)
    }

    /// One stop-copy of `size` bytes of touched dma-engine memory between two fresh servers.
    static func transfer(size: UInt64, proto: MigrationProtocol, checksums: Bool, chunk: Int = 1 << 20) throws -> (DeviceTransferReport, Double) {
        var so = VFIOUserServer.Options(); so.maxDataXferSize = UInt64(chunk)
        var co = VFIOUserClient.Options(); co.maxDataXferSize = UInt64(chunk)
        let a = try InProcessServer(path: InProcessServer.temporaryPath("bench-a"), stateSize: size, options: so, name: "source")
        let b = try InProcessServer(path: InProcessServer.temporaryPath("bench-b"), stateSize: size, options: so, name: "destination")
        defer { a.stop(); b.stop() }
        a.device.stateChecksums = checksums
        let ca = try VFIOUserClient(path: a.path, options: co), cb = try VFIOUserClient(path: b.path, options: co)
        defer { ca.close(); cb.close() }
        // Touch all device memory so that nothing is a lazily zero page.
        let pattern = [UInt8](repeating: 0x6b, count: 1 << 20)
        var off: UInt64 = 0
        while off < size { try ca.regionWrite(2, offset: off, pattern); off += UInt64(pattern.count) }
        var o = DeviceStateTransfer.Options()
        o.preCopy = false
        o.chunk = chunk
        let t = DeviceStateTransfer(source: try DeviceMigration(device: ca, prefer: proto), destination: try DeviceMigration(device: cb, prefer: proto), options: o)
        let r = try t.run()
        return (r, Double(r.totalBytes) / (Double(r.stopCopyNanoseconds) / 1e9))
    }
}
