import Glibc
import XCTest
@testable import Devices
import SystemCalls
import VFIO
@testable import VFIOUser

/// Device migration between two real servers: both protocols, pre-copy under load, an
/// in-flight job, and every failure the issue names.
final class DeviceMigrationTests: XCTestCase {
    var a: RunningServer!, b: RunningServer!
    var ca: VFIOUserClient!, cb: VFIOUserClient!
    var ram: GuestRAM!
    let iova: UInt64 = 0x1_0000_0000
    var serverLog: [String] = []
    let logLock = Mutex()

    /// vfio-user carries only an errno back; the reason is in the server's log line.
    func logged(_ text: String) -> Bool { logLock.withLock { serverLog.contains { $0.contains(text) } } }

    override func setUpWithError() throws {
        Log.level = .warning
        Log.sink = { [self] line in logLock.withLock { serverLog.append(line) } }
        a = try RunningServer(stateSize: 1 << 20, name: "src")
        b = try RunningServer(stateSize: 1 << 20, name: "dst")
        ca = try VFIOUserClient(path: a.path)
        cb = try VFIOUserClient(path: b.path)
        ram = try GuestRAM(size: 8 << 20)
        try ca.mapDMA(iova: iova, size: ram.size, local: ram.map.base, fd: ram.fd)
        try cb.mapDMA(iova: iova, size: ram.size, local: ram.map.base, fd: ram.fd)
    }

    override func tearDown() {
        ca?.close(); cb?.close()
        a?.stop(); b?.stop()
        Log.sink = nil
        Log.level = .info
    }

    /// Give the source device a recognisable state: memory from a job, registers.
    func prepareSource() throws {
        ram.fill(offset: 0, count: 512 * 1024, seed: 99)
        try runJob(ca, source: iova, destination: DMAEngine.deviceMemoryBase, count: 512 * 1024, toRAM: false)
        try ca.write32(0, DMAEngine.Reg.liveness, 0xabcd)
        try ca.write32(0, DMAEngine.Reg.factorial, 7)
    }

    func transfer(_ proto: MigrationProtocol?, preCopy: Bool = true) throws -> DeviceStateTransfer {
        var o = DeviceStateTransfer.Options()
        o.preCopy = preCopy
        o.chunk = 256 * 1024
        return DeviceStateTransfer(source: try DeviceMigration(device: ca, prefer: proto),
                                   destination: try DeviceMigration(device: cb, prefer: proto), options: o)
    }

    func testV2PreCopyMovesEverythingAndPathsAreTheKernels() throws {
        try prepareSource()
        let digest = a.device.stateDigest()
        let t = try transfer(.v2)
        let r = try t.run()
        XCTAssertEqual(r.protocolUsed, .v2)
        XCTAssertEqual(r.sourcePath, [.running, .preCopy, .stopCopy, .stop])
        XCTAssertEqual(r.destinationPath, [.running, .stop, .resuming, .stop, .running])
        XCTAssertGreaterThan(r.preCopyBytes, 1 << 20, "pre-copy sends the initial bytes")
        XCTAssertLessThan(r.stopCopyBytes, 64 * 1024, "stop-copy sends only registers and what changed")
        XCTAssertEqual(try cb.migrationState(), .running)
        XCTAssertEqual(try ca.migrationState(), .stop)
        // Same memory and registers (the source is stopped, the destination idle).
        XCTAssertEqual(b.device.stateDigest(), digest)
        XCTAssertEqual(try cb.read32(0, DMAEngine.Reg.liveness), ~UInt32(0xabcd))
    }

    func testV1RegionProtocolMovesTheSameState() throws {
        try prepareSource()
        let digest = a.device.stateDigest()
        let t = try transfer(.v1)
        let r = try t.run()
        XCTAssertEqual(r.protocolUsed, .v1)
        XCTAssertEqual(r.sourcePath, [.running, .preCopy, .stopCopy, .stop])
        XCTAssertEqual(b.device.stateDigest(), digest)
        XCTAssertEqual(try DeviceMigration(device: cb).proto, .v2, "v2 is preferred when both are offered")
    }

