import ArgumentParser
import Glibc
import Machine
import SystemCalls
import VFIO

struct VMBench: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "vm",
        abstract: "Guest dirtying rate, dirty-log harvest cost per GiB, pause→resume latency.")
    @Option(help: "Guest RAM for the harvest measurement.")
    var memory = "1G"
    @Flag(name: .customLong("software-vcpus"), help: "Use software vCPUs even if /dev/kvm exists.")
    var softwareVCPUs = false
    @OptionGroup var output: BenchOutputOptions
    @OptionGroup var global: GlobalOptions

    func run() throws {
        global.apply()
        let ticks = CPUTicks.now()
        let mem = try parseSize(memory)
        var w = WorkloadConfig()
        w.workingSet = min(mem - (2 << 20), 256 << 20)
        w.dmaEvery = 0
        w.batch = 512
        let vm = try MicroVM(memorySize: mem, vcpus: 1, workload: w, forceSoftware: softwareVCPUs)
        defer { vm.stop() }
        try vm.start()
        func rate(seconds: Double) -> Double {
            let p0 = vm.pagesWritten, t0 = monotonicNanoseconds()
            vm.resume(); usleep(UInt32(seconds * 1e6)); vm.pause()
            return Double(vm.pagesWritten - p0) / (Double(monotonicNanoseconds() - t0) / 1e9)
        }
        let untracked = rate(seconds: 1)
        try vm.setDirtyLogging(true)
        _ = try vm.harvestDirtyPages()
        // Tracked: every first write after a harvest is a write-protection fault; harvest
        // every 50 ms as a migration's iterations would.
        var trackedPages: UInt64 = 0
        let t0 = monotonicNanoseconds(), p0 = vm.pagesWritten
        for _ in 0..<20 { vm.resume(); usleep(50_000); vm.pause(); trackedPages += UInt64(try vm.harvestDirtyPages().setBitCount) }
        let tracked = Double(vm.pagesWritten - p0) / (Double(monotonicNanoseconds() - t0) / 1e9)
        // Harvest cost: idle (nothing dirty), and after dirtying the working set.
        var idle: [UInt64] = []
        for _ in 0..<20 { let t = monotonicNanoseconds(); _ = try vm.harvestDirtyPages(); idle.append(monotonicNanoseconds() - t) }
        vm.resume(); usleep(300_000); vm.pause()
        let t = monotonicNanoseconds()
        let dirty = try vm.harvestDirtyPages().setBitCount
        let busy = monotonicNanoseconds() - t
        var pauses: [UInt64] = [], resumes: [UInt64] = []
        vm.resume()
        for _ in 0..<50 {
            usleep(2000)
            pauses.append(vm.pause())
            let r = monotonicNanoseconds(); vm.resume(); resumes.append(monotonicNanoseconds() - r)
        }
        vm.pause()
        let ok = vm.verify()
        let gib = Double(mem) / Double(1 << 30)
        let idleMedian = Double(idle.sorted()[idle.count / 2])
        let out = BenchOutput("vm", output)
        defer { out.stolenTime(since: ticks) }
        let harvestBusy = Double(busy) / 1000 / gib
        out.say("vfio-live bench vm (\(vm.executionMode), \(formatBytes(mem)) guest RAM, 1 vCPU)")
        out.say("guest page writes, dirty logging off    \(formatFixed(untracked / 1e6, 2)) M pages/s")
        out.say("guest page writes, dirty logging on     \(formatFixed(tracked / 1e6, 3)) M pages/s (\(trackedPages) dirty pages harvested)")
        out.say("dirty-log harvest, idle                 \(formatFixed(idleMedian / 1000 / gib, 1)) µs per GiB")
        out.say("dirty-log harvest, \(dirty) dirty pages  \(formatFixed(harvestBusy, 1)) µs per GiB (\(formatFixed(Double(busy) / Double(max(dirty, 1)), 1)) ns per dirty page)")
        let pp = percentiles(pauses), rp = percentiles(resumes)
        out.say("pause latency p50 / p99                 \(formatFixed(pp.p50, 1)) / \(formatFixed(pp.p99, 1)) µs")
        out.say("resume latency p50 / p99                \(formatFixed(rp.p50, 1)) / \(formatFixed(rp.p99, 1)) µs")
        out.say("integrity after the run                 \(ok)")
        out.figure("guest page writes, dirty logging off", untracked, "pages/s")
        out.figure("guest page writes, dirty logging on", tracked, "pages/s", reference: "dirty logging off", referenceValue: untracked)
        out.figure("dirty-log harvest, idle", idleMedian / 1000 / gib, "us/GiB")
        out.figure("dirty-log harvest, working set dirtied", harvestBusy, "us/GiB")
        out.figure("dirty-log harvest per dirty page", Double(busy) / Double(max(dirty, 1)), "ns")
        out.figure("pause latency p50", pp.p50, "us")
        out.figure("pause latency p99", pp.p99, "us")
        out.figure("resume latency p50", rp.p50, "us")
        out.figure("resume latency p99", rp.p99, "us")
        out.figure("integrity after the run", ok.ok ? 1 : 0, "bool", target: "every page verifies", met: ok.ok)
        if !ok.ok { throw ExitCode(1) }
    }
}
