import Foundation
import Glibc
@testable import KernelVFIO
import Machine
@testable import Migration
import SystemCalls
import VFIO
import XCTest

/// Live migration of a VM holding kernel VFIO devices (issue 11, items 4, 6a and 6f), in the
/// lab guest against the kernel's mtty sample: a real in-kernel migration driver (v2 with
/// STOP_COPY, P2P and PRE_COPY). Two VMMs in this process, each with its own mtty instance
/// (its own UUID), migrate over TCP and over UNIX, through a legacy container and through
/// iommufd; the kernel driver moves the UART state and the registers written before the
/// migration read back the same through the destination's device. Software vCPUs (the guest
/// has no /dev/kvm). mtty does not depend on the lab's PCI device: only the edu boot runs it.
final class KernelMigrationTests: XCTestCase {
    static let mttyType = "/sys/class/mdev_bus/mtty/mdev_supported_types/mtty-2"
    private var created: [String] = []
    private var opened: [AssignedKernelDevice] = []

    override func setUpWithError() throws {
        let env = ProcessInfo.processInfo.environment
        guard env["VFIO_LIVE_LAB"] == "1" else { throw XCTSkip("runs in the kernel lab guest only (bash scripts/lab.sh edu)") }
        guard env["VFIO_LIVE_LAB_DEVICE"] == "edu" else {
            throw XCTSkip("mtty does not depend on the lab's PCI device: these tests run in the edu boot only")
        }
        guard access("\(Self.mttyType)/create", W_OK) == 0 else { throw XCTSkip("no mtty parent (\(Self.mttyType)): the lab kernel lacks SAMPLE_VFIO_MDEV_MTTY") }
        Log.level = .warning
        try Self.loopbackUp()
    }

    /// The lab's init brings no interface up, so TCP to 127.0.0.1 is unreachable until `lo`
    /// is up: SIOCGIFFLAGS / SIOCSIFFLAGS with IFF_UP (struct ifreq: name[16], then flags).
    static func loopbackUp() throws {
        let raw = socket(AF_INET, Int32(SOCK_DGRAM.rawValue), 0)
        guard raw >= 0 else { throw Errno.current }
        let s = FileDescriptor(adopting: raw)
        var ifr = [UInt8](repeating: 0, count: 40)
        for (i, c) in "lo".utf8.enumerated() { ifr[i] = c }
        try ifr.withUnsafeMutableBytes { b in
            _ = try s.ioctl(0x8913, b.baseAddress)  // SIOCGIFFLAGS
            let flags = b.load(fromByteOffset: 16, as: Int16.self)
            guard flags & 1 == 0 else { return }  // IFF_UP already
            b.storeBytes(of: flags | 1, toByteOffset: 16, as: Int16.self)
            _ = try s.ioctl(0x8914, b.baseAddress)  // SIOCSIFFLAGS
        }
    }

    override func tearDownWithError() throws {
        // Every device fd closes before its mdev goes: removing an mdev still open waits for it.
        for d in opened {
            d.device.fd.close()
            if case let .iommufd(i, _) = d.dmaSpace { i.fd.close() }
            if case let .container(c) = d.dmaSpace { c.fd.close() }
        }
        opened = []
        for u in created { try removeMtty(u) }
        created = []
        Log.level = .info
    }

    // MARK: mtty instances

    private func writeSysfs(_ path: String, _ text: String) throws {
        let fd = open(path, O_WRONLY | O_CLOEXEC)
        guard fd >= 0 else { throw KernelVFIOError.unavailable("cannot open \(path): \(Errno.current)") }
        defer { close(fd) }
        let n = text.withCString { write(fd, $0, strlen($0)) }
        guard n == text.utf8.count else { throw KernelVFIOError.unavailable("writing '\(text)' to \(path): \(Errno.current)") }
    }

