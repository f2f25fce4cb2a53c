import ArgumentParser
import Control
import Glibc
import Migration
import Machine
import SystemCalls
import VFIO
import VFIOUser

struct VMCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "vm",
        abstract: "Run a micro-VM with a guest workload and vfio-user devices.",
        subcommands: [Run.self])
}

/// `--device vfio-user,socket=PATH[,enable-migration=on|off|auto]`
struct DeviceSpec: ExpressibleByArgument {
    var socket: String
    var policy: DeviceMigrationPolicy = .auto
    init?(argument: String) {
        let parts = argument.split(separator: ",").map(String.init)
        guard parts.first == "vfio-user", let s = parts.dropFirst().first(where: { $0.hasPrefix("socket=") }) else { return nil }
        socket = String(s.dropFirst("socket=".count))
        if let p = parts.first(where: { $0.hasPrefix("enable-migration=") }) {
            guard let v = DeviceMigrationPolicy(rawValue: String(p.dropFirst("enable-migration=".count))) else { return nil }
            policy = v
        }
    }
    static var defaultCompletionKind: CompletionKind { .default }
}

extension VMCommand {
    struct Run: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Run a micro-VM until SIGINT/SIGTERM (or --duration), verifying the guest's memory.",
            discussion: """
                Guest RAM is a memfd mapped shared, registered with KVM and DMA-mapped into every
                device. The guest workload (Sources/CVFIOLive/guest/workload.S) runs at CPL3 on
                each vCPU, writes pages that each carry a sequence number and checksum, and drives
                the first device's DMA engine by MMIO. Every --verify-every seconds the VM pauses,
                the integrity verifier checks every page and the last DMA round trip, and the VM
                resumes; the command exits non-zero on the first violation.
                Without /dev/kvm the workload runs on software vCPUs, and says so.

                Example:
                  vfio-live device serve --socket /tmp/dma.sock &
                  vfio-live vm run --memory 256M --vcpus 2 --device vfio-user,socket=/tmp/dma.sock \\
                      --workload dirty-rate=50000,working-set=64M --duration 5
                """)
        @Option(help: "Guest RAM (a multiple of 2 MiB, up to 16G).")
        var memory = "256M"
        @Option(help: "vCPUs (1–8); the working set is split between them.")
        var vcpus = 1
        @Option(help: "A vfio-user device: vfio-user,socket=PATH[,enable-migration=on|off|auto] (repeatable; the guest drives the first).")
        var device: [DeviceSpec] = []
        @Option(help: "dirty-rate=PAGES_PER_S (0 = unlimited), working-set=SIZE, batch=N, dma-every=N, dma-length=SIZE.")
        var workload = "dirty-rate=0,working-set=64M"
        @Option(help: "Stop after this many seconds (default: run until SIGINT/SIGTERM).")
        var duration: Double?
        @Option(help: "Seconds between integrity checks.")
        var verifyEvery = 2.0
        @Flag(name: .customLong("software-vcpus"), help: "Use software vCPUs even if /dev/kvm exists.")
        var softwareVCPUs = false
        @Option(help: "QMP control socket (QEMU-compatible: query-status, stop, cont, migrate, query-migrate, ...).")
        var qmp: String?
        @Option(help: "Wait for an incoming migration on tcp:HOST:PORT instead of booting the workload.")
        var incoming: String?
        @OptionGroup var global: GlobalOptions

        func run() throws {
            global.apply()
            let mem = try parseSize(memory)
            let w: WorkloadConfig
            do { w = try WorkloadConfig(parsing: workload, parseSize: parseSize) } catch { throw ValidationError("\(error)") }
            var clients: [VFIOUserClient] = []
            for d in device {
                do { clients.append(try VFIOUserClient(path: d.socket)) } catch {
                    throw ValidationError("cannot connect to the vfio-user device at \(d.socket): \(error)")
                }
            }
            let vm: MicroVM
            do { vm = try MicroVM(memorySize: mem, vcpus: vcpus, workload: w, devices: clients, forceSoftware: softwareVCPUs,
                                  populateMemory: incoming != nil) }
            catch { throw ValidationError("\(error)") }
            let stop = try EventFD()
            installStopSignals(stop.fd.rawValue)
            let vmm = VirtualMachineManager(vm: vm, policies: device.map(\.policy), incoming: incoming != nil)
            var exitCode: Int32 = 0
            vmm.onExit = { code in exitCode = code; try? stop.signal() }
            if let q = qmp {
                do { vmm.qmp = try QMPServer(path: q, handler: vmm) } catch { throw ValidationError("cannot create the QMP socket \(q): \(error)") }
                vmm.qmp?.start()
                // As QEMU: a migrated-away VM stays in postmigrate, answering QMP, until quit.
                vmm.exitAfterMigration = false
            }
            defer { vmm.qmp?.stop() }
            print("vm: \(formatBytes(mem)) memfd guest RAM, \(vcpus) vCPU(s) on \(vm.executionMode), \(clients.count) device(s); workload: \(w)\(qmp.map { "; QMP on \($0)" } ?? "")")
            if let uri = incoming {
                do { try vmm.startIncoming(uri: uri) } catch let e as QMPError { throw ValidationError(e.desc) }
            } else {
                vmm.boot()
            }
            let start = monotonicNanoseconds()
            var lastVerify = start, lastPages: UInt64 = 0, lastT = start
            var failed = false
            while true {
                if (try? Poll.waitReadable(stop.fd, timeoutMilliseconds: 1000)) == true { break }
                let now = monotonicNanoseconds()
                guard vmm.runState == .running else { continue }
                let p = vm.pagesWritten
                let rate = Double(p &- lastPages) / (Double(now - lastT) / 1e9)
                lastPages = p; lastT = now
                if !global.quiet {
                    print("  \(formatFixed(Double(now - start) / 1e9, 0)) s: \(p) page writes (\(formatFixed(rate / 1000, 1)) K pages/s), \(vm.dmaRoundsOK) DMA round trips, MSIs \(vm.interruptsCounted)")
                }
                if let f = vm.failure { print("vm failed: \(f)"); failed = true; break }
                if Double(now - lastVerify) / 1e9 >= verifyEvery {
                    lastVerify = now
                    let r = vm.verify()
                    if !global.quiet || !r.ok { print("  verify: \(r)") }
                    if !r.ok { failed = true; break }
                }
                if let d = duration, Double(now - start) / 1e9 >= d { break }
            }
            if vmm.runState == .postmigrate {
                print("migrated away: the source stops (device state moved, guest RAM sent)")
                vm.stop()
                return
            }
            if exitCode != 0 { vm.stop(); throw ExitCode(exitCode) }
            let latency = vm.pause()
            let r = vm.verify()
            print("paused in \(formatFixed(Double(latency) / 1000, 1)) µs; final \(r)")
            vm.stop()
            if failed || !r.ok { throw ExitCode(1) }
        }
    }
}
