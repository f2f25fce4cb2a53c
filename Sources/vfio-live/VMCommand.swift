import ArgumentParser
import Control
import Glibc
import KernelVFIO
import LiveUpdate
import Migration
import Machine
import SystemCalls
import VFIO
import VFIOUser

struct VMCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "vm",
        abstract: "Run a micro-VM with a guest workload and VFIO devices (vfio-user, kernel vfio-pci, mdev).",
        subcommands: [Run.self])
}

/// One `--device`, in QEMU's spelling:
///   vfio-user,socket=PATH
///   vfio-pci,host=DDDD:BB:DD.F[,iommufd=on|off]
///   vfio-pci,sysfsdev=/sys/bus/mdev/devices/UUID (or a PCI device's directory)[,iommufd=on|off]
/// each with [,enable-migration=on|off|auto][,cpr=on|off]. A wrong one is refused with what
/// is wrong and the right spelling.
struct DeviceSpec: ExpressibleByArgument, CustomStringConvertible {
    enum Transport: Equatable {
        case vfioUser(socket: String)
        /// A kernel VFIO device by its sysfs directory; `host` when it was given as host=.
        case kernel(sysfsPath: String, host: String?, backend: AssignedKernelDevice.Backend)
    }
    var transport: Transport
    var policy: DeviceMigrationPolicy = .auto
    var liveUpdate = true
    /// The option as given (messages quote it).
    var text: String
    var description: String { text }
    var socket: String? { if case let .vfioUser(s) = transport { return s }; return nil }

    static let spellings = "vfio-user,socket=PATH | vfio-pci,host=DDDD:BB:DD.F[,iommufd=on] | vfio-pci,sysfsdev=/sys/bus/mdev/devices/UUID[,iommufd=on]"

    init?(argument: String) { try? self.init(parsing: argument) }
    init(socket: String) { transport = .vfioUser(socket: socket); text = "vfio-user,socket=\(socket)" }

    init(parsing argument: String) throws {
        text = argument
        let parts = argument.split(separator: ",", omittingEmptySubsequences: false).map(String.init)
        func bad(_ why: String) -> ValidationError { ValidationError(why) }  // ArgumentParser names the option and value
        var props: [String: String] = [:]
        for p in parts.dropFirst() {
            guard let eq = p.firstIndex(of: "="), eq != p.startIndex else { throw bad("'\(p)' is not KEY=VALUE") }
            let k = String(p[..<eq]), v = String(p[p.index(after: eq)...])
            guard props[k] == nil else { throw bad("\(k)= is given twice") }
            props[k] = v
        }
        func take(_ k: String) -> String? { props.removeValue(forKey: k) }
        if let v = take("enable-migration") {
            guard let m = DeviceMigrationPolicy(rawValue: v) else { throw bad("enable-migration= takes on, off or auto (got '\(v)')") }
            policy = m
        }
        if let v = take("cpr") {
            switch v { case "on": liveUpdate = true; case "off": liveUpdate = false; default: throw bad("cpr= takes on or off (got '\(v)')") }
        }
        switch parts.first {
        case "vfio-user":
            guard let s = take("socket"), !s.isEmpty else { throw bad("vfio-user needs socket=PATH (the server's UNIX socket)") }
            transport = .vfioUser(socket: s)
        case "vfio-pci":
            var backend = AssignedKernelDevice.Backend.legacy
            if let v = take("iommufd") {
                switch v { case "on": backend = .iommufd; case "off": backend = .legacy
                default: throw bad("iommufd= takes on (the device's cdev in an iommufd IOAS) or off (a legacy VFIO container; the default), not '\(v)'") }
            }
            let host = take("host"), sysfs = take("sysfsdev")
            switch (host, sysfs) {
            case let (h?, nil):
                guard let a = Self.pciAddress(h) else {
                    throw bad("host=\(h) is not a PCI address: QEMU's spelling is DDDD:BB:DD.F in hex, e.g. 0000:00:04.0 (`lspci -D` lists them)")
                }
                transport = .kernel(sysfsPath: "/sys/bus/pci/devices/\(a)", host: a, backend: backend)
            case let (nil, p?):
                guard p.hasPrefix("/"), p.count > 1 else { throw bad("sysfsdev= takes an absolute sysfs path (/sys/bus/mdev/devices/UUID or /sys/bus/pci/devices/DDDD:BB:DD.F)") }
                transport = .kernel(sysfsPath: p, host: nil, backend: backend)
            case (nil, nil):
                throw bad("vfio-pci needs host=DDDD:BB:DD.F or sysfsdev=PATH (QEMU: \"No provided host device\")")
            case (_?, _?):
                throw bad("give host= or sysfsdev=, not both")
            }
        default:
            throw bad("unknown device type '\(parts.first ?? "")': the spellings are \(Self.spellings)")
        }
        if let k = props.keys.sorted().first {
            let allowed = parts.first == "vfio-user" ? "socket, enable-migration, cpr" : "host, sysfsdev, iommufd, enable-migration, cpr"
            throw bad("unknown property '\(k)' (\(parts.first!) takes \(allowed))")
        }
    }