    func testPreCopyWhileJobsRunSendsDirtyChunksAgain() throws {
        try prepareSource()
        let t = try transfer(.v2)
        var rounds: [UInt64] = []
        // Dirty device memory between rounds with a job (the device keeps running in PRE_COPY).
        t.afterPreCopyRound = { [self] round, n in
            rounds.append(n)
            if round == 1 {
                self.ram.fill(offset: 0x10_0000, count: 128 * 1024, seed: 5)
                try? runJob(ca, source: iova + 0x10_0000, destination: DMAEngine.deviceMemoryBase + 0x8_0000, count: 128 * 1024, toRAM: false)
            }
        }
        let r = try t.run()
        XCTAssertGreaterThanOrEqual(r.preCopyRounds, 2)
        XCTAssertGreaterThanOrEqual(rounds[1], 128 * 1024, "round 2 resends the chunks the job dirtied")
        XCTAssertEqual(Array(UnsafeRawBufferPointer(start: b.device.memory.base + 0x8_0000, count: 128 * 1024)),
                       ram.bytes(offset: 0x10_0000, count: 128 * 1024))
    }

    func testInFlightJobCompletesOnTheDestination() throws {
        ram.fill(offset: 0, count: 768 * 1024, seed: 1)
        let t = try transfer(.v2, preCopy: true)
        let msiB = try EventFD()
        try cb.setIRQs(index: 1, eventfds: [msiB])
        t.beforeStopCopy = { [self] in
            // Start a 768 KiB job (12 steps of 64 KiB, throttled to 20 ms a step) right before
            // the stop: it is interrupted, whatever the machine's speed.
            try ca.write32(7, 0x40, 0x0081_0005)
            try ca.write64(0, DMAEngine.Reg.dmaStepDelay, 20_000)
            try ca.write64(0, DMAEngine.Reg.dmaSource, iova)
            try ca.write64(0, DMAEngine.Reg.dmaDestination, DMAEngine.deviceMemoryBase)
            try ca.write64(0, DMAEngine.Reg.dmaCount, 768 * 1024)
            try ca.write64(0, DMAEngine.Reg.dmaCommand, DMAEngine.dmaCommandStart | DMAEngine.dmaCommandIRQ)
        }
        _ = try t.run()
        let progressAtStop = try ca.read64(0, DMAEngine.Reg.jobProgress)
        XCTAssertLessThan(progressAtStop, 768 * 1024, "the job was still in flight when the source stopped")
        XCTAssertGreaterThan(try msiB.wait(timeoutMilliseconds: 10_000), 0, "completion interrupt on the destination")
        XCTAssertEqual(try cb.read64(0, DMAEngine.Reg.jobsCompleted), 1)
        XCTAssertEqual(try cb.read64(0, DMAEngine.Reg.lastJobStatus), 0)
        XCTAssertEqual(try cb.read64(0, DMAEngine.Reg.lastJobChecksum),
                       ram.map.buffer.withUnsafeBytes { DMAEngine.jobChecksum(of: UnsafeRawBufferPointer(rebasing: $0[0..<768 * 1024])) })
        XCTAssertEqual(Array(UnsafeRawBufferPointer(start: b.device.memory.base, count: 768 * 1024)), ram.bytes(offset: 0, count: 768 * 1024))
    }

    func testIllegalTransitionIsRefusedAndStateUnchanged() throws {
        // STOP_COPY → PRE_COPY: refused locally by the FSM, and by the server if sent raw.
        let m = try DeviceMigration(device: ca)
        try m.transition(to: .stopCopy)
        XCTAssertThrowsError(try m.transition(to: .preCopy)) { XCTAssertTrue("\($0)".contains("no path"), "\($0)") }
        var w = WireWriter(); w.u32(MigrationState.preCopy.rawValue); w.i32(-1)
        XCTAssertThrowsError(try ca.feature(DeviceFeature.migDeviceState, flags: DeviceFeature.set, data: w.bytes)) {
            XCTAssertEqual(($0 as? VFIOUserClientError)?.errno, .EINVAL)
        }
        XCTAssertEqual(try ca.migrationState(), .stopCopy)
        // P2P states are not supported by dma-engine.
        try m.transition(to: .running)
        XCTAssertThrowsError(try ca.setMigrationState(.runningP2P))
        XCTAssertEqual(try ca.migrationState(), .running)
        // MIG_DATA_READ outside a saving state, MIG_DATA_WRITE outside RESUMING.
        XCTAssertThrowsError(try ca.readMigrationData(max: 4096))
        XCTAssertThrowsError(try [UInt8](repeating: 0, count: 16).withUnsafeBytes { try ca.writeMigrationData($0) })
        // BAR writes are refused while the device is in STOP_COPY (config space stays writable).
        try m.transition(to: .stopCopy)
        XCTAssertThrowsError(try ca.write32(0, DMAEngine.Reg.liveness, 1))
        XCTAssertNoThrow(try ca.write32(7, 0x3c, 11))
        try m.transition(to: .running)
    }