    /// A new mtty-2 instance (two UART ports: BAR0 and BAR1, 8 I/O registers each).
    private func createMtty() throws -> String {
        let uuid = UUID().uuidString.lowercased()
        try writeSysfs("\(Self.mttyType)/create", uuid)
        created.append(uuid)
        return "/sys/bus/mdev/devices/\(uuid)"
    }

    /// Remove, bounded: a removal that waits (a device fd still open) must not hang the lab.
    private func removeMtty(_ uuid: String) throws {
        let path = "/sys/bus/mdev/devices/\(uuid)/remove"
        let done = Condition()
        var finished = false
        let t = try OSThread(name: "mdev-remove") { [self] in
            try? writeSysfs(path, "1")
            done.mutex.withLock { finished = true; done.broadcast() }
        }
        let deadline = monotonicNanoseconds() + 10_000_000_000
        let ok = done.mutex.withLock { () -> Bool in
            while !finished && monotonicNanoseconds() < deadline { _ = done.wait(timeoutSeconds: 0.1) }
            return finished
        }
        if ok { t.join() } else { XCTFail("removing mdev \(uuid) did not finish in 10 s (a device fd left open?)") }
    }

    private func openMtty(_ backend: AssignedKernelDevice.Backend) throws -> AssignedKernelDevice {
        let d = try AssignedKernelDevice.open(sysfsPath: try createMtty(), backend: backend)
        opened.append(d)
        return d
    }

    // MARK: the migration

    enum Transport: String { case tcp, unix }

    struct Outcome {
        var source: MigrationSource
        var destination: MigrationDestination
        var src: MicroVM, dst: MicroVM
        var srcDevices: [AssignedKernelDevice], dstDevices: [AssignedKernelDevice]
        var ms: Double
    }

    /// Scratch register (UART offset 7) of each port: a value per device and port.
    static func scratch(_ device: Int, _ port: UInt32) -> UInt8 { UInt8(0xa0 + 0x10 * device) | UInt8(port + 5) }

