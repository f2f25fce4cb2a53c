import Glibc
import Machine
@testable import Migration
import SystemCalls
import VFIO
import XCTest

/// A kernel-like VFIO device for error paths no real device can be made to take: PCI config
/// space only, migration v2 with STOP_COPY | P2P | PRE_COPY walked arc by arc as a kernel
/// driver does (vfio_mig_get_next_state), PRECOPY_INFO, and an arc it can be told to refuse.
/// A refused arc leaves the device in the state it had reached, as a kernel driver's does.
/// Every arc goes to one shared log, so the order across devices can be checked.
final class FakeP2PDevice: VFIODevice, @unchecked Sendable {
    final class ArcLog: @unchecked Sendable {
        private let lock = Mutex()
        private var arcs: [(device: Int, from: MigrationState, to: MigrationState)] = []
        func add(_ d: Int, _ f: MigrationState, _ t: MigrationState) { lock.withLock { arcs.append((d, f, t)) } }
        var all: [(device: Int, from: MigrationState, to: MigrationState)] { lock.withLock { arcs } }
    }
    final class Tracker: VFIOIOMMUDirtyTracker {
        var starts = 0, stops = 0, harvests = 0
        func startDirtyTracking() throws { starts += 1 }
        func stopDirtyTracking() throws { stops += 1 }
        func dirtyBitmap(iova: UInt64, size: UInt64, pageSize: UInt64) throws -> [UInt64] {
            harvests += 1
            return [UInt64](repeating: 0, count: Int((size / pageSize + 63) / 64))
        }
    }

    let index: Int
    let log: ArcLog
    let tracker: Tracker
    private let lock = Mutex()
    private var state = MigrationState.running
    private var config = [UInt8](repeating: 0, count: 256)
    /// The migration flags it reports (a device without P2P: [.stopCopy, .preCopy]).
    var caps: MigrationCapabilities = [.stopCopy, .p2p, .preCopy]
    /// Refuse this arc (once).
    var refuse: (MigrationState, MigrationState)?
    /// The device's state image: 16 bytes of pre-copy, then 32 more at stop-copy.
    private let image: [UInt8]
    private var readAt = 0
    private(set) var loaded: [UInt8] = []

    init(index: Int, log: ArcLog, tracker: Tracker) {
        self.index = index; self.log = log; self.tracker = tracker
        image = (0..<48).map { UInt8(truncatingIfNeeded: $0 &* 13 &+ index) }
        config[0] = 0xf4; config[1] = 0x1a; config[2] = 0x99; config[3] = 0x10  // 1af4:1099
    }

    var currentState: MigrationState { lock.withLock { state } }

