import Foundation
import Glibc
@testable import KernelVFIO
import SystemCalls
import XCTest

/// Whole VMM processes holding kernel devices, in the lab guest (issue 11 item 6b): `vfio-live
/// vm run --device vfio-pci,host=…` with QEMU's edu (or, in the dma-engine boots, our
/// edu-compatible dma-engine at the same place, as KernelPCIAttachTests), driven over QMP, in
/// legacy and iommufd mode; and an mtty mdev by `sysfsdev=` (edu boot only: it does not depend
/// on the PCI device). The vCPUs are software ones (no /dev/kvm in the guest). Skips elsewhere.
final class KernelVMMProcessTests: XCTestCase {
    static var binary: String { ChildProcess.besideCurrentExecutable("vfio-live") }
    var processes: [LabChild] = []
    var tag = ""
    var qmpPath: String { "/tmp/kvmm-\(tag).qmp" }
    var logPath: String { "/tmp/kvmm-\(tag).log" }
    var cleanups: [() -> Void] = []

    override func setUpWithError() throws {
        guard ProcessInfo.processInfo.environment["VFIO_LIVE_LAB"] == "1", access("/dev/vfio/vfio", F_OK) == 0 else {
            throw XCTSkip("these tests run in the lab guest (bash scripts/lab.sh), against its /dev/vfio")
        }
        guard access(Self.binary, X_OK) == 0 else { throw XCTSkip("vfio-live is not built at \(Self.binary)") }
        tag = "\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
    }

    override func tearDown() {
        if let q = try? LabQMP(qmpPath) { _ = try? q.call("quit") }
        for p in processes { _ = p.wait(seconds: 10) }
        for c in cleanups.reversed() { c() }
        unlink(qmpPath)
    }

    var log: String { (try? String(contentsOfFile: logPath, encoding: .utf8)) ?? "" }

    /// edu (the lab's device at its PCI address), bound to vfio-pci through driver_override.
    func eduAddress() throws -> String {
        guard let d = PCIDevice.find(vendor: Edu.vendor, device: Edu.device).first else {
            throw XCTSkip("no edu device (1234:11e8): start QEMU with -device edu (bash scripts/lab.sh does)")
        }
        try d.bindToVFIOPCI()
        return d.address
    }

    /// `vfio-live vm run` with one device and a QMP socket; returns once QMP answers.
    func startVM(device: String, workload: String) throws -> LabChild {
        let p = try LabChild(Self.binary, ["vm", "run", "--memory", "16M", "--software-vcpus", "--device", device, "--qmp", qmpPath,
                                           "--workload", workload, "--verify-every", "1", "--quiet"], log: logPath)
        processes.append(p)
        let deadline = monotonicNanoseconds() + 60_000_000_000
        while access(qmpPath, F_OK) != 0 {
            guard p.isRunning else { throw LabError("vm run exited (\(p.status ?? -1)) before its QMP socket came up: \(log)") }
            guard monotonicNanoseconds() < deadline else { throw LabError("no QMP socket within 60 s: \(log)") }
            usleep(20_000)
        }
        return p
    }

    /// The verifier's report once `cond` holds (polled over QMP, bounded).
    func waitVerify(_ q: LabQMP, _ what: String, within seconds: Double = 90, _ cond: ([String: Any]) -> Bool) throws -> [String: Any] {
        let deadline = monotonicNanoseconds() + UInt64(seconds * 1e9)
        while true {
            let v = try q.object("x-vfio-live-verify")
            if cond(v) { return v }
            guard monotonicNanoseconds() < deadline else { throw LabError("\(what): not reached within \(seconds) s; last report \(v); log: \(log)") }
            usleep(200_000)
        }
    }

    static func n(_ v: Any?) -> UInt64 { (v as? NSNumber)?.uint64Value ?? 0 }

    // MARK: edu through vfio-pci

    func testVMMProcessHoldingEduInALegacyContainerRunsDMAAndRefusesMigration() throws { try checkEdu(iommufd: false) }

