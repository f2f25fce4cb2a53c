import ArgumentParser
import Glibc
import Machine
import Migration
import SystemCalls

/// `bench migration`'s scale table (issue 12 item 6): the same idle, random-filled migration
/// at several guest RAM sizes, its throughput (which should stay flat as RAM grows) and each
/// VMM's resident memory beyond guest RAM (which must stay O(bitmap) and never grow with the
/// bytes sent).
///
/// The source VM runs in this process, as in the main figure; the destination is a separate
/// `vfio-live vm run --incoming` process, so that each side's memory is its own.
///
/// Memory method. Guest RAM is a memfd (shmem) and is the only shared memory a VMM maps, so
/// RssShmem in /proc/PID/status is the guest RAM it has touched, and RssAnon + RssFile is
/// everything else: heap, bitmaps, staging buffers, thread stacks, the binary. That sum, read
/// every 20 ms (two cheap counter reads; smaps would walk every page table and slow the
/// migration), is "beyond guest RAM". After the migration one /proc/PID/smaps read checks the
/// premise: shmem that is not the guest-RAM memfd's mapping is added back and reported.
/// Kernel socket buffers are not in any RSS.
enum ScaleBench {
    struct Memory {
        var rss: UInt64 = 0, anon: UInt64 = 0, file: UInt64 = 0, shmem: UInt64 = 0
        var beyondGuestRAM: UInt64 { anon + file }
    }

    /// /proc/PID/status (kB) of a process, or of this one.
    static func memory(_ pid: pid_t?) -> Memory? {
        guard let text = readText("/proc/\(pid.map(String.init) ?? "self")/status") else { return nil }
        var m = Memory()
        for line in text.split(separator: "\n") {
            let f = line.split(whereSeparator: { $0 == " " || $0 == "\t" })
            guard f.count >= 2, let kb = UInt64(f[1]) else { continue }
            switch f[0] {
            case "VmRSS:": m.rss = kb * 1024
            case "RssAnon:": m.anon = kb * 1024
            case "RssFile:": m.file = kb * 1024
            case "RssShmem:": m.shmem = kb * 1024
            default: break
            }
        }
        return m
    }

    /// Resident bytes of the guest-RAM memfd's mappings, from /proc/PID/smaps.
    static func guestRAMResident(_ pid: pid_t?) -> UInt64? {
        guard let text = readText("/proc/\(pid.map(String.init) ?? "self")/smaps") else { return nil }
        var inGuest = false, total: UInt64 = 0
        for line in text.split(separator: "\n") {
            let f = line.split(whereSeparator: { $0 == " " || $0 == "\t" })
            guard let first = f.first else { continue }
            if !first.hasSuffix(":") {  // a mapping's header: range perms offset dev inode [path]
                inGuest = line.contains("memfd:vfio-live-guest-ram")
            } else if inGuest, first == "Rss:", f.count >= 2, let kb = UInt64(f[1]) {
                total += kb * 1024
            }
        }
        return total
    }