    var transportName: String { "kernel VFIO (fake)" }
    var deviceName: String { "fake-p2p-\(index)" }
    func describeDevice() throws -> VFIODeviceInfo { VFIODeviceInfo(flags: VFIODeviceInfo.flagPCI | VFIODeviceInfo.flagReset, regionCount: 9, irqCount: 5) }
    func describeRegion(_ i: UInt32) throws -> VFIORegionInfo {
        VFIORegionInfo(index: i, readable: true, writable: true, mappable: false, size: i == VFIOPCIIndex.config ? 256 : 0)
    }
    func describeIRQ(_ i: UInt32) throws -> VFIOIRQInfo { VFIOIRQInfo(index: i, count: 0) }
    func regionRead(_ i: UInt32, offset: UInt64, into b: UnsafeMutableRawBufferPointer) throws {
        guard i == VFIOPCIIndex.config, offset + UInt64(b.count) <= 256 else { throw Errno.EINVAL }
        lock.withLock { for k in 0..<b.count { b[k] = config[Int(offset) + k] } }
    }
    func regionWrite(_ i: UInt32, offset: UInt64, from d: UnsafeRawBufferPointer) throws {
        guard i == VFIOPCIIndex.config, offset + UInt64(d.count) <= 256 else { throw Errno.EINVAL }
        lock.withLock { for k in 0..<d.count where offset + UInt64(k) >= 4 { config[Int(offset) + k] = d[k] } }
    }
    func regionRead(_ i: UInt32, offset: UInt64, count: Int) throws -> [UInt8] {
        var b = [UInt8](repeating: 0, count: count)
        try b.withUnsafeMutableBytes { try regionRead(i, offset: offset, into: $0) }
        return b
    }
    func regionWrite(_ i: UInt32, offset: UInt64, _ data: [UInt8]) throws { try data.withUnsafeBytes { try regionWrite(i, offset: offset, from: $0) } }
    func mapRegionAreas(_ i: UInt32) throws -> VFIORegionMapping? { nil }
    func setIRQs(index: UInt32, start: UInt32, eventfds: [EventFD]) throws {}
    func disableIRQs(index: UInt32) throws {}
    func unmaskIRQ(index: UInt32, vector: UInt32) throws {}
    func addDMAMapping(_ region: VFIODMARegion) throws {}
    func removeDMAMapping(iova: UInt64, size: UInt64) throws {}
    var supportsDMALogging: Bool { false }
    func startDMALogging(pageSize: UInt64, ranges: [(iova: UInt64, length: UInt64)]) throws { throw Errno.ENOTTY }
    func stopDMALogging() throws { throw Errno.ENOTTY }
    func dmaLoggingReport(iova: UInt64, length: UInt64, pageSize: UInt64) throws -> [UInt64] { throw Errno.ENOTTY }
    /// Both devices behind one "container": one tracker, to be started and stopped once.
    var iommuDirtyTracker: VFIOIOMMUDirtyTracker? { tracker }

    func findRegion(type: UInt32, subtype: UInt32) throws -> (index: UInt32, size: UInt64)? { nil }
    func migrationCapabilities() throws -> MigrationCapabilities? { caps }
    func migrationState() throws -> MigrationState { currentState }
    func setMigrationState(_ target: MigrationState) throws {
        try lock.withLock {
            let path = try MigrationFSM.path(from: state, to: target, capabilities: caps)
            for (a, b) in zip(path, path.dropFirst()) {
                if let r = refuse, r.0 == a, r.1 == b {
                    refuse = nil
                    throw Errno.EIO
                }
                log.add(index, a, b)
                state = b
                switch (a, b) {
                case (.running, .preCopy), (.runningP2P, .preCopyP2P), (.stop, .stopCopy): readAt = 0
                case (_, .resuming): loaded = []
                default: break
                }
            }
        }
    }
    func readMigrationData(max: Int) throws -> [UInt8] {
        lock.withLock {
            let end: Int
            switch state {
            case .preCopy, .preCopyP2P: end = 16
            case .stopCopy: end = image.count
            default: return []
            }
            guard readAt < end else { return [] }
            let n = min(max, end - readAt)
            defer { readAt += n }
            return Array(image[readAt..<readAt + n])
        }
    }
    func writeMigrationData(_ data: UnsafeRawBufferPointer) throws {
        try lock.withLock {
            guard state == .resuming else { throw Errno.EINVAL }
            loaded += data
        }
    }
    func migrationDataSize() throws -> UInt64 { UInt64(image.count) }
    func preCopyInfo() throws -> (initialBytes: UInt64, dirtyBytes: UInt64)? {
        lock.withLock { state == .preCopy || state == .preCopyP2P ? (UInt64(Swift.max(16 - readAt, 0)), 0) : nil }
    }
    func resetDevice() throws { lock.withLock { state = .running; readAt = 0 } }
}

/// QEMU's P2P order with more than one device (hw/vfio/migration.c: the VM-stop prepare handler
/// takes every P2P device to PRE_COPY_P2P / RUNNING_P2P before any main handler goes to
/// STOP_COPY; at the destination RUNNING_P2P for all before RUNNING), and the rule that on any
/// failure every device returns to RUNNING and the source VM runs on. Host test: fake devices.
final class P2PSwitchoverTests: XCTestCase {
    var log = FakeP2PDevice.ArcLog()
    var srcTracker = FakeP2PDevice.Tracker(), dstTracker = FakeP2PDevice.Tracker()
    var srcDevices: [FakeP2PDevice] = [], dstDevices: [FakeP2PDevice] = []
    var src: MicroVM!, dst: MicroVM!
    var listener: TCPListener!