    /// `[DDDD:]BB:DD.F` in hex (QEMU takes the domain as optional), normalised to
    /// 0000:00:04.0 as sysfs names it; nil when it is not one.
    static func pciAddress(_ s: String) -> String? {
        var f = s.lowercased().split(separator: ":", omittingEmptySubsequences: false).map(String.init)
        if f.count == 2 { f.insert("0000", at: 0) }
        guard f.count == 3 else { return nil }
        let df = f[2].split(separator: ".", omittingEmptySubsequences: false).map(String.init)
        guard df.count == 2 else { return nil }
        let hexDigits = Set("0123456789abcdef")
        func field(_ t: String, max digits: Int, limit: Int) -> Int? {
            guard !t.isEmpty, t.count <= digits, t.allSatisfy({ hexDigits.contains($0) }), let v = Int(t, radix: 16), v <= limit else { return nil }
            return v
        }
        guard let dom = field(f[0], max: 4, limit: 0xffff), let bus = field(f[1], max: 2, limit: 0xff),
              let dev = field(df[0], max: 2, limit: 0x1f), let fn = field(df[1], max: 1, limit: 7) else { return nil }
        func h(_ v: Int, _ w: Int) -> String { let x = String(v, radix: 16); return String(repeating: "0", count: w - x.count) + x }
        return "\(h(dom, 4)):\(h(bus, 2)):\(h(dev, 2)).\(fn)"
    }

    static var defaultCompletionKind: CompletionKind { .default }
}

/// Open the device a --device names: connect to the vfio-user server, or open the kernel
/// device through its group (legacy) or cdev (iommufd). Errors name the cause and the fix.
func openDevice(_ spec: DeviceSpec, timeout: DeviceTimeoutOption, cancel: Int32? = nil) throws -> any VFIODevice {
    switch spec.transport {
    case let .vfioUser(socket):
        return try connectDevice(socket, timeout: timeout, cancel: cancel)
    case let .kernel(path, _, backend):
        do { return try AssignedKernelDevice.open(sysfsPath: path, backend: backend) }
        catch { throw Failure("--device \(spec.text): \(error)") }
    }
}

