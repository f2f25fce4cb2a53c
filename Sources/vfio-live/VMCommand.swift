import ArgumentParser
import Control
import Glibc
import LiveUpdate
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

/// `--device vfio-user,socket=PATH[,enable-migration=on|off|auto][,cpr=on|off]`
struct DeviceSpec: ExpressibleByArgument {
    var socket: String
    var policy: DeviceMigrationPolicy = .auto
    var liveUpdate = true
    init?(argument: String) {
        let parts = argument.split(separator: ",").map(String.init)
        guard parts.first == "vfio-user", let s = parts.dropFirst().first(where: { $0.hasPrefix("socket=") }) else { return nil }
        socket = String(s.dropFirst("socket=".count))
        if let p = parts.first(where: { $0.hasPrefix("enable-migration=") }) {
            guard let v = DeviceMigrationPolicy(rawValue: String(p.dropFirst("enable-migration=".count))) else { return nil }
            policy = v
        }
        if let p = parts.first(where: { $0.hasPrefix("cpr=") }) {
            switch p.dropFirst(4) { case "on": liveUpdate = true; case "off": liveUpdate = false; default: return nil }
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

                Live update: with --incoming cpr:unix:PATH this VMM waits for a running one to hand
                its VM over (`vfio-live update`, or QMP migrate in mode cpr-transfer). The machine
                (memory, vCPUs, workload, devices) comes from the handed-over state; the --device
                options give only the devices' policies. It may be a different build.

                Example:
                  vfio-live device serve --socket /tmp/dma.sock &
                  vfio-live vm run --memory 256M --vcpus 2 --device vfio-user,socket=/tmp/dma.sock \\
                      --workload dirty-rate=50000,working-set=64M --duration 5
                """)
        @Option(parsing: .unconditional, help: "Guest RAM (a multiple of 2 MiB, from 4M up to 16G).")
        var memory = "256M"
        @Option(parsing: .unconditional, help: "vCPUs (1–8); the working set is split between them.")
        var vcpus = "1"
        @Option(help: "A vfio-user device: vfio-user,socket=PATH[,enable-migration=on|off|auto][,cpr=on|off] (repeatable; the guest drives the first; cpr=off blocks live update).")
        var device: [DeviceSpec] = []
        @Option(help: "dirty-rate=PAGES_PER_S (0 = unlimited), working-set=SIZE, batch=N, dma-every=N, dma-length=SIZE.")
        var workload = "dirty-rate=0,working-set=64M"
        @Option(parsing: .unconditional, help: "Stop after this many seconds (default: run until SIGINT/SIGTERM).")
        var duration: String?
        @Option(parsing: .unconditional, help: "Seconds between integrity checks.")
        var verifyEvery = "2"
        @Flag(help: "Populate all of guest RAM at start (as QEMU's prealloc=on), instead of on first touch.")
        var prealloc = false
        @Flag(name: .customLong("software-vcpus"), help: "Use software vCPUs even if /dev/kvm exists.")
        var softwareVCPUs = false
        @Option(help: "QMP control socket (QEMU-compatible: query-status, stop, cont, migrate, query-migrate, ...).")
        var qmp: String?
        @Option(help: "Wait for an incoming migration on tcp:HOST:PORT or unix:PATH, or for a live update on cpr:unix:PATH, instead of booting the workload.")
        var incoming: String?
        @OptionGroup var timeout: DeviceTimeoutOption
        @OptionGroup var global: GlobalOptions

        /// Every argument is checked here, before KVM or a device is touched: a wrong value is
        /// a command-line error (exit 64), whatever the host has.
        func validate() throws {
            let mem = try parseSize(memory)
            guard mem >= 4 << 20, mem <= 16 << 30, mem % (2 << 20) == 0 else {
                throw ValidationError("--memory must be a multiple of 2 MiB from 4M to 16G (got \(memory))")
            }
            let n = try parseInteger(vcpus, option: "--vcpus", range: 1...GuestLayout.maxVCPUs)
            let w: WorkloadConfig
            do { w = try WorkloadConfig(parsing: workload, parseSize: parseSize) }
            catch let KVMError.unavailable(why) { throw ValidationError("--workload: \(why)") }
            guard w.workingSet >= 4096 * UInt64(n), GuestLayout.workingSetBase + w.workingSet <= mem else {
                throw ValidationError("--workload: a working set of \(formatBytes(w.workingSet)) does not fit in \(formatBytes(mem)) of guest RAM (it starts at 1 MiB, and needs a page per vCPU)")
            }
            if let d = duration { _ = try parseSeconds(d, option: "--duration", max: 365 * 86400) }
            _ = try parseSeconds(verifyEvery, option: "--verify-every", max: 86400)
            for d in device { try checkSocketPath(d.socket, option: "--device socket=") }
            if let q = qmp { try checkSocketPath(q, option: "--qmp") }
            if let i = incoming { try checkUnixURI(i.hasPrefix("cpr:") ? String(i.dropFirst(4)) : i, option: "--incoming") }
        }

        func run() throws {
            global.apply()
            let stop = try EventFD()
            installStopSignals(stop.fd.rawValue)
            let duration = try self.duration.map { try parseSeconds($0, option: "--duration", max: 365 * 86400) }
            let verifyEvery = try parseSeconds(self.verifyEvery, option: "--verify-every", max: 86400)
            let (vm, vmm, update) = try makeVM(cancel: stop)
            // A device that stopped answering must not hold a stop that a signal (or quit) asked
            // for: a second after it, the waits on the devices give up (each is bounded anyway,
            // by --device-timeout, but that can be long). Healthy devices finish well before.
            let giveUp = try EventFD(nonBlocking: true), finished = try EventFD(nonBlocking: true)
            for d in vm.devices { d.client.setCancel(giveUp.fd.rawValue) }
            let watchdog = OSThread(name: "stop-watchdog") {
                guard (try? Poll.waitAnyReadable([stop.fd.rawValue, finished.fd.rawValue], timeoutMilliseconds: -1)) == 0 else { return }
                if (try? Poll.waitReadable(finished.fd, timeoutMilliseconds: 1000)) != true {
                    fputs("vm: a device does not answer: giving up on it to stop now\n", stderr)
                    try? giveUp.signal()
                }
            }
            defer { try? finished.signal(); watchdog.join() }
            vmm.commandLine = CommandLine.arguments
            for (i, d) in device.enumerated() where !d.liveUpdate { vmm.liveUpdateOptOut[i] = "cpr=off on its --device option" }
            var exitCode: Int32 = 0
            vmm.onExit = { code in exitCode = code; try? stop.signal() }
            let handedQMP = update?.state.handedQMPListener(ownPath: qmp)
            if let q = qmp ?? handedQMP?.path {
                do {
                    // A live update's successor serves on the listening socket it was handed when
                    // the path is its own; otherwise it binds its own.
                    if let h = handedQMP {
                        vmm.qmp = try QMPServer(adopting: h.fd, path: h.path, handler: vmm)
                    } else {
                        update?.state.find(CPRNames.qmpListener)?.close()
                        vmm.qmp = try QMPServer(path: q, handler: vmm)
                    }
                } catch { throw Failure("cannot create the QMP socket \(q): \(error)") }
                vmm.qmp?.start()
                // As QEMU: a migrated-away VM stays in postmigrate, answering QMP, until quit.
                vmm.exitAfterMigration = false
            }
            defer { vmm.qmp?.stop() }
            if let u = update {
                let r = u.report
                print("vm: took over by live update (\(r.mode.rawValue)): \(formatBytes(vm.memory.size)) guest RAM, \(vm.vcpuCount) vCPU(s) on \(vm.executionMode), \(vm.devices.count) device(s); blackout \(formatFixed(Double(r.blackoutNS) / 1e6, 2)) ms; handed over: \(r.handedOver.joined(separator: ", "))")
            } else {
                print("vm: \(formatBytes(vm.memory.size)) memfd guest RAM, \(vm.vcpuCount) vCPU(s) on \(vm.executionMode), \(vm.devices.count) device(s); workload: \(vm.workload)\(qmp.map { "; QMP on \($0)" } ?? "")")
            }
            if let uri = incoming, update == nil {
                do { try vmm.startIncoming(uri: uri) } catch let e as QMPError { throw Failure(e.desc) }
            } else if update == nil {
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
                    // Through the VMM: it refuses while a live update holds the VM (after GO the
                    // successor writes these pages) and reports a lost device as a violation.
                    guard let r = try? vmm.verify() else { continue }
                    if !global.quiet || !r.ok { print("  verify: \(r)") }
                    if !r.ok { failed = true; break }
                }
                if let d = duration, Double(now - start) / 1e9 >= d { break }
            }
            if vmm.runState == .postmigrate {
                if let r = vmm.liveUpdateReport {
                    print("live update (\(r.mode.rawValue)) completed: pid \(r.successorPID) runs the VM; blackout \(formatFixed(Double(r.blackoutNS) / 1e6, 2)) ms; this VMM exits without touching the devices")
                } else {
                    print("migrated away: the source stops (device state moved, guest RAM sent)")
                }
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

extension VMCommand.Run {
    /// The VM: built from the command line, or taken over from a predecessor (cpr-exec state in
    /// the environment, or --incoming cpr:unix:PATH).
    /// `cancel` (written on SIGINT/SIGTERM) ends any wait on a peer while the VM is set up.
    func makeVM(cancel: EventFD) throws -> (MicroVM, VirtualMachineManager, LiveUpdateTarget?) {
        let vcpus = try parseInteger(self.vcpus, option: "--vcpus", range: 1...GuestLayout.maxVCPUs)
        let policies = device.map(\.policy)
        if let v = getenv(LiveUpdateSource.execStateVariable) {
            let text = String(cString: v)
            unsetenv(LiveUpdateSource.execStateVariable)
            guard let n = Int32(text), n >= 0 else { throw Failure("\(LiveUpdateSource.execStateVariable)=\(text) is not a descriptor") }
            let target: LiveUpdateTarget
            do {
                let memfd = FileDescriptor(adopting: n)
                let (state, stream) = try CPRState.readAfterExec(memfd)
                memfd.close()
                target = try LiveUpdateTarget(state: state, mode: .exec)
                target.beforeStep = Self.faultInjection
                try target.complete(stream: stream)
            } catch {
                // No predecessor is left to take the VM back: say exactly what failed.
                throw Failure("cpr-exec: the new VMM cannot take the VM over: \(error)")
            }
            target.report.qmpAdopted = target.state.handedQMPListener(ownPath: qmp) != nil
            let vmm = VirtualMachineManager(vm: target.vm, policies: policies, incoming: false)
            vmm.adoptedByLiveUpdate(target.report)
            return (target.vm, vmm, target)
        }
        if let uri = incoming, uri.hasPrefix("cpr:") {
            guard uri.hasPrefix("cpr:unix:"), uri.count > 9 else { throw ValidationError("--incoming cpr: takes unix:PATH (cpr:unix:/tmp/cpr.sock)") }
            let path = String(uri.dropFirst(9))
            let listener: UnixListener
            do { listener = try UnixListener(path: path) } catch { throw Failure("cannot listen on \(path): \(error)") }
            print("vm: waiting for a live update (cpr-transfer) on \(path)")
            fflush(stdout)
            // Bounded when the old VMM started this one (it may die first); SIGTERM ends it too.
            let sock: UnixSocket
            do { sock = try LiveUpdateTarget.awaitPredecessor(on: listener, cancel: cancel.fd) } catch { throw Failure("\(error); no VM was taken over") }
            listener.close()
            defer { sock.close() }
            let target: LiveUpdateTarget
            do {
                try Self.faultInjection("receive-state")
                let state = try CPRState.receive(from: sock)
                do {
                    try Self.faultInjection("after-state")
                    target = try LiveUpdateTarget(state: state, mode: .transfer)
                } catch {
                    try? CPRMessage.send(sock, .error, "\(error)")
                    throw error
                }
                target.beforeStep = Self.faultInjection
                target.report.qmpAdopted = state.handedQMPListener(ownPath: qmp) != nil
                if !device.isEmpty && device.count != target.vm.devices.count {
                    throw Failure("the handed-over VM has \(target.vm.devices.count) device(s), the command line \(device.count)")
                }
                try target.complete(over: sock)
            } catch let e as ValidationError {
                throw e
            } catch {
                throw Failure("live update failed; the old VMM keeps the VM: \(error)")
            }
            let vmm = VirtualMachineManager(vm: target.vm, policies: policies, incoming: false)
            vmm.adoptedByLiveUpdate(target.report)
            return (target.vm, vmm, target)
        }
        let mem = try parseSize(memory)
        let w: WorkloadConfig
        do { w = try WorkloadConfig(parsing: workload, parseSize: parseSize) } catch { throw ValidationError("--workload: \(error)") }
        var clients: [VFIOUserClient] = []
        for d in device { clients.append(try connectDevice(d.socket, timeout: timeout, cancel: cancel.fd.rawValue)) }
        let vm: MicroVM
        do { vm = try MicroVM(memorySize: mem, vcpus: vcpus, workload: w, devices: clients, forceSoftware: softwareVCPUs,
                              populateMemory: incoming != nil || prealloc) }
        catch {
            if (try? Poll.waitReadable(cancel.fd, timeoutMilliseconds: 0)) == true {
                throw Failure("interrupted by a signal while setting up the VM: \(error)")
            }
            if case let KVMError.unavailable(why) = error { throw Failure(why) }
            throw Failure("cannot set up the VM: \(error)")
        }
        // From here the VM shuts down in order on a signal, and that still talks to the devices.
        for c in clients { c.setCancel(nil) }
        return (vm, VirtualMachineManager(vm: vm, policies: policies, incoming: incoming != nil), nil)
    }

    /// VFIO_LIVE_CPR_FAULT=STEP makes this process die at that step of an incoming live update
    /// (tests of the old VMM's rollback): receive-state, after-state, ready, load, commit.
    static func faultInjection(_ step: String) throws {
        guard let f = getenv("VFIO_LIVE_CPR_FAULT"), String(cString: f) == step else { return }
        fputs("vfio-live: VFIO_LIVE_CPR_FAULT=\(step): dying here on purpose\n", stderr)
        _exit(3)
    }
}