    func migrate(_ backend: AssignedKernelDevice.Backend, over transport: Transport, devices n: Int) throws -> Outcome {
        if backend == .iommufd, access("/dev/iommu", F_OK) != 0 { throw XCTSkip("no /dev/iommu (IOMMUFD is not in this kernel)") }
        let srcDevices = try (0..<n).map { _ in try openMtty(backend) }
        let dstDevices = try (0..<n).map { _ in try openMtty(backend) }
        for d in srcDevices + dstDevices {
            let caps = try XCTUnwrap(try d.migrationCapabilities(), "mtty offers migration v2")
            XCTAssertEqual(caps, [.stopCopy, .p2p, .preCopy], "mtty's flags (0x7)")
        }
        var w = WorkloadConfig()
        w.workingSet = 2 << 20
        w.dirtyRate = 5_000
        w.dmaEvery = 0
        let src = try MicroVM(memorySize: 16 << 20, workload: w, devices: srcDevices, forceSoftware: true)
        let dst = try MicroVM(memorySize: 16 << 20, workload: w, devices: dstDevices, forceSoftware: true)
        addTeardownBlock { src.stop(); dst.stop() }
        XCTAssertTrue(src.isSoftware)
        // The registers the destination must show: written through the source VMM's device.
        for (i, d) in srcDevices.enumerated() {
            for port in UInt32(0)..<2 {
                try d.regionStore(port, 7, Self.scratch(i, port))
                XCTAssertEqual(try d.regionLoad(port, 7, as: UInt8.self), Self.scratch(i, port))
            }
        }
        for d in dstDevices { XCTAssertEqual(try d.regionLoad(0, 7, as: UInt8.self), 0, "a fresh mtty's scratch register is 0") }
        try src.start(); src.resume()
        try dst.start()
        let deadline = monotonicNanoseconds() + 20_000_000_000
        while src.pagesWritten < 200 && monotonicNanoseconds() < deadline { usleep(20_000) }
        XCTAssertGreaterThanOrEqual(src.pagesWritten, 200, "the guest writes pages before the migration")
        let before = src.verify()
        XCTAssertTrue(before.ok, "source before: \(before)")

        // The channel.
        let tcp = transport == .tcp ? try TCPListener(host: "127.0.0.1", port: 0) : nil
        let path = "/tmp/vfio-live-kmig-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).sock"
        let unix = transport == .unix ? try UnixListener(path: path) : nil
        defer { tcp?.close(); unix?.close() }
        let done = Condition()
        var destination: MigrationDestination?
        var destError: Error?, finished = false
        let t = try OSThread(name: "destination") {
            var err: Error?
            do {
                let s: StreamSocket? = try tcp.map { try $0.accept(timeoutMilliseconds: 30_000) } ?? unix?.accept(timeoutMilliseconds: 30_000)
                guard let s else { throw MigrationError.channel("no connection within 30 s") }
                let d = try MigrationDestination(vm: dst, from: s)
                d.peerTimeoutMS = 30_000
                d.verifyBeforeResume = true
                done.mutex.withLock { destination = d }
                try d.run()
            } catch { err = error }
            done.mutex.withLock { destError = err; finished = true; done.broadcast() }
        }
        let socket: StreamSocket = transport == .tcp ? try TCPSocket.connect(host: "127.0.0.1", port: tcp!.port) : try UnixSocket.connect(path: path)
        var p = MigrationParameters()
        p.peerTimeoutMS = 30_000
        p.maxIterations = 6
        // A legacy container tracks dirty pages (type1 DIRTY_PAGES); an iommufd IOAS without a
        // dirty-tracking HWPT does not: then all mapped RAM is resent at stop, allowed here.
        p.allowUntrackedDevices = backend == .iommufd
        let source = try MigrationSource(vm: src, to: socket, parameters: p, policies: [DeviceMigrationPolicy](repeating: .auto, count: n))
        let t0 = monotonicNanoseconds()
        try source.run()
        let ms = Double(monotonicNanoseconds() - t0) / 1e6
        done.mutex.withLock { while !finished { _ = done.wait() } }
        t.join()
        if let e = destError { throw e }
        return Outcome(source: source, destination: try XCTUnwrap(destination), src: src, dst: dst,
                       srcDevices: srcDevices, dstDevices: dstDevices, ms: ms)
    }

    /// What every migration must show: completed, the verifier passes at each step, the kernel
    /// moved every device's state (the registers read back at the destination), the guest
    /// runs on there, and each device visited QEMU's states.
    func check(_ o: Outcome, _ what: String) throws {
        XCTAssertEqual(o.source.stats.status, .completed, what)
        XCTAssertTrue(o.src.isPaused, "the source VM stays stopped after the migration")
        for (i, d) in o.dstDevices.enumerated() {
            XCTAssertEqual(try d.migrationState(), .running, "\(what): destination device \(i) runs")
            XCTAssertEqual(try o.srcDevices[i].migrationState(), .stop, "\(what): source device \(i) ends in STOP")
            for port in UInt32(0)..<2 {
                XCTAssertEqual(try d.regionLoad(port, 7, as: UInt8.self), Self.scratch(i, port),
                               "\(what): device \(i) port \(port)'s scratch register came across in the kernel's state")
            }
            let sent = o.source.stats.deviceBytes[i], got = o.destination.deviceBytes[i]
            XCTAssertEqual(sent, got, "\(what): device \(i) state bytes sent and loaded")
            XCTAssertEqual(sent, 96, "\(what): mtty's whole image is 96 bytes (24 of them in pre-copy)")
        }
        let atSwitch = o.dst.pagesWritten
        let deadline = monotonicNanoseconds() + 20_000_000_000
        while o.dst.pagesWritten <= atSwitch + 100 && monotonicNanoseconds() < deadline { usleep(20_000) }
        XCTAssertGreaterThan(o.dst.pagesWritten, atSwitch + 100, "\(what): the guest runs at the destination")
        o.dst.pause()
        let r = o.dst.verify()
        XCTAssertTrue(r.ok, "\(what): destination after: \(r)")
        // Source: RUNNING → PRE_COPY → PRE_COPY_P2P (QEMU's prepare handler) → STOP_COPY → STOP.
        for (i, m) in o.source.deviceMigrations.enumerated() {
            XCTAssertEqual(m.statesVisited, [.running, .preCopy, .preCopyP2P, .stopCopy, .stop], "\(what): source device \(i)")
        }
        // Destination: (RUNNING →) RESUMING → STOP → RUNNING_P2P → RUNNING.
        for (i, m) in o.destination.deviceMigrations.enumerated() {
            XCTAssertEqual(Array(m.statesVisited.suffix(4)), [.resuming, .stop, .runningP2P, .running], "\(what): destination device \(i): \(m.statesVisited)")
        }
        print("kmig figures: \(what): migration \(String(format: "%.1f", o.ms)) ms, downtime \(String(format: "%.1f", o.source.stats.downtimeMS)) ms, device state bytes \(o.source.stats.deviceBytes), RAM bytes \(o.source.stats.ramBytes), iterations \(o.source.stats.iterations)")
    }

