import Glibc
@testable import KernelVFIO
import LiveUpdate
import SystemCalls
import XCTest

/// Live update of whole VMM processes holding kernel VFIO devices (issue 11, items 5, 6(c),
/// 6(d) and 8), in the lab guest (scripts/lab.sh edu): `vfio-live vm run --device
/// vfio-pci,host=<edu>[,iommufd=on]` with software vCPUs, handed over by cpr-transfer and
/// cpr-exec, as QEMU does it (VADDR for a legacy container, MAP_FILE + CHANGE_PROCESS for
/// iommufd; fds and eventfds passed, nothing reset or reconfigured). Only in the edu boot: the
/// dma-engine boots have a device with edu's ids but are about vfio-user, and mtty is there too.
final class KernelLiveUpdateTests: XCTestCase {
    var edu: PCIDevice!
    var tag = ""
    var qmpPath = ""
    var pids: [pid_t] = []
    var logs: [String] = []
    var mdevs: [String] = []
    static var binary: String { ChildProcess.besideCurrentExecutable("vfio-live") }

    override func setUpWithError() throws {
        guard ProcessInfo.processInfo.environment["VFIO_LIVE_LAB"] == "1", access("/dev/vfio/vfio", F_OK) == 0 else {
            throw XCTSkip("lab test: runs in the lab guest (bash scripts/lab.sh edu)")
        }
        guard ProcessInfo.processInfo.environment["VFIO_LIVE_LAB_DEVICE"] == "edu" else {
            throw XCTSkip("runs only in the lab's edu boot (this one is \(ProcessInfo.processInfo.environment["VFIO_LIVE_LAB_DEVICE"] ?? "?"))")
        }
        guard access(Self.binary, X_OK) == 0 else { throw XCTSkip("vfio-live is not built at \(Self.binary)") }
        tag = "\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        qmpPath = "/tmp/vfio-live-klu-\(tag).qmp"
        if let d = PCIDevice.find(vendor: Edu.vendor, device: Edu.device).first {
            try d.bindToVFIOPCI()
            edu = d
        }
    }

    override func tearDownWithError() throws {
        // hasSucceeded is false until the run stops (after tearDown): count the failures.
        if (testRun?.totalFailureCount ?? 0) > 0 {
            for l in logs { print("---- \(l)\n" + ((try? String(contentsOfFile: l, encoding: .utf8)) ?? "")) }
        }
        _ = try? LabQMP(qmpPath).call("quit")
        // The VMM a successor replaced is not our child: wait for whoever holds the socket.
        _ = try? waitFor(10, "the VMM to quit") { (try? LabQMP(qmpPath)) == nil }
        // A pid reaped earlier (an old VMM waited for after its update) is gone: kill(p, 0) fails.
        for p in pids where ChildProcess.exitStatus(p) == nil && kill(p, 0) == 0 {
            kill(p, SIGKILL)
            if (try? waitFor(10, "pid \(p) to die") { ChildProcess.exitStatus(p) != nil }) == nil {
                print("pid \(p) does not die: " + ((try? String(contentsOfFile: "/proc/\(p)/stack", encoding: .utf8)) ?? ""))
            }
        }
        // Only now: removing an mdev that a process still holds waits until it lets go.
        for m in mdevs { try Self.removeMdev(m) }
    }

    /// Write "1" to the mdev's remove file, bounded (a holder left behind must not hang the lab).
    static func removeMdev(_ path: String) throws {
        let done = Condition()
        var finished = false
        let t = try OSThread(name: "mdev-remove") {
            let r = open("\(path)/remove", O_WRONLY | O_CLOEXEC)
            if r >= 0 { _ = write(r, "1", 1); close(r) }
            done.mutex.withLock { finished = true; done.broadcast() }
        }
        let ok = done.mutex.withLock { () -> Bool in
            let deadline = monotonicNanoseconds() + 10_000_000_000
            while !finished && monotonicNanoseconds() < deadline { _ = done.wait(timeoutSeconds: 0.1) }
            return finished
        }
        if ok { t.join() } else { print("removing \(path) did not finish in 10 s; left behind") }
    }

    // MARK: processes

    /// Start `vfio-live ARGS` with its output in a log file (posix_spawn through sh: the lab
    /// guest is a bare initramfs, Foundation's Process is not used).
    @discardableResult
    func start(_ args: [String], env: [String] = [], log name: String) throws -> pid_t {
        let log = "/tmp/vfio-live-klu-\(tag)-\(name).log"
        logs.append(log)
        let pid = try ChildProcess.spawn("/bin/sh", ["/bin/sh", "-c", "exec \"$0\" \"$@\" >>\(log) 2>&1", Self.binary] + args, extraEnvironment: env)
        pids.append(pid)
        return pid
    }