    override func setUpWithError() throws {
        Log.level = .error
        srcDevices = (0..<2).map { FakeP2PDevice(index: $0, log: log, tracker: srcTracker) }
        dstDevices = (0..<2).map { FakeP2PDevice(index: 10 + $0, log: log, tracker: dstTracker) }
        var w = WorkloadConfig()
        w.workingSet = 4 << 20
        w.dirtyRate = 20_000
        w.dmaEvery = 0
        src = try MicroVM(memorySize: 16 << 20, workload: w, devices: srcDevices)
        dst = try MicroVM(memorySize: 16 << 20, workload: w, devices: dstDevices)
        listener = try TCPListener(host: "127.0.0.1", port: 0)
        try src.start(); src.resume()
        try dst.start()
        usleep(100_000)
    }

    override func tearDown() {
        src?.stop(); dst?.stop(); listener?.close()
        Log.level = .info
    }

    func migrate() throws -> (MigrationSource, () -> (MigrationDestination?, Error?)) {
        var result: (MigrationDestination?, Error?) = (nil, nil)
        let t = try OSThread(name: "destination") { [self] in
            do {
                guard let s = try listener.accept(timeoutMilliseconds: 20_000) else { throw MigrationError.channel("no connection") }
                let d = try MigrationDestination(vm: dst, from: s)
                d.verifyBeforeResume = true
                result.0 = d
                try d.run()
            } catch { result.1 = error }
        }
        let m = try MigrationSource(vm: src, to: TCPSocket.connect(host: "127.0.0.1", port: listener.port),
                                    parameters: MigrationParameters(), policies: [.auto, .auto])
        return (m, { t.join(); return result })
    }

    func arcs(_ devices: Range<Int>) -> [(device: Int, from: MigrationState, to: MigrationState)] {
        log.all.filter { devices.contains($0.device) }
    }
    func position(_ devices: Range<Int>, _ to: MigrationState) -> [Int] {
        log.all.enumerated().filter { devices.contains($0.element.device) && $0.element.to == to }.map(\.offset)
    }

    func testTwoP2PDevicesMigrateInQEMUsOrder() throws {
        let (m, wait) = try migrate()
        try m.run()
        let (d, e) = wait()
        XCTAssertNil(e)
        XCTAssertEqual(m.stats.status, .completed)
        // Source: both in PRE_COPY_P2P before either in STOP_COPY.
        let p2p = position(0..<2, .preCopyP2P), stopCopy = position(0..<2, .stopCopy)
        XCTAssertEqual(p2p.count, 2); XCTAssertEqual(stopCopy.count, 2)
        XCTAssertLessThan(p2p.max()!, stopCopy.min()!, "\(arcs(0..<2))")
        // Destination, after the load: both RUNNING_P2P before either RUNNING.
        let rp = position(10..<12, .runningP2P), run = position(10..<12, .running)
        XCTAssertLessThan(rp.max()!, run.min()!, "\(arcs(10..<12))")
        for (i, dev) in dstDevices.enumerated() {
            XCTAssertEqual(dev.currentState, .running)
            XCTAssertEqual(dev.loaded, srcDevices[i].loadedImageForTest, "device \(i)'s whole image arrived")
        }
        XCTAssertEqual(d?.deviceBytes, [48, 48])
        // One shared IOMMU tracker: started once, stopped once, harvested each iteration.
        XCTAssertEqual(srcTracker.starts, 1); XCTAssertEqual(srcTracker.stops, 1)
        XCTAssertGreaterThan(srcTracker.harvests, 0)
        XCTAssertTrue(dst.verify().ok)
    }