    static func readText(_ path: String) -> String? {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var out = [UInt8](), buf = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = buf.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { break }
            out.append(contentsOf: buf[0..<n])
        }
        return String(decoding: out, as: UTF8.self)
    }

    /// MemAvailable in bytes.
    static func memAvailable() -> UInt64? {
        guard let text = readText("/proc/meminfo") else { return nil }
        for line in text.split(separator: "\n") where line.hasPrefix("MemAvailable:") {
            let f = line.split(separator: " ")
            if f.count >= 2, let kb = UInt64(f[1]) { return kb * 1024 }
        }
        return nil
    }

    /// One side's memory over a migration: before it starts, at 10% of the RAM sent, the peak
    /// after that point, and the overall peak.
    struct Track {
        var before: UInt64 = 0, atTenth: UInt64?, peakAfterTenth: UInt64 = 0, peak: UInt64 = 0
        mutating func add(_ v: UInt64, pastTenth: Bool) {
            peak = max(peak, v)
            if pastTenth {
                if atTenth == nil { atTenth = v }
                peakAfterTenth = max(peakAfterTenth, v)
            }
        }
        /// What the migration added; and what it added while the last 90% of the bytes went.
        var growth: UInt64 { peak > before ? peak - before : 0 }
        var growthAfterTenth: UInt64 { atTenth.map { peakAfterTenth > $0 ? peakAfterTenth - $0 : 0 } ?? 0 }
    }

    struct Result {
        /// End to end (RAM bytes over the whole migration), and over the bulk pass alone.
        var size: UInt64, rate: Double, bulkRate: Double, ramBytes: UInt64
        var totalMS: Double, setupMS: Double, downtimeMS: Double
        var source: Track, destination: Track
        var sourceOtherShmem: UInt64, destinationOtherShmem: UInt64
    }

    /// posix_spawn with stdout and stderr to /dev/null: the destination's own lines must not
    /// mix with the table or the JSON.
    static func spawnQuiet(_ path: String, _ argv: [String]) throws -> pid_t {
        var fa = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&fa)
        defer { posix_spawn_file_actions_destroy(&fa) }
        posix_spawn_file_actions_addopen(&fa, 1, "/dev/null", O_WRONLY, 0)
        posix_spawn_file_actions_adddup2(&fa, 1, 2)
        var pid: pid_t = 0
        let cargs = argv.map { strdup($0) } + [nil]
        defer { for p in cargs { free(p) } }
        let rc = posix_spawn(&pid, path, &fa, nil, cargs, environ)
        guard rc == 0 else { throw Errno(rc) }
        return pid
    }

    /// Migrate an idle VM of `size` with random RAM (as the main figure) to a destination VMM
    /// process over loopback TCP, sampling both sides' memory.
    static func measure(size: UInt64) throws -> Result {
        var w = WorkloadConfig(); w.workingSet = 64 << 20; w.dmaEvery = 0
        let src = try MicroVM(memorySize: size, workload: w)
        defer { src.stop() }
        let start = Int(GuestLayout.workingSetBase + w.workingSet)
        fillRandom(src.memory.base + start, bytes: Int(size) - start)
        try src.start()

        // A free port for the destination (released just before it binds it).
        let probe = try TCPListener(host: "127.0.0.1", port: 0)
        let port = probe.port
        probe.close()
        let pid = try spawnQuiet(ChildProcess.currentExecutable(), [
            "vfio-live", "vm", "run", "--memory", "\(size >> 20)M", "--incoming", "tcp:127.0.0.1:\(port)",
            "--workload", "dirty-rate=0,working-set=64M", "--quiet",
        ])
        var reaped = false
        defer { if !reaped { kill(pid, SIGKILL); ChildProcess.wait(pid) } }
        // It populates its guest RAM before it listens: bounded wait for the port.
        var sock: TCPSocket?
        let deadline = monotonicNanoseconds() + 120_000_000_000
        while sock == nil {
            if let code = ChildProcess.exitStatus(pid) { reaped = true; throw ValidationError("the destination VMM exited with \(code) before listening") }
            sock = try? TCPSocket.connect(host: "127.0.0.1", port: port)
            if sock == nil {
                guard monotonicNanoseconds() < deadline else { throw ValidationError("the destination VMM did not listen on port \(port) within 120 s") }
                usleep(20_000)
            }
        }
        var st = Track(), dt = Track()
        st.before = memory(nil)?.beyondGuestRAM ?? 0
        dt.before = memory(pid)?.beyondGuestRAM ?? 0
        let m = try MigrationSource(vm: src, to: sock!, parameters: MigrationParameters(), policies: [])
        let done = Atomic(false)
        let sampler = try OSThread(name: "bench-rss") {
            while !done.load() {
                // A racy read of a counter only the migration thread writes: a sample's timing.
                let pastTenth = m.stats.ramBytes >= size / 10
                if let s = memory(nil) { st.add(s.beyondGuestRAM, pastTenth: pastTenth) }
                if let d = memory(pid) { dt.add(d.beyondGuestRAM, pastTenth: pastTenth) }
                usleep(20_000)
            }
        }
        do { try m.run() } catch { done.store(true); sampler.join(); throw error }
        done.store(true)
        sampler.join()
        if let s = memory(nil) { st.add(s.beyondGuestRAM, pastTenth: true) }
        if let d = memory(pid) { dt.add(d.beyondGuestRAM, pastTenth: true) }
        // The premise check: shmem other than guest RAM (none expected).
        func otherShmem(_ p: pid_t?) -> UInt64 {
            guard let mem = memory(p), let g = guestRAMResident(p) else { return 0 }
            return mem.shmem > g ? mem.shmem - g : 0
        }
        let so = otherShmem(nil), dso = otherShmem(pid)
        st.peak += so; st.peakAfterTenth += so; st.before += so; st.atTenth = st.atTenth.map { $0 + so }
        dt.peak += dso; dt.peakAfterTenth += dso; dt.before += dso; dt.atTenth = dt.atTenth.map { $0 + dso }
        kill(pid, SIGTERM)
        ChildProcess.wait(pid)
        reaped = true
        let s = m.stats
        // An idle VM converges after its one pass: that iteration's bandwidth is the bulk rate.
        return Result(size: size, rate: Double(s.ramBytes) / (s.totalTimeMS / 1000), bulkRate: s.bandwidth, ramBytes: s.ramBytes,
                      totalMS: s.totalTimeMS, setupMS: Double(s.setupNS) / 1e6, downtimeMS: s.downtimeMS,
                      source: st, destination: dt, sourceOtherShmem: so, destinationOtherShmem: dso)
    }

    /// The table and figures for `sizes` ("256M,1G,4G,8G"); a size the machine's memory cannot
    /// hold (both VMs' RAM plus 1 GiB) is skipped with the reason.
    static func run(sizes: String, out: BenchOutput) throws {
        let list = try sizes.split(separator: ",").map { try parseSize(String($0)) }
        guard !list.isEmpty else { return }
        out.say("")
        out.say("scale: idle VM, random RAM, to a destination VMM process over loopback TCP; memory beyond guest RAM = RssAnon + RssFile")
        out.say("throughput: end to end (RAM bytes / total time) and of the bulk pass; fixed = total − bulk pass; memory in MiB: connected / peak / growth / growth after 10% sent")
        out.say("guest RAM   end to end   bulk pass    vs first  fixed (ms)  downtime (ms)  bitmap     source                        destination")
        var first: Double?
        for size in list {
            let at = formatBytes(size)
            let need = 2 * size + (1 << 30)
            if let avail = memAvailable(), avail < need {
                out.skipped("scale at \(at)", "needs \(formatBytes(need)) (two VMs' guest RAM + 1 GiB), MemAvailable is \(formatBytes(avail))")
                continue
            }
            let r: Result
            do { r = try measure(size: size) } catch { out.skipped("scale at \(at)", "\(error)"); continue }
            let ref = first ?? r.bulkRate
            if first == nil { first = r.bulkRate }
            let bitmap = size / 4096 / 8
            func mib(_ b: UInt64) -> String { formatFixed(Double(b) / 1048576, 1) }
            func side(_ t: Track) -> String { pad("\(mib(t.before)) / \(mib(t.peak)) / \(mib(t.growth)) / \(mib(t.growthAfterTenth))", 29) }
            let fixed = max(r.totalMS - Double(r.ramBytes) / max(r.bulkRate, 1) * 1000, 0)
            out.say("\(pad(at, 11)) \(pad(gbps(r.rate), 12)) \(pad(gbps(r.bulkRate), 12)) \(pad(formatFixed(r.bulkRate / ref, 2) + "×", 9)) \(pad(formatFixed(fixed, 0), 11)) \(pad(formatFixed(r.downtimeMS, 1), 14)) \(pad(formatFixed(Double(bitmap) / 1048576, 2) + " MiB", 10)) \(side(r.source)) \(side(r.destination))")
            if r.sourceOtherShmem + r.destinationOtherShmem > 0 {
                out.say("  (shmem besides guest RAM, added above: source \(mib(r.sourceOtherShmem)) MiB, destination \(mib(r.destinationOtherShmem)) MiB)")
            }
            out.figure("RAM transfer to a VMM process, end to end, \(at)", r.rate, "bytes/s")
            out.figure("RAM transfer to a VMM process, bulk pass, \(at)", r.bulkRate, "bytes/s", reference: "the same at the first size measured", referenceValue: ref,
                       target: "flat: ≥ 0.9×", met: r.bulkRate >= 0.9 * ref)
            out.figure("migration fixed cost (total − bulk pass), \(at)", fixed, "ms")
            for (name, t) in [("source", r.source), ("destination", r.destination)] {
                out.figure("\(name) RSS beyond guest RAM, peak, \(at)", Double(t.peak), "bytes")
                out.figure("\(name) RSS beyond guest RAM, growth during the migration, \(at)", Double(t.growth), "bytes",
                           reference: "dirty bitmap (1 bit per 4 KiB page)", referenceValue: Double(bitmap))
                // Never with the bytes sent: nothing more resident after the first 10% than at it
                // (1 MiB of slack for allocator noise).
                out.figure("\(name) RSS beyond guest RAM, growth after 10% of RAM sent, \(at)", Double(t.growthAfterTenth), "bytes",
                           target: "≤ 1 MiB", met: t.growthAfterTenth <= 1 << 20)
            }
        }
    }
}

/// A flag between two threads.
final class Atomic: @unchecked Sendable {
    private let lock = Mutex()
    private var value: Bool
    init(_ v: Bool) { value = v }
    func load() -> Bool { lock.withLock { value } }
    func store(_ v: Bool) { lock.withLock { value = v } }
}