    func waitFor(_ seconds: Double, _ what: String, _ cond: () -> Bool) throws {
        let deadline = monotonicNanoseconds() + UInt64(seconds * 1e9)
        while !cond() {
            guard monotonicNanoseconds() < deadline else { throw LabError("timed out after \(seconds) s waiting for \(what)") }
            usleep(20_000)
        }
    }

    let workload = "dirty-rate=20000,working-set=4M,dma-every=2"

    /// A VMM holding `device`, running, with its QMP socket up and (for edu) DMA rounds done.
    func startVMM(device: String?, env: [String] = [], dma: Bool = true) throws -> pid_t {
        var args = ["vm", "run", "--memory", "16M", "--qmp", qmpPath, "--workload", dma ? workload : "dirty-rate=20000,working-set=4M",
                    "--verify-every", "1", "--quiet"]
        if let d = device { args += ["--device", d] }
        let pid = try start(args, env: env, log: "vm")
        try waitFor(60, "the VMM's QMP socket") { (try? LabQMP(qmpPath)) != nil || ChildProcess.exitStatus(pid) != nil }
        XCTAssertNil(ChildProcess.exitStatus(pid), "the VMM exited at start")
        if dma { try waitFor(60, "DMA round trips") { ((try? verify())?.dma ?? 0) >= 2 } }
        return pid
    }

    struct Verified { var ok: Bool; var pages: UInt64; var dma: UInt64; var text: String }

    static func n(_ v: Any?) -> UInt64 { (v as? NSNumber)?.uint64Value ?? 0 }

    func verify() throws -> Verified {
        let r = try LabQMP(qmpPath).object("x-vfio-live-verify")
        return Verified(ok: r["ok"] as? Bool == true, pages: Self.n(r["page-writes"]), dma: Self.n(r["dma-round-trips"]), text: "\(r)")
    }

    func vmmPID() throws -> UInt64 { Self.n(try LabQMP(qmpPath).object("x-vfio-live-pid")["pid"]) }