    func testMttyVMMigratesOverTCPThroughALegacyContainer() throws { try check(migrate(.legacy, over: .tcp, devices: 1), "legacy, TCP") }
    func testMttyVMMigratesOverUNIXThroughALegacyContainer() throws { try check(migrate(.legacy, over: .unix, devices: 1), "legacy, UNIX") }
    func testMttyVMMigratesOverTCPThroughIOMMUFD() throws { try check(migrate(.iommufd, over: .tcp, devices: 1), "iommufd, TCP") }
    func testMttyVMMigratesOverUNIXThroughIOMMUFD() throws { try check(migrate(.iommufd, over: .unix, devices: 1), "iommufd, UNIX") }

    /// 6(f): two mtty devices in one VM. QEMU's order (vm_state_notify runs every prepare
    /// handler before any main handler): at the source every device is in PRE_COPY_P2P before
    /// either goes to STOP_COPY; at the destination every device is in RUNNING_P2P before
    /// either runs.
    func testVMWithTwoMttyDevicesMigratesThroughTheP2PStatesInQEMUsOrder() throws {
        let o = try migrate(.legacy, over: .tcp, devices: 2)
        try check(o, "two devices, legacy, TCP")
        func seqs(_ m: DeviceMigration, _ s: MigrationState) -> [UInt64] {
            zip(m.statesVisited, m.visitSequence).filter { $0.0 == s }.map(\.1)
        }
        let src = o.source.deviceMigrations, dst = o.destination.deviceMigrations
        XCTAssertEqual(src.count, 2)
        let lastP2P = src.compactMap { seqs($0, .preCopyP2P).last }, firstStopCopy = src.compactMap { seqs($0, .stopCopy).first }
        XCTAssertEqual(lastP2P.count, 2); XCTAssertEqual(firstStopCopy.count, 2)
        XCTAssertLessThan(lastP2P.max() ?? .max, firstStopCopy.min() ?? 0, "source: both devices PRE_COPY_P2P before any STOP_COPY")
        let destP2P = dst.compactMap { seqs($0, .runningP2P).last }, destRun = dst.compactMap { seqs($0, .running).last }
        XCTAssertEqual(destP2P.count, 2); XCTAssertEqual(destRun.count, 2)
        XCTAssertLessThan(destP2P.max() ?? .max, destRun.min() ?? 0, "destination: both devices RUNNING_P2P before any RUNNING")
    }