extension VMCommand {
    struct Run: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Run a micro-VM until SIGINT/SIGTERM (or --duration), verifying the guest's memory.",
            discussion: HelpText.reflow("""
                Guest RAM is a memfd mapped shared, registered with KVM and DMA-mapped into
                every device. The guest workload (Sources/CVFIOLive/guest/workload.S) runs at
                CPL3 on each vCPU, writes pages that each carry a sequence number and
                checksum, and drives the DMA engine of the first edu-compatible device by
                MMIO. Every --verify-every seconds the VM pauses, the integrity verifier
                checks every page and the last DMA round trip, and the VM resumes; the
                command exits non-zero on the first violation. No check runs while a
                migration or a live update holds the VM (the pause would lengthen its
                downtime); checking resumes after one that failed, and on the destination
                once the guest runs there. Without /dev/kvm the
                workload runs on software vCPUs, and says so.

                Devices (--device, QEMU's spelling; repeatable):
                  vfio-user,socket=PATH            a vfio-user server
                  vfio-pci,host=DDDD:BB:DD.F       a PCI device bound to vfio-pci
                  vfio-pci,sysfsdev=PATH           a device by its sysfs directory:
                                                   /sys/bus/mdev/devices/UUID (an mdev)
                                                   or /sys/bus/pci/devices/DDDD:BB:DD.F
                vfio-pci goes through a legacy type1 container, or with iommufd=on
                through the device's cdev in an iommufd IOAS. Every device also takes
                enable-migration=on|off|auto and cpr=on|off (off blocks live update).
                A device with no DMA or no usable interrupt (an mtty mdev) still
                attaches; one without migration (edu) blocks `migrate` with QEMU's
                reason. A device that cannot be opened is named with the cause and the
                fix: not bound to vfio-pci (the driver_override commands), a group that
                is not viable (the devices in the way), no permission, no VFIO/IOMMUFD.

                Live update: with --incoming cpr:unix:PATH this VMM waits for a running
                one to hand its VM over (`vfio-live update`, or QMP migrate in mode
                cpr-transfer). The machine (memory, vCPUs, workload, devices) comes from
                the handed-over state; the --device options give only the devices'
                policies. It may be a different build.

                Examples:
                  vfio-live device serve --socket /tmp/dma.sock &
                  vfio-live vm run --memory 256M --vcpus 2 \\
                      --device vfio-user,socket=/tmp/dma.sock \\
                      --workload dirty-rate=50000,working-set=64M --duration 5

                  # QEMU's edu at 0000:00:04.0, handed to vfio-pci, through iommufd:
                  echo vfio-pci > /sys/bus/pci/devices/0000:00:04.0/driver_override
                  echo 0000:00:04.0 > /sys/bus/pci/devices/0000:00:04.0/driver/unbind
                  echo 0000:00:04.0 > /sys/bus/pci/drivers_probe
                  vfio-live vm run --memory 64M --qmp /tmp/vm.qmp \\
                      --device vfio-pci,host=0000:00:04.0,iommufd=on \\
                      --workload working-set=8M,dma-every=2

                  # An mtty mdev (the kernel's sample driver):
                  u=$(cat /proc/sys/kernel/random/uuid)
                  echo $u > /sys/class/mdev_bus/mtty/mdev_supported_types/mtty-2/create
                  vfio-live vm run --memory 64M \\
                      --device vfio-pci,sysfsdev=/sys/bus/mdev/devices/$u
                """))
        @Option(parsing: .unconditional, help: "Guest RAM (a multiple of 2 MiB, from 4M up to 16G).")
        var memory = "256M"
        @Option(parsing: .unconditional, help: "vCPUs (1–8); the working set is split between them.")
        var vcpus = "1"
        @Option(help: ArgumentHelp("A VFIO device: vfio-user,socket=PATH | vfio-pci,host=DDDD:BB:DD.F | vfio-pci,sysfsdev=PATH, with [,iommufd=on] (vfio-pci), [,enable-migration=on|off|auto], [,cpr=on|off] (repeatable; see Devices above).",
                                   valueName: "device"),
                transform: DeviceSpec.init(parsing:))
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
            for d in device { if let s = d.socket { try checkSocketPath(s, option: "--device socket=") } }
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
            for d in vm.devices { d.vfioUserClient?.setCancel(giveUp.fd.rawValue) }
            // From here on a missing thread costs what it was for, never the VM (a live update's
            // successor already runs the guest; a fresh VM is about to): each is optional or
            // said, not thrown.
            let watchdog: OSThread?
            do {
                watchdog = try OSThread(name: "stop-watchdog") {
                    guard (try? Poll.waitAnyReadable([stop.fd.rawValue, finished.fd.rawValue], timeoutMilliseconds: -1)) == 0 else { return }
                    if (try? Poll.waitReadable(finished.fd, timeoutMilliseconds: 1000)) != true {
                        fputs("vm: a device does not answer: giving up on it to stop now\n", stderr)
                        try? giveUp.signal()
                    }
                }
            } catch {
                watchdog = nil
                Log.warning("vm", "\(error): a stop waits on a device that does not answer for up to its --device-timeout")
            }
            defer { try? finished.signal(); watchdog?.join() }
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
                    try vmm.qmp?.start()
                } catch where update != nil {
                    // The guest runs here already: it must not go with this process.
                    Log.error("vm", "QMP is not served on \(q): \(error); the VM runs on (SIGTERM stops it)")
                    vmm.qmp = nil
                } catch { throw Failure("cannot serve QMP on \(q): \(error)") }
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
                try vmm.boot()
            }
            // The VMM checks the guest on its own thread, and not while a migration or a live
            // update holds the VM (a scan parks every vCPU); it resumes after one that failed.
            let quiet = global.quiet
            do {
                try vmm.startPeriodicVerification(every: verifyEvery) { r in
                    if !quiet || !r.ok { print("  verify: \(r)"); fflush(stdout) }
                    if !r.ok { try? stop.signal() }
                }
            } catch { Log.warning("vm", "the guest is not checked every \(self.verifyEvery) s: \(error)") }
            defer { vmm.stopPeriodicVerification() }
            let start = monotonicNanoseconds()
            var lastPages: UInt64 = 0, lastT = start
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
                if let d = duration, Double(now - start) / 1e9 >= d { break }
            }
            vmm.stopPeriodicVerification()
            if vmm.verificationFailure != nil { failed = true }
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
        var clients: [any VFIODevice] = []
        for d in device { clients.append(try openDevice(d, timeout: timeout, cancel: cancel.fd.rawValue)) }
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
        for c in clients { (c as? VFIOUserClient)?.setCancel(nil) }
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