    /// The old VMM waits max(peer timeout, 20 s) for the successor it spawns to listen. In the
    /// TCG guest (one host thread for both guest CPUs, the old VMM's software vCPUs busy) a
    /// debug successor once took longer than 20 s to get there (CI, clean clone): give it 60 s.
    func allowSlowSuccessor() throws {
        _ = try LabQMP(qmpPath).call("migrate-set-parameters", #"{"x-vfio-live-peer-timeout":60000}"#).get()
    }

    /// Ask for a live update (x-vfio-live-update with these arguments); a refusal is thrown.
    func update(_ arguments: String) throws { _ = try LabQMP(qmpPath).call("x-vfio-live-update", arguments).get() }

    /// The VM answers on QMP, runs, passes the verifier, and its guest (and DMA) make progress.
    func assertHealthy(_ what: String, dma: Bool = true, file: StaticString = #filePath, line: UInt = #line) throws {
        XCTAssertEqual(try LabQMP(qmpPath).object("query-status")["status"] as? String, "running", what, file: file, line: line)
        let v0 = try verify()
        XCTAssertTrue(v0.ok, "\(what): \(v0.text)", file: file, line: line)
        try waitFor(60, "\(what): progress") { ((try? verify()).map { $0.pages > v0.pages && (!dma || $0.dma > v0.dma) }) ?? false }
        let v1 = try verify()
        XCTAssertTrue(v1.ok, "\(what): \(v1.text)", file: file, line: line)
    }

    /// A live update's outcome: "completed" (from the new VMM) or "failed" (from the old one),
    /// with the query-migrate answer that said so.
    struct UpdateOutcome: CustomStringConvertible {
        var status: String
        var migrate: [String: Any]
        /// The VMM's live-update report (x-vfio-live-cpr: mode, blackout-ns, ...).
        var cpr: [String: Any] { migrate["x-vfio-live-cpr"] as? [String: Any] ?? [:] }
        var description: String { "\(status): \(migrate)" }
    }

    /// Wait for the live update's outcome on the VMM behind the QMP socket: "completed" from the
    /// new VMM, or "failed" from the old one.
    func awaitUpdate(oldPID: UInt64, exec: Bool) throws -> UpdateOutcome {
        var outcome = UpdateOutcome(status: "", migrate: [:])
        try waitFor(90, "the live update's outcome") {
            guard let q = try? LabQMP(qmpPath), let m = try? q.object("query-migrate"), let p = try? q.object("x-vfio-live-pid") else { return false }
            let pid = Self.n(p["pid"])
            let status = m["status"] as? String
            if status == "failed" && pid == oldPID { outcome = UpdateOutcome(status: "failed", migrate: m); return true }
            if status == "completed" && m["x-vfio-live-cpr"] != nil && (exec || pid != oldPID) {
                outcome = UpdateOutcome(status: "completed", migrate: m); return true
            }
            return false
        }
        return outcome
    }

    // MARK: the device, seen from outside the VMM

    /// The command register and the MSI capability (control, address, data) of the real device,
    /// through sysfs: a reset (VFIO_DEVICE_RESET, or vfio-pci's on the last close) clears bus
    /// mastering and MSI enable, and a redone configuration would show in them too.
    func configSnapshot() throws -> [UInt8] {
        let fd = open("\(edu.path)/config", O_RDONLY)
        guard fd >= 0 else { throw LabError("cannot read \(edu.path)/config: \(Errno.current)") }
        defer { close(fd) }
        var cfg = [UInt8](repeating: 0, count: 256)
        guard pread(fd, &cfg, 256, 0) == 256 else { throw LabError("short read of config space") }
        var at = Int(cfg[0x34]) & ~3, msi = 0, hops = 0
        while at >= 0x40 && at < 0xfc && hops < 48 {
            if cfg[at] == 0x05 { msi = at; break }
            at = Int(cfg[at + 1]) & ~3; hops += 1
        }
        guard msi != 0 else { throw LabError("edu shows no MSI capability in sysfs config") }
        return Array(cfg[4..<6]) + Array(cfg[(msi + 2)..<(msi + 14)])
    }

    /// The in-flight probe (DMAInFlightProbe): the job the old VMM started in the blackout wrote
    /// the edu buffer into guest RAM; compared in the guest RAM memfd of process `pid`.
    func assertProbeLanded(pid: UInt64, _ what: String, file: StaticString = #filePath, line: UInt = #line) throws {
        guard let dir = opendir("/proc/\(pid)/fd") else { throw LabError("no /proc/\(pid)/fd") }
        var ram: String?
        while let e = readdir(dir) {
            let n = withUnsafeBytes(of: e.pointee.d_name) { String(cString: $0.bindMemory(to: CChar.self).baseAddress!) }
            if (readLink("/proc/\(pid)/fd/\(n)") ?? "").contains("memfd:vfio-live-guest-ram") { ram = "/proc/\(pid)/fd/\(n)" }
        }
        closedir(dir)
        let fd = open(try XCTUnwrap(ram, "\(what): the guest RAM memfd of pid \(pid)"), O_RDONLY)
        XCTAssertGreaterThanOrEqual(fd, 0)
        defer { close(fd) }
        var got = [UInt8](repeating: 0, count: 4088), want = got
        XCTAssertEqual(pread(fd, &got, got.count, off_t(DMAInFlightProbe.target)), got.count)
        XCTAssertEqual(pread(fd, &want, want.count, off_t(DMAInFlightProbe.expected)), want.count)
        XCTAssertNotEqual(want, [UInt8](repeating: 0, count: want.count), "\(what): the probe's expected bytes are set", file: file, line: line)
        XCTAssertEqual(got, want, "\(what): the DMA job in flight across the handoff landed in guest RAM", file: file, line: line)
    }

    /// What the new VMM said about the probe job (its log): printed, and it must have completed.
    func probeReport(_ what: String) -> String {
        let all = logs.compactMap { try? String(contentsOfFile: $0, encoding: .utf8) }.joined(separator: "\n")
        let line = all.split(separator: "\n").last { $0.hasPrefix("cpr-probe:") }.map(String.init) ?? "cpr-probe: no report"
        print("\(what): \(line)")
        return line
    }

    // MARK: 6(c): edu, cpr-transfer and cpr-exec, with rollback

    func testLiveUpdateOfAVMMHoldingEduThroughALegacyContainer() throws { try eduSequence(iommufd: false) }

    func testLiveUpdateOfAVMMHoldingEduThroughIOMMUFD() throws {
        guard access("/dev/iommu", F_OK) == 0 else { throw XCTSkip("no /dev/iommu in this kernel") }
        try eduSequence(iommufd: true)
    }

    /// One VMM holding edu: two rolled-back updates (the successor dies right after receiving
    /// the descriptors; then after it attached itself to the DMA mappings, the worst case for
    /// the legacy VADDR recovery), then cpr-transfer, then cpr-exec. After each step: the VM
    /// runs with DMA going on, the verifier passes, the device shows no reset; after each
    /// completed update the DMA job started in the blackout landed in guest RAM.
    func eduSequence(iommufd: Bool) throws {
        let name = iommufd ? "iommufd" : "legacy"
        guard edu != nil else { throw XCTSkip("no edu device (1234:11e8)") }
        let device = "vfio-pci,host=\(edu.address)" + (iommufd ? ",iommufd=on" : "")
        _ = try startVMM(device: device, env: ["\(DMAInFlightProbe.variable)=1"])
        try assertHealthy("\(name): booted")
        let config = try configSnapshot()
        XCTAssertNotEqual(config[0] & 0x4, 0, "bus mastering is on: \(config)")
        XCTAssertNotEqual(config[2] & 0x1, 0, "MSI is enabled: \(config)")
        let first = try vmmPID()

        // Rollback: the successor dies after it receives the descriptors (QEMU: the target dies
        // while reading CPR state; the source sees the HUP, and the VM runs on).
        for fault in ["after-state", "commit"] {
            let path = "/tmp/vfio-live-klu-\(tag)-\(fault).cpr"
            let succ = try start(["vm", "run", "--incoming", "cpr:unix:\(path)", "--quiet"], env: ["VFIO_LIVE_CPR_FAULT=\(fault)", "\(DMAInFlightProbe.variable)=1"],
                                 log: "successor-\(fault)")
            try waitFor(60, "the successor's cpr socket") { access(path, F_OK) == 0 || ChildProcess.exitStatus(succ) != nil }
            try update(#"{"mode":"cpr-transfer","to":"unix:\#(path)"}"#)
            let outcome = try awaitUpdate(oldPID: first, exec: false)
            XCTAssertEqual(outcome.status, "failed", "\(name), successor dying at \(fault): \(outcome)")
            try waitFor(20, "the dead successor") { ChildProcess.exitStatus(succ) != nil }
            XCTAssertEqual(try vmmPID(), first, "\(name): the old VMM keeps the VM")
            try assertHealthy("\(name): rolled back after the successor died at \(fault)")
            XCTAssertEqual(try configSnapshot(), config, "\(name): no reset or reconfiguration (rollback at \(fault))")
        }

        // cpr-transfer: the old VMM starts the new one with its own command line.
        try update(#"{"mode":"cpr-transfer"}"#)
        let t = try awaitUpdate(oldPID: first, exec: false)
        XCTAssertEqual(t.status, "completed", "\(name) cpr-transfer: \(t)")
        let second = try vmmPID()
        XCTAssertNotEqual(second, first)
        try assertHealthy("\(name): after cpr-transfer")
        XCTAssertEqual(try configSnapshot(), config, "\(name): no reset or reconfiguration across cpr-transfer")
        try assertProbeLanded(pid: second, "\(name) cpr-transfer")
        XCTAssertTrue(probeReport("\(name) cpr-transfer").contains("completed"))
        try waitFor(20, "the old VMM to exit") { ChildProcess.exitStatus(pid_t(first)) != nil || kill(pid_t(first), 0) != 0 }

        // cpr-exec: the new VMM re-executes itself in place (same pid).
        try update(#"{"mode":"cpr-exec"}"#)
        let e = try awaitUpdate(oldPID: second, exec: true)
        XCTAssertTrue(e.status == "completed" && e.cpr["mode"] as? String == "cpr-exec", "\(name) cpr-exec: \(e)")
        XCTAssertEqual(try vmmPID(), second, "cpr-exec keeps the pid")
        try assertHealthy("\(name): after cpr-exec")
        XCTAssertEqual(try configSnapshot(), config, "\(name): no reset or reconfiguration across cpr-exec")
        try assertProbeLanded(pid: second, "\(name) cpr-exec")
        XCTAssertTrue(probeReport("\(name) cpr-exec").contains("completed"))
    }

    // MARK: 6(d): mtty

    /// A new mtty instance (mtty-1: one port); removed at the end of the test.
    func makeMtty() throws -> String {
        let create = "/sys/class/mdev_bus/mtty/mdev_supported_types/mtty-1/create"
        guard access(create, W_OK) == 0 else { throw XCTSkip("no mtty in this kernel (\(create))") }
        let uuid = "83b8f4f2-509f-382f-3c1e-e6bfe0fa\(String(format: "%04x", UInt32.random(in: 0...0xffff)))"
        let fd = open(create, O_WRONLY)
        guard fd >= 0, write(fd, uuid, uuid.utf8.count) == uuid.utf8.count else { close(fd); throw LabError("cannot create mtty \(uuid): \(Errno.current)") }
        close(fd)
        mdevs.append("/sys/bus/mdev/devices/\(uuid)")
        return "/sys/bus/mdev/devices/\(uuid)"
    }

    /// QEMU's blocker (hw/vfio/cpr-legacy.c): "CPR does not support vfio mdev %s" in a legacy
    /// container, because a mediated device needs a valid VA at all times.
    func testLiveUpdateOfAVMMHoldingAnMdevInALegacyContainerIsRefusedWithTheReason() throws {
        let mdev = try makeMtty()
        _ = try startVMM(device: "vfio-pci,sysfsdev=\(mdev)", dma: false)
        let pid = try vmmPID()
        for mode in ["cpr-transfer", "cpr-exec"] {
            XCTAssertThrowsError(try update(#"{"mode":"\#(mode)"}"#), mode) { err in
                let s = "\(err)"
                XCTAssertTrue(s.contains("CPR does not support vfio mdev") && s.contains("VA must always be valid"), s)
            }
        }
        XCTAssertEqual(try vmmPID(), pid)
        try assertHealthy("mdev, legacy: refused, runs on", dma: false)
    }

    /// With iommufd the mappings are by file: an mdev can be live-updated.
    func testLiveUpdateOfAVMMHoldingAnMdevThroughIOMMUFDWorks() throws {
        guard access("/dev/iommu", F_OK) == 0 else { throw XCTSkip("no /dev/iommu in this kernel") }
        let mdev = try makeMtty()
        _ = try startVMM(device: "vfio-pci,sysfsdev=\(mdev),iommufd=on", dma: false)
        let first = try vmmPID()
        try allowSlowSuccessor()
        try update(#"{"mode":"cpr-transfer"}"#)
        let t = try awaitUpdate(oldPID: first, exec: false)
        XCTAssertEqual(t.status, "completed", "mdev iommufd cpr-transfer: \(t)")
        try assertHealthy("mdev, iommufd: after cpr-transfer", dma: false)
        let second = try vmmPID()
        try update(#"{"mode":"cpr-exec"}"#)
        let e = try awaitUpdate(oldPID: second, exec: true)
        XCTAssertEqual(e.status, "completed", "mdev iommufd cpr-exec: \(e)")
        try assertHealthy("mdev, iommufd: after cpr-exec", dma: false)
    }

    // MARK: 8: the blackout

    /// The blackout (vCPUs paused in the old VMM → running in the new one, as the new VMM
    /// measures it) of cpr-transfer with edu attached, legacy and iommufd, beside the same VM
    /// with no device. TCG: only the ratio means anything; printed as lab-figure lines.
    func testBlackoutWithEduBesideNoKernelDevice() throws {
        guard edu != nil else { throw XCTSkip("no edu device (1234:11e8)") }
        func blackouts(_ device: String?, _ n: Int) throws -> [Double] {
            _ = try startVMM(device: device, dma: device != nil)
            var out: [Double] = []
            for _ in 0..<n {
                let old = try vmmPID()
                try update(#"{"mode":"cpr-transfer"}"#)
                let r = try awaitUpdate(oldPID: old, exec: false)
                XCTAssertEqual(r.status, "completed", "\(r)")
                guard let ns = (r.cpr["blackout-ns"] as? NSNumber)?.uint64Value else { XCTFail("no blackout in \(r)"); continue }
                out.append(Double(ns) / 1e6)
                try assertHealthy("after a measured cpr-transfer", dma: device != nil)
            }
            _ = try? LabQMP(qmpPath).call("quit")
            try waitFor(20, "the VMM to quit") { (try? LabQMP(qmpPath)) == nil }
            return out
        }
        func median(_ v: [Double]) -> Double { let s = v.sorted(); return s.isEmpty ? 0 : s[s.count / 2] }
        let none = try blackouts(nil, 3)
        let legacy = try blackouts("vfio-pci,host=\(edu.address)", 3)
        var line = "lab-figure: cpr-transfer blackout (TCG lab, software vCPUs, 16 MiB): no device median \(formatFixed(median(none), 2)) ms \(none.map { formatFixed($0, 2) }); " +
            "edu legacy median \(formatFixed(median(legacy), 2)) ms \(legacy.map { formatFixed($0, 2) }), ratio \(formatFixed(median(legacy) / max(median(none), 0.001), 2))"
        if access("/dev/iommu", F_OK) == 0 {
            let iommufd = try blackouts("vfio-pci,host=\(edu.address),iommufd=on", 3)
            line += "; edu iommufd median \(formatFixed(median(iommufd), 2)) ms \(iommufd.map { formatFixed($0, 2) }), ratio \(formatFixed(median(iommufd) / max(median(none), 0.001), 2))"
        }
        print(line)
        XCTAssertEqual(none.count, 3)
        XCTAssertEqual(legacy.count, 3)
    }
}