    /// QEMU's reason for a kernel device without a migration driver (edu through vfio-pci):
    /// VFIO_DEVICE_FEATURE MIGRATION answers ENOTTY, "VFIO migration is not supported in kernel".
    func testVMHoldingEduIsRefusedMigrationWithQEMUsReason() throws {
        guard let edu = PCIDevice.find(vendor: Edu.vendor, device: Edu.device).first else { throw XCTSkip("no edu device in this boot") }
        try edu.bindToVFIOPCI()
        let d = try AssignedKernelDevice.open(pciAddress: edu.address, backend: .legacy)
        opened.append(d)
        var w = WorkloadConfig()
        w.workingSet = 2 << 20
        w.dmaEvery = 0
        let vm = try MicroVM(memorySize: 16 << 20, workload: w, devices: [d], forceSoftware: true)
        defer { vm.stop() }
        XCTAssertNil(try d.migrationCapabilities(), "edu offers no migration v2")
        XCTAssertThrowsError(try MigrationSource.checkBlockers(vm: vm, parameters: MigrationParameters(), policies: [.auto])) { e in
            XCTAssertTrue("\(e)".contains("VFIO migration is not supported in kernel"), "\(e)")
            XCTAssertTrue("\(e)".contains("migration blocked"), "\(e)")
        }
    }

    // MARK: whole VMM processes

    /// A child process of the vfio-live binary, its output collected; killed at the end.
    final class VMM {
        let pid: pid_t
        let log: String
        init(_ args: [String], log: String) throws {
            self.log = log
            pid = try ChildProcess.spawn("/bin/sh", ["sh", "-c", "exec \"$0\" \"$@\" >\(log) 2>&1", KernelVFIOTests.binary] + args)
        }
        var output: String { (try? String(contentsOfFile: log, encoding: .utf8)) ?? "" }
        private var status: Int32?
        /// The exit status once it exited (waitpid reaps once: the status is kept).
        var exited: Int32? {
            if status == nil { status = ChildProcess.exitStatus(pid) }
            return status
        }
        func stop() {
            if exited == nil { kill(pid, SIGTERM) }
            let deadline = monotonicNanoseconds() + 10_000_000_000
            while exited == nil && monotonicNanoseconds() < deadline { usleep(20_000) }
            if exited == nil { kill(pid, SIGKILL); status = ChildProcess.wait(pid) }
        }
    }

    func waitFor(_ path: String, _ vmm: VMM) throws {
        let deadline = monotonicNanoseconds() + 60_000_000_000
        while access(path, F_OK) != 0 {
            guard monotonicNanoseconds() < deadline, vmm.exited == nil else { throw KernelVFIOError.invalid("\(path) did not appear: \(vmm.output)") }
            usleep(20_000)
        }
    }