    /// QEMU's blocker (vfio_multiple_devices_migration_is_supported): with more than one VFIO
    /// device, all must have P2P. Nothing is touched: every device stays RUNNING.
    func testTwoDevicesOneWithoutP2PAreBlockedWithQEMUsReason() throws {
        srcDevices[1].caps = [.stopCopy, .preCopy]
        XCTAssertThrowsError(try MigrationSource.checkBlockers(vm: src, parameters: MigrationParameters(), policies: [.auto, .auto])) { e in
            XCTAssertTrue("\(e)".contains("Multiple VFIO devices migration is supported only if all of them support P2P migration"), "\(e)")
            XCTAssertTrue("\(e)".contains("device 1"), "\(e)")
        }
        XCTAssertTrue(log.all.isEmpty, "no device was moved: \(log.all)")
        XCTAssertEqual(srcTracker.starts, 0)
    }

    /// The second device refuses PRE_COPY→PRE_COPY_P2P after the first is already P2P-quiesced.
    func testADeviceRefusingP2PMidSwitchoverLeavesEveryDeviceRunningAndTheSourceRunning() throws {
        srcDevices[1].refuse = (.preCopy, .preCopyP2P)
        try assertRolledBack(reason: "PRE_COPY_P2P")
        // Device 0 came back from PRE_COPY_P2P through RUNNING_P2P, as a VM start does.
        XCTAssertTrue(arcs(0..<1).contains { $0.from == .preCopyP2P && $0.to == .runningP2P }, "\(arcs(0..<1))")
    }

    /// The second device refuses PRE_COPY_P2P→STOP_COPY: both were P2P-quiesced, the first
    /// may already be in STOP_COPY.
    func testADeviceRefusingStopCopyAfterP2PLeavesEveryDeviceRunningAndTheSourceRunning() throws {
        srcDevices[1].refuse = (.preCopyP2P, .stopCopy)
        try assertRolledBack(reason: "STOP_COPY")
        XCTAssertTrue(arcs(0..<1).contains { $0.from == .stopCopy && $0.to == .stop }, "device 0 had reached STOP_COPY: \(arcs(0..<1))")
        // Back to RUNNING in QEMU's start order: both RUNNING_P2P before either RUNNING.
        let tail = log.all.drop { !($0.from == .stopCopy && $0.to == .stop) }
        let rp = tail.enumerated().filter { $0.element.to == .runningP2P }.map(\.offset)
        let run = tail.enumerated().filter { $0.element.to == .running }.map(\.offset)
        XCTAssertEqual(rp.count, 2, "\(Array(tail))"); XCTAssertEqual(run.count, 2)
        XCTAssertLessThan(rp.max() ?? .max, run.min() ?? 0, "\(Array(tail))")
    }

    func assertRolledBack(reason: String, file: StaticString = #filePath, line: UInt = #line) throws {
        let (m, wait) = try migrate()
        XCTAssertThrowsError(try m.run(), file: file, line: line) { e in
            XCTAssertTrue("\(e)".contains(reason), "\(e)", file: file, line: line)
        }
        _ = wait()
        XCTAssertEqual(m.stats.status, .failed, file: file, line: line)
        for (i, d) in srcDevices.enumerated() { XCTAssertEqual(d.currentState, .running, "source device \(i) back in RUNNING", file: file, line: line) }
        XCTAssertFalse(src.isPaused, "the source VM runs on", file: file, line: line)
        XCTAssertFalse(src.dirtyLogging, file: file, line: line)
        XCTAssertEqual(srcTracker.starts, 1, file: file, line: line); XCTAssertEqual(srcTracker.stops, 1, "the IOMMU tracker stopped", file: file, line: line)
        let p = src.pagesWritten
        let deadline = monotonicNanoseconds() + 5_000_000_000
        while src.pagesWritten <= p && monotonicNanoseconds() < deadline { usleep(10_000) }
        XCTAssertGreaterThan(src.pagesWritten, p, "the guest still writes", file: file, line: line)
        src.pause()
        let r = src.verify()
        XCTAssertTrue(r.ok, r.description, file: file, line: line)
    }
}

extension FakeP2PDevice {
    /// What a destination must have loaded from this device: its whole image.
    var loadedImageForTest: [UInt8] { image }
}