    func testVMMProcessHoldingEduThroughIOMMUFDRunsDMAAndRefusesMigration() throws {
        guard access("/dev/iommu", F_OK) == 0 else { throw XCTSkip("no /dev/iommu (IOMMUFD is not in this kernel)") }
        try checkEdu(iommufd: true)
    }

    func checkEdu(iommufd: Bool) throws {
        do { try checkEduSteps(iommufd: iommufd) } catch let e as XCTSkip { throw e } catch { XCTFail("\(error); the VMM's log: \(log)") }
    }

    func checkEduSteps(iommufd: Bool) throws {
        let address = try eduAddress()
        let p = try startVM(device: "vfio-pci,host=\(address)\(iommufd ? ",iommufd=on" : "")",
                            workload: "dirty-rate=20000,working-set=4M,dma-every=2")
        let q = try LabQMP(qmpPath)
        XCTAssertEqual(try q.object("query-status")["status"] as? String, "running", log)
        // The guest's DMA rounds: guest RAM → device → guest RAM through the IOMMU, checked by
        // the verifier (each round's bytes land where the guest expects them).
        let v0 = try waitVerify(q, "3 DMA round trips") { Self.n($0["dma-round-trips"]) >= 3 }
        XCTAssertEqual(v0["ok"] as? Bool, true, "\(v0); \(log)")
        XCTAssertEqual(Self.n(v0["dma-errors"]), 0, "\(v0)")
        XCTAssertEqual((v0["mode"] as? String)?.hasPrefix("software vCPU"), true, "\(v0)")
        // The device as the VMM lists it: a kernel device with no migration state.
        let devs = try q.array("x-vfio-live-devices")
        XCTAssertEqual(devs.count, 1)
        XCTAssertEqual(devs.first?["transport"] as? String, "kernel VFIO", "\(devs)")
        XCTAssertEqual(devs.first?["name"] as? String, address, "\(devs)")
        XCTAssertEqual(devs.first?["state"] as? String, "none", "edu has no migration: \(devs)")
        XCTAssertGreaterThan(Self.n(devs.first?["interrupts"]), 0, "edu's MSI on each completed DMA: \(devs)")
        if !iommufd {
            // A second process cannot take the group the VMM holds: said so, not a bare EBUSY.
            let r = try runCLI(["device", "info", "--device", "vfio-pci,host=\(address)"])
            XCTAssertEqual(r.status, 1, r.output)
            XCTAssertTrue(r.output.contains("is in use (EBUSY)") && r.output.contains("another VMM"), r.output)
        }
        // QEMU's blocker for a VFIO device without migration (hw/vfio/migration.c: for a
        // kernel driver without migration v2, "VFIO migration is not supported in kernel";
        // "VFIO device doesn't support migration" in general); refused before any connection.
        let refusal = try q.call("migrate", #"{"uri":"unix:/tmp/kvmm-\#(tag)-nobody.sock"}"#)
        guard case let .failure(e) = refusal else { return XCTFail("migrate of a VM holding edu was accepted; \(log)") }
        XCTAssertTrue(e.description.contains("VFIO migration is not supported in kernel") || e.description.contains("VFIO device doesn't support migration"), e.description)
        XCTAssertTrue(p.isRunning, "the VMM survives the refused migrate: \(log)")
        // After the refusal the VM runs on, its DMA goes on and the verifier passes.
        let q2 = try LabQMP(qmpPath)
        XCTAssertEqual(try q2.object("query-status")["status"] as? String, "running", log)
        let before = Self.n(try q2.object("x-vfio-live-verify")["dma-round-trips"])
        let v1 = try waitVerify(q2, "DMA after the refused migrate") { Self.n($0["dma-round-trips"]) >= before + 2 }
        XCTAssertEqual(v1["ok"] as? Bool, true, "\(v1); \(log)")
        XCTAssertEqual(Self.n(v1["dma-errors"]), 0, "\(v1)")
        XCTAssertNotEqual(try q2.object("query-migrate")["status"] as? String, "active", "no migration runs")
        _ = try q2.call("quit")
        XCTAssertEqual(p.wait(seconds: 20), 0, "quit ends the VMM within 20 s, with status 0: \(log)")
    }

    // MARK: an mtty mdev by sysfsdev=

    func testVMMProcessHoldingAnMttyMdevInALegacyContainerAttachesAndRuns() throws { try checkMtty(iommufd: false) }

    func testVMMProcessHoldingAnMttyMdevThroughIOMMUFDAttachesAndRuns() throws {
        guard access("/dev/iommu", F_OK) == 0 else { throw XCTSkip("no /dev/iommu (IOMMUFD is not in this kernel)") }
        try checkMtty(iommufd: true)
    }

    /// A new mtty-2 instance (two ports), removed at the end of the test.
    func createMtty() throws -> String {
        guard ProcessInfo.processInfo.environment["VFIO_LIVE_LAB_DEVICE"] == "edu" else {
            throw XCTSkip("mtty does not depend on the lab's PCI device: it runs in the edu boot only")
        }
        let create = "/sys/class/mdev_bus/mtty/mdev_supported_types/mtty-2/create"
        guard access(create, W_OK) == 0 else { throw XCTSkip("no mtty parent (\(create)): the lab kernel has SAMPLE_VFIO_MDEV_MTTY") }
        let uuid = UUID().uuidString.lowercased()
        try PCIDevice.write(create, uuid)
        cleanups.append { try? PCIDevice.write("/sys/bus/mdev/devices/\(uuid)/remove", "1") }
        return "/sys/bus/mdev/devices/\(uuid)"
    }

    func checkMtty(iommufd: Bool) throws {
        do { try checkMttySteps(iommufd: iommufd) } catch let e as XCTSkip { throw e } catch { XCTFail("\(error); the VMM's log: \(log)") }
    }

    func checkMttySteps(iommufd: Bool) throws {
        let path = try createMtty()
        let p = try startVM(device: "vfio-pci,sysfsdev=\(path)\(iommufd ? ",iommufd=on" : "")", workload: "dirty-rate=20000,working-set=4M")
        let q = try LabQMP(qmpPath)
        XCTAssertEqual(try q.object("query-status")["status"] as? String, "running", log)
        let v0 = try waitVerify(q, "the guest writes pages") { Self.n($0["page-writes"]) > 0 }
        let v1 = try waitVerify(q, "the guest goes on writing") { Self.n($0["page-writes"]) > Self.n(v0["page-writes"]) }
        XCTAssertEqual(v1["ok"] as? Bool, true, "\(v1); \(log)")
        XCTAssertEqual(Self.n(v1["dma-round-trips"]), 0, "mtty does no DMA, so the guest runs none")
        let devs = try q.array("x-vfio-live-devices")
        XCTAssertEqual(devs.first?["transport"] as? String, "kernel VFIO", "\(devs)")
        XCTAssertEqual(devs.first?["name"] as? String, String(path.split(separator: "/").last!), "\(devs)")
        // mtty is a migration driver: its device state is reported, RUNNING.
        XCTAssertEqual(devs.first?["state"] as? String, "RUNNING", "\(devs)")
        XCTAssertTrue(p.isRunning, log)
        _ = try q.call("quit")
        XCTAssertEqual(p.wait(seconds: 20), 0, "quit ends the VMM within 20 s, with status 0: \(log)")
    }

    // MARK: refusals against the real kernel

    /// `device info` on an mtty mdev: the regions and IRQs the kernel reports, and its
    /// migration flags (STOP_COPY|P2P|PRE_COPY, as the lab README saw).
    func testDeviceInfoDescribesAnMttyMdev() throws {
        let path = try createMtty()
        let r = try runCLI(["device", "info", "--device", "vfio-pci,sysfsdev=\(path)"])
        XCTAssertEqual(r.status, 0, r.output)
        for s in ["kernel VFIO: ", "legacy type1 container, VFIO group", "0 BAR0: size 0x8", "7 CONFIG:", "INTx", "v2 (STOP_COPY|P2P|PRE_COPY)"] {
            XCTAssertTrue(r.output.contains(s), "should say '\(s)': \(r.output)")
        }
    }

    /// A PCI device another driver holds (the guest's virtio devices): the driver is named with
    /// the driver_override commands that hand it to vfio-pci. Nothing is rebound.
    func testADeviceBoundToAnotherDriverIsNamedWithTheCommandsToRebindIt() throws {
        guard ProcessInfo.processInfo.environment["VFIO_LIVE_LAB_DEVICE"] == "edu" else {
            throw XCTSkip("does not depend on the lab's PCI device: it runs in the edu boot only")
        }
        let all = (try? FileManager.default.contentsOfDirectory(atPath: "/sys/bus/pci/devices")) ?? []
        guard let (addr, driver) = all.sorted().lazy.compactMap({ a -> (String, String)? in
            guard let d = PCIDevice(address: a).driver, !KernelDeviceDiagnosis.isVFIODriver(d), PCIDevice(address: a).iommuGroup != nil else { return nil }
            return (a, d)
        }).first else { throw XCTSkip("no PCI device bound to a non-VFIO driver in this guest") }
        for backend in ["", ",iommufd=on"] where backend.isEmpty || access("/dev/iommu", F_OK) == 0 {
            let r = try runCLI(["vm", "run", "--memory", "16M", "--workload", "working-set=4M", "--duration", "1", "--device", "vfio-pci,host=\(addr)\(backend)"])
            XCTAssertEqual(r.status, 1, r.output)
            for s in ["\(addr) is bound to the \(driver) driver, not to vfio-pci", "echo vfio-pci > /sys/bus/pci/devices/\(addr)/driver_override",
                      "echo \(addr) > /sys/bus/pci/devices/\(addr)/driver/unbind", "echo \(addr) > /sys/bus/pci/drivers_probe"] {
                XCTAssertTrue(r.output.contains(s), "should say '\(s)': \(r.output)")
            }
        }
        XCTAssertEqual(PCIDevice(address: addr).driver, driver, "the device keeps its driver")
    }

    func runCLI(_ args: [String]) throws -> (status: Int32, output: String) {
        let out = logPath + ".cli"
        let p = try LabChild(Self.binary, args, log: out)
        let st = p.wait(seconds: 60)
        let text = (try? String(contentsOfFile: out, encoding: .utf8)) ?? ""
        unlink(out)
        return (st, text)
    }
}

/// A child vfio-live with stdout and stderr in a file. Foundation's Process is not used: in
/// the lab guest it cannot make its run loop's socket pair, and hangs.
final class LabChild {
    let pid: pid_t
    private(set) var status: Int32?

    init(_ path: String, _ args: [String], log: String) throws {
        var fa = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&fa)
        defer { posix_spawn_file_actions_destroy(&fa) }
        posix_spawn_file_actions_addopen(&fa, 1, log, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
        posix_spawn_file_actions_adddup2(&fa, 1, 2)
        let argv = ([path] + args).map { strdup($0) } + [nil]
        defer { for a in argv { free(a) } }
        var p: pid_t = 0
        let rc = posix_spawn(&p, path, &fa, nil, argv, environ)
        guard rc == 0 else { throw Errno(rc) }
        pid = p
    }

    var isRunning: Bool {
        if status == nil { status = ChildProcess.exitStatus(pid) }
        return status == nil
    }

    /// Its exit status, SIGKILLing it after `seconds` (then 128 + 9).
    @discardableResult
    func wait(seconds: Double) -> Int32 {
        let deadline = monotonicNanoseconds() + UInt64(seconds * 1e9)
        while isRunning && monotonicNanoseconds() < deadline { usleep(20_000) }
        if isRunning { kill(pid, SIGKILL); status = ChildProcess.wait(pid) }
        return status!
    }
}