    /// Two `vfio-live vm run --device vfio-pci,sysfsdev=...` processes in the guest, each with
    /// its own mtty, and `vfio-live migrate` over QMP, as a user would. The scratch registers are
    /// written through the device before the source VMM opens it; after the migration the
    /// destination VMM runs the VM, and once it has quit its device still holds the values the
    /// kernel moved.
    func processMigration(_ backend: AssignedKernelDevice.Backend, over transport: Transport) throws {
        if backend == .iommufd, access("/dev/iommu", F_OK) != 0 { throw XCTSkip("no /dev/iommu (IOMMUFD is not in this kernel)") }
        guard access(Self.binaryPath, X_OK) == 0 else { throw XCTSkip("vfio-live is not built at \(Self.binaryPath)") }
        let srcPath = try createMtty(), dstPath = try createMtty()
        do {
            let d = try AssignedKernelDevice.open(sysfsPath: srcPath, backend: .legacy)
            for port in UInt32(0)..<2 { try d.regionStore(port, 7, Self.scratch(0, port)) }
            d.device.fd.close()
            if case let .container(c) = d.dmaSpace { c.fd.close() }
        }
        let tag = "/tmp/vl-kmig-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        let iommufd = backend == .iommufd ? ",iommufd=on" : ""
        let common = ["vm", "run", "--memory", "16M", "--workload", "dirty-rate=5000,working-set=2M,dma-every=0", "--software-vcpus"]
        let src = try VMM(common + ["--device", "vfio-pci,sysfsdev=\(srcPath)\(iommufd)", "--qmp", "\(tag)-src.qmp"], log: "\(tag)-src.log")
        defer { src.stop() }
        let port = UInt16.random(in: 20_000...60_000)
        let uri = transport == .tcp ? "tcp:127.0.0.1:\(port)" : "unix:\(tag)-mig.sock"
        let dst = try VMM(common + ["--device", "vfio-pci,sysfsdev=\(dstPath)\(iommufd)", "--qmp", "\(tag)-dst.qmp", "--incoming", uri], log: "\(tag)-dst.log")
        defer { dst.stop() }
        try waitFor("\(tag)-src.qmp", src)
        try waitFor("\(tag)-dst.qmp", dst)
        if transport == .unix { try waitFor("\(tag)-mig.sock", dst) } else { usleep(500_000) }
        XCTAssertEqual(try LabQMP("\(tag)-src.qmp").object("query-status")["status"] as? String, "running")
        var args = ["migrate", "--qmp", "\(tag)-src.qmp", "--to", uri, "--max-iterations", "6", "--qmp-timeout", "30"]
        if backend == .iommufd { args.append("--allow-untracked-devices") }
        let t0 = monotonicNanoseconds()
        let m = try VMM(args, log: "\(tag)-migrate.log")
        let deadline = monotonicNanoseconds() + 120_000_000_000
        while m.exited == nil && monotonicNanoseconds() < deadline { usleep(50_000) }
        let ms = Double(monotonicNanoseconds() - t0) / 1e6
        if m.exited == nil { m.stop() }
        XCTAssertEqual(m.exited, 0, "migrate: \(m.output)\nsource: \(src.output)\ndestination: \(dst.output)")
        XCTAssertTrue(m.output.contains("migration completed"), m.output)
        // The VMMs set their run states just after the stream's last handshake: poll, bounded.
        func status(_ qmp: String, becomes want: String) -> String? {
            var last: String?
            let until = monotonicNanoseconds() + 20_000_000_000
            repeat {
                last = (try? LabQMP(qmp).object("query-status"))?["status"] as? String
                if last == want { break }
                usleep(50_000)
            } while monotonicNanoseconds() < until
            return last
        }
        XCTAssertEqual(status("\(tag)-dst.qmp", becomes: "running"), "running", dst.output)
        XCTAssertEqual(status("\(tag)-src.qmp", becomes: "postmigrate"), "postmigrate")
        let q = try LabQMP("\(tag)-src.qmp").object("query-migrate")
        print("kmig figures: processes, \(backend), \(transport): migrate command \(String(format: "%.0f", ms)) ms; query-migrate total-time \(q["total-time"] ?? "?") ms, downtime \(q["downtime"] ?? "?") ms, vfio \(q["vfio"] ?? "?")")
        // The destination VMM goes; its device keeps the state the kernel loaded.
        _ = try? LabQMP("\(tag)-dst.qmp").call("quit")
        dst.stop()
        XCTAssertEqual(dst.exited, 0, dst.output)
        let d = try AssignedKernelDevice.open(sysfsPath: dstPath, backend: .legacy)
        opened.append(d)
        for port in UInt32(0)..<2 {
            XCTAssertEqual(try d.regionLoad(port, 7, as: UInt8.self), Self.scratch(0, port), "port \(port)'s scratch register came across through the VMM processes")
        }
    }

    static var binaryPath: String { KernelVFIOTests.binary }

    // Once skipped (issue 11): in whole-class lab runs the destination stayed paused because
    // the migration began inside the source VMM's 2-second verifier scan, whose vCPU pause the
    // engine took for the VM's run state. RunStateTests' host test pins that ordering down.
    func testMttyVMMigratesBetweenTwoVMMProcessesOverUNIXThroughALegacyContainer() throws { try processMigration(.legacy, over: .unix) }
    func testMttyVMMigratesBetweenTwoVMMProcessesOverTCPThroughIOMMUFD() throws { try processMigration(.iommufd, over: .tcp) }
}