    func assertSourceIntact(_ digest: UInt64, file: StaticString = #filePath, line: UInt = #line) throws {
        XCTAssertEqual(try ca.migrationState(), .running, "source back in RUNNING", file: file, line: line)
        XCTAssertEqual(a.device.stateDigest(), digest, "source state intact", file: file, line: line)
        // And it works: a job runs.
        try runJob(ca, source: iova, destination: DMAEngine.deviceMemoryBase + 0x4_0000, count: 4096, toRAM: false, file: file, line: line)
        XCTAssertEqual(try ca.read64(0, DMAEngine.Reg.lastJobStatus), 0, file: file, line: line)
    }

    func testCorruptedStateIsRejectedAndTheSourceRunsOn() throws {
        try prepareSource()
        let digest = a.device.stateDigest()
        let destDigest = b.device.stateDigest()
        a.device.stateChecksums = true  // declared in the stream: the destination checks each chunk
        let t = try transfer(.v2)
        // Flip one byte in the middle of the second write: the destination's record checksum fails.
        t.beforeDestinationWrite = { [self] n in
            if n == 1 { b.device.corruptNextWriteForTesting = true }
        }
        XCTAssertThrowsError(try t.run()) { e in
            let s = "\(e)"
            XCTAssertTrue(s.contains("MIG_DATA_WRITE") && s.contains("back in RUNNING"), s)
        }
        XCTAssertTrue(logged("is corrupt: checksum"), "the destination says why: \(serverLog)")
        try assertSourceIntact(digest)
        XCTAssertEqual(try cb.migrationState(), .running, "destination reset out of RESUMING")
        XCTAssertEqual(b.device.stateDigest(), destDigest, "nothing was applied to the destination")
    }

    func testTruncatedStateIsRejectedAtResumingToStop() throws {
        try prepareSource()
        let digest = a.device.stateDigest()
        let destDigest = b.device.stateDigest()
        let src = try DeviceMigration(device: ca), dst = try DeviceMigration(device: cb)
        try dst.transition(to: .resuming)
        try src.transition(to: .stopCopy)
        // Deliver all but the last 100 bytes of the stream.
        var all: [UInt8] = []
        while true { let d = try src.read(max: 1 << 20); if d.isEmpty { break }; all += d; if d.count < 1 << 20 { break } }
        try all.dropLast(100).withUnsafeBytes { try dst.write(UnsafeRawBufferPointer($0)) }
        XCTAssertThrowsError(try dst.transition(to: .stop)) { XCTAssertTrue("\($0)".contains("RESUMING→STOP"), "\($0)") }
        XCTAssertTrue(logged("state is incomplete"), "\(serverLog)")
        XCTAssertEqual(try cb.migrationState(), .resuming)
        try dst.reset()
        XCTAssertEqual(b.device.stateDigest(), destDigest)
        try src.transition(to: .running)
        try assertSourceIntact(digest)
    }

    func testWrongSizedDestinationIsRefusedWithAClearReason() throws {
        let big = try RunningServer(stateSize: 2 << 20, name: "big")
        defer { big.stop() }
        let cbig = try VFIOUserClient(path: big.path)
        defer { cbig.close() }
        let digest = a.device.stateDigest()
        let t = DeviceStateTransfer(source: try DeviceMigration(device: ca), destination: try DeviceMigration(device: cbig))
        XCTAssertThrowsError(try t.run()) { XCTAssertTrue("\($0)".contains("back in RUNNING"), "\($0)") }
        XCTAssertTrue(logged("start it with --state-size 1048576"), "\(serverLog)")
        try assertSourceIntact(digest)
    }

    func testDestinationDyingMidTransferLeavesTheSourceRunning() throws {
        try prepareSource()
        let digest = a.device.stateDigest()
        let t = try transfer(.v2)
        t.beforeDestinationWrite = { [self] n in if n == 2 { b.stop() } }
        XCTAssertThrowsError(try t.run()) { XCTAssertTrue("\($0)".contains("back in RUNNING"), "\($0)") }
        try assertSourceIntact(digest)
    }
}
