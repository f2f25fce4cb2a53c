import Devices
import Glibc
import Machine
import SystemCalls
import VFIO
import VFIOUser
import XCTest

/// The micro-VM on real KVM (skipped, with the reason, where /dev/kvm is missing), and the same
/// workload on software vCPUs (always).
final class MicroVMTests: XCTestCase {
    func requireKVM() throws {
        if let why = KVMSystem.unavailableReason { throw XCTSkip("needs KVM: \(why)") }
    }

    func makeVM(software: Bool, memory: UInt64 = 64 << 20, vcpus: Int = 1, workingSet: UInt64 = 8 << 20,
                devices: [VFIOUserClient] = [], dmaEvery: UInt64 = 0, rate: UInt64 = 0) throws -> MicroVM {
        if !software { try requireKVM() }
        var w = WorkloadConfig()
        w.workingSet = workingSet
        w.dmaEvery = dmaEvery
        w.dirtyRate = rate
        return try MicroVM(memorySize: memory, vcpus: vcpus, workload: w, devices: devices, forceSoftware: software)
    }

    func runFor(_ vm: MicroVM, seconds: Double) {
        vm.resume()
        usleep(UInt32(seconds * 1e6))
        vm.pause()
    }

    /// Run a started VM for 0.3 s: no failure, the workload's progress, every page verified.
    @discardableResult
    func assertRunsAndVerifies(_ vm: MicroVM, _ what: String = "", file: StaticString = #filePath, line: UInt = #line) -> VerifierReport {
        runFor(vm, seconds: 0.3)
        XCTAssertNil(vm.failure, file: file, line: line)
        XCTAssertGreaterThan(vm.pagesWritten, 2048, "the workload made progress \(what)(\(vm.executionMode))", file: file, line: line)
        let r = vm.verify()
        XCTAssertTrue(r.ok, r.description, file: file, line: line)
        return r
    }

    func checkWorkloadRunsAndVerifies(software: Bool) throws {
        let vm = try makeVM(software: software, vcpus: 2)
        defer { vm.stop() }
        try vm.start()
        let r = assertRunsAndVerifies(vm)
        XCTAssertEqual(r.pagesChecked, 2048)
        // Corrupt one page: the verifier names it precisely.
        let victim = GuestLayout.workingSetBase + 5 * 4096 + 2048
        vm.memory.store64(victim, vm.memory.load64(victim) ^ 1)
        let bad = vm.verify()
        XCTAssertFalse(bad.ok)
        XCTAssertTrue(bad.violations.first?.contains("page 5 at GPA 0x105000") == true, bad.description)
        XCTAssertTrue(bad.violations.first?.contains("word +2048") == true, bad.description)
    }

    func testWorkloadRunsOnKVMAndVerifies() throws { try checkWorkloadRunsAndVerifies(software: false) }
    func testWorkloadRunsOnSoftwareVCPUsAndVerifies() throws { try checkWorkloadRunsAndVerifies(software: true) }

    /// Every page the guest wrote between two harvests is reported (no false negatives).
    func checkDirtyLogHasNoFalseNegatives(software: Bool) throws {
        let vm = try makeVM(software: software, workingSet: 16 << 20, rate: 20_000)
        defer { vm.stop() }
        try vm.start()
        try vm.setDirtyLogging(true)
        runFor(vm, seconds: 0.05)
        _ = try vm.harvestDirtyPages()
        let p0 = vm.pagesWritten
        runFor(vm, seconds: 0.2)
        let p1 = vm.pagesWritten
        let bits = try vm.harvestDirtyPages()
        XCTAssertGreaterThan(p1, p0)
        let n = (16 << 20) / UInt64(4096)
        var missing: [UInt64] = []
        for w in p0..<p1 {
            let page = (GuestLayout.workingSetBase >> 12) + (w % n)
            if bits[Int(page / 64)] & (1 << (page % 64)) == 0 { missing.append(page) }
        }
        XCTAssertEqual(missing, [], "pages written but not reported dirty (\(vm.executionMode))")
        let cbPage = GuestLayout.controlBlock(0) >> 12
        XCTAssertNotEqual(bits[Int(cbPage / 64)] & (1 << (cbPage % 64)), 0, "the control block page is dirty too")
        // Harvest clears: with the vCPUs paused, a second harvest is empty.
        XCTAssertEqual(try vm.harvestDirtyPages().setBitCount, 0)
    }

    func testKVMDirtyLogHasNoFalseNegatives() throws { try checkDirtyLogHasNoFalseNegatives(software: false) }
    func testSoftwareDirtyLogHasNoFalseNegatives() throws { try checkDirtyLogHasNoFalseNegatives(software: true) }

    /// The guest drives the dma-engine by MMIO; data lands in guest RAM; MSIs are counted.
    func checkDeviceDMA(software: Bool) throws {
        Log.level = .warning
        defer { Log.level = .info }
        let server = try InProcessServer(path: InProcessServer.temporaryPath("vm-dma"), stateSize: 1 << 20)
        defer { server.stop() }
        let client = try VFIOUserClient(path: server.path)
        defer { client.close() }
        let vm = try makeVM(software: software, devices: [client], dmaEvery: 2)
        defer { vm.stop() }
        try vm.start()
        runFor(vm, seconds: 0.4)
        XCTAssertNil(vm.failure)
        let r = vm.verify()
        XCTAssertTrue(r.ok, r.description)
        XCTAssertGreaterThan(r.dmaRoundsOK, 0, "the guest completed DMA round trips (\(vm.executionMode))")
        XCTAssertEqual(r.dmaErrors, 0)
        // Two device jobs per round trip, plus at most one of a round still in progress.
        let jobs = try client.read64(0, DMAEngine.Reg.jobsCompleted)
        XCTAssertTrue(jobs >= 2 * r.dmaRoundsOK && jobs <= 2 * r.dmaRoundsOK + 2, "\(jobs) device jobs for \(r.dmaRoundsOK) rounds")
        usleep(20_000)
        XCTAssertGreaterThan(vm.interruptsCounted[0], 0, "MSI signals counted")
    }

    func testGuestDrivesDMAOnKVM() throws { try checkDeviceDMA(software: false) }
    func testSoftwareVCPUDrivesDMA() throws { try checkDeviceDMA(software: true) }

    /// Pause, save everything, run on, restore the saved state: the guest continues from it and
    /// every invariant holds.
    func checkSaveRestore(software: Bool) throws {
        let vm = try makeVM(software: software)
        defer { vm.stop() }
        try vm.start()
        vm.resume()
        usleep(100_000)
        let latency = vm.pause()
        XCTAssertTrue(vm.isPaused)
        XCTAssertLessThan(latency, 5_000_000_000)
        let saved = try vm.saveVCPUs()
        let snapshot = Array(UnsafeRawBufferPointer(start: vm.memory.base, count: Int(vm.memory.size)))
        let pSaved = vm.pagesWritten
        runFor(vm, seconds: 0.1)
        XCTAssertGreaterThan(vm.pagesWritten, pSaved)
        snapshot.withUnsafeBytes { _ = memcpy(vm.memory.base, $0.baseAddress!, $0.count) }
        try vm.restoreVCPUs(saved)
        XCTAssertEqual(vm.pagesWritten, pSaved)
        XCTAssertTrue(vm.verify().ok)
        runFor(vm, seconds: 0.1)
        XCTAssertGreaterThan(vm.pagesWritten, pSaved, "the restored vCPU continues")
        let r = vm.verify()
        XCTAssertTrue(r.ok, r.description)
    }

    func testPauseSaveRestoreOnKVM() throws { try checkSaveRestore(software: false) }
    func testPauseSaveRestoreOnSoftwareVCPUs() throws { try checkSaveRestore(software: true) }

    /// Pauses nest: a verifier's resume does not restart a VM someone else stopped.
    func testPausesAreCounted() throws {
        let vm = try makeVM(software: true)
        defer { vm.stop() }
        try vm.start()
        vm.resume()
        vm.pause()                      // e.g. a migration's stop-copy
        XCTAssertTrue(vm.verify().ok)   // pauses and resumes on its own
        let p = vm.pagesWritten
        usleep(50_000)
        XCTAssertEqual(vm.pagesWritten, p, "still paused after the verifier's resume")
        XCTAssertTrue(vm.isPaused)
        vm.resume()
        usleep(50_000)
        XCTAssertGreaterThan(vm.pagesWritten, p, "runs once the last pause is released")
    }

    func testBadConfigurationsAreExplained() {
        var w = WorkloadConfig(); w.workingSet = 1 << 30
        XCTAssertThrowsError(try MicroVM(memorySize: 64 << 20, workload: w, forceSoftware: true)) { XCTAssertTrue("\($0)".contains("does not fit"), "\($0)") }
        XCTAssertThrowsError(try MicroVM(memorySize: 3 << 20, workload: WorkloadConfig(), forceSoftware: true))
        XCTAssertThrowsError(try WorkloadConfig(parsing: "dirty-rate=fast", parseSize: { _ in 0 }))
        XCTAssertThrowsError(try WorkloadConfig(parsing: "colour=blue", parseSize: { _ in 0 }))
    }
}
