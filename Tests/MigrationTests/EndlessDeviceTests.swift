@testable import Devices
import Glibc
import Machine
@testable import Migration
import SystemCalls
import VFIO
@testable import VFIOUser
import XCTest

/// A vfio-user relay in front of a real dma-engine server whose MIG_DATA_READ replies, once the
/// device was set to STOP_COPY (or from the start with `endlessFromStart`), are answered by the
/// relay itself: always full, never the short read that ends the data. The bytes are a valid
/// dma-engine stream (a header record if asked, then chunk records at offset 0 forever), so a
/// destination accepts them and only a bound on the source's side can end the stop-copy.
final class EndlessRelay: @unchecked Sendable {
    var path: String { plumbing.path }
    private let lock = Mutex(), sendLock = Mutex()
    private var plumbing: RelayPlumbing!
    private var endless: Bool
    private var readsAnsweredStorage = 0
    var readsAnswered: Int { lock.withLock { readsAnsweredStorage } }
    private var stream: [UInt8]
    private var pos = 0, loopFrom = 0

    init(to serverPath: String, tag: String, memorySize: UInt64, endlessFromStart: Bool = false) throws {
        endless = endlessFromStart
        var header = WireWriter(); header.u64(memorySize); header.u32(UInt32(DMAEngine.chunkSize)); header.u32(0)
        let head = endlessFromStart ? DMAEngineStateFormat.record(.header, header.bytes) : []
        var off = WireWriter(); off.u64(0)
        let data = [UInt8](repeating: 0, count: DMAEngine.chunkSize)
        var chunk = [UInt8](repeating: 0, count: DMAEngineStateFormat.headerSize) + off.bytes + data
        // Format 3: the header (ours, or the real source's by default) declares no chunk
        // checksums, so a chunk carries checksum 0.
        chunk.withUnsafeMutableBytes { DMAEngineStateFormat.writeHeader(.chunk, length: 8 + data.count, checksum: 0, into: $0.baseAddress!) }
        stream = head + chunk
        loopFrom = head.count
        plumbing = try RelayPlumbing(to: serverPath, tag: tag, name: "endless") { [self] c, s in
            let cc = VFIOUserConnection(socket: c, maxReceiveFDs: 8, maxMessageSize: 80 << 20)
            let cs = VFIOUserConnection(socket: s, maxReceiveFDs: 8, maxMessageSize: 80 << 20)
            let toServer = try OSThread(name: "endless-c2s") { [self] in
                while let m = try? cc.receive() {
                    if lock.withLock({ endless }), m.header.isCommand, m.header.command == VFIOUserCommand.migDataRead.rawValue {
                        m.closeFDs()
                        var r = WireReader(m.payload[...], context: "test")
                        _ = try? r.u32()
                        let size = Int((try? r.u32()) ?? 0)
                        var w = WireWriter(); w.u32(UInt32(8 + size)); w.u32(UInt32(size))
                        let reply = w.bytes + next(size)
                        sendLock.withLock { try? cc.sendReply(to: m.header, payload: reply) }
                        lock.withLock { readsAnsweredStorage += 1 }
                        continue
                    }
                    let goesEndless = Self.setsStopCopy(m)
                    try? cs.send(id: m.header.messageID, command: m.header.command, flags: m.header.flags, errorNumber: m.header.errorNumber,
                                 payload: m.payload, fds: m.fds.map(\.rawValue))
                    m.closeFDs()
                    if goesEndless { lock.withLock { endless = true } }
                }
                _ = shutdown(s.fd.rawValue, Int32(SHUT_RDWR))
            }
            let toClient = try OSThread(name: "endless-s2c") { [self] in
                while let m = try? cs.receive() {
                    sendLock.withLock {
                        try? cc.send(id: m.header.messageID, command: m.header.command, flags: m.header.flags, errorNumber: m.header.errorNumber,
                                     payload: m.payload, fds: m.fds.map(\.rawValue))
                    }
                    m.closeFDs()
                }
                _ = shutdown(c.fd.rawValue, Int32(SHUT_RDWR))
            }
            return [toServer, toClient]
        }
    }

    /// DEVICE_FEATURE SET MIG_DEVICE_STATE to STOP_COPY.
    static func setsStopCopy(_ m: Message) -> Bool {
        guard m.header.isCommand, m.header.command == VFIOUserCommand.deviceFeature.rawValue, m.payload.count >= 12 else { return false }
        var r = WireReader(m.payload[...], context: "test")
        _ = try? r.u32()
        let flags = (try? r.u32()) ?? 0, state = (try? r.u32()) ?? 0
        return flags & 0xffff == DeviceFeature.migDeviceState && flags & DeviceFeature.set != 0 && state == MigrationState.stopCopy.rawValue
    }

    /// The next `n` bytes of the endless stream.
    private func next(_ n: Int) -> [UInt8] {
        var out = [UInt8](); out.reserveCapacity(n)
        while out.count < n {
            let k = min(n - out.count, stream.count - pos)
            out += stream[pos..<(pos + k)]
            pos += k
            if pos == stream.count { pos = loopFrom }
        }
        return out
    }

    func close() { plumbing.close() }
}

/// Recorded bug (hostile pass): a server whose MIG_DATA_READ replies are always full (never
/// the short read that ends the data) kept stop-copy going forever, with the VM paused. Each
/// read of a device's data to its end is bounded by twice the size the device announces plus
/// 256 MiB; past it the migration fails and the source runs on with the device in RUNNING.
final class EndlessDeviceTests: XCTestCase {
    /// `body` on its own thread, waited for at most `seconds` (the old code never returned:
    /// then `unblock` breaks the connection so that the thread ends, and the test fails).
    func bounded(_ seconds: Int32, _ body: @escaping @Sendable () -> Error?, unblock: () -> Void) throws -> Error? {
        let done = try EventFD(nonBlocking: true)
        let result = Mutex()
        nonisolated(unsafe) var err: Error?
        let t = try OSThread(name: "bounded") { let e = body(); result.withLock { err = e }; try? done.signal() }
        defer { t.join() }
        guard try Poll.waitReadable(done.fd, timeoutMilliseconds: seconds * 1000) else {
            XCTFail("did not end within \(seconds) s: the stop-copy never ends")
            unblock()
            return nil
        }
        return result.withLock { err }
    }

    func testTheDataBoundSaturatesAndHasADefault() {
        XCTAssertEqual(DeviceMigration.dataBound(announced: 1 << 20), (2 << 20) + DeviceMigration.dataSlack)
        XCTAssertEqual(DeviceMigration.dataBound(announced: 1 << 63), .max, "2 × 2^63 does not wrap to a small bound")
        XCTAssertEqual(DeviceMigration.dataBound(announced: .max - 10), .max)
        XCTAssertEqual(DeviceMigration.dataBound(announced: nil), DeviceMigration.unannouncedDataBound)
    }

    /// DeviceStateTransfer (the device-migrate path, spliced relay between two servers).
    func testAnEndlessStopCopyBetweenTwoServersFailsAndTheSourceIsBackInRunning() throws {
        Log.level = .error
        defer { Log.level = .info }
        let a = try InProcessServer(path: InProcessServer.temporaryPath("endless-a"), stateSize: 1 << 20, name: "endless-a")
        defer { a.stop() }
        let b = try InProcessServer(path: InProcessServer.temporaryPath("endless-b"), stateSize: 1 << 20, name: "endless-b")
        defer { b.stop() }
        let relay = try EndlessRelay(to: a.path, tag: "endless-relay", memorySize: 1 << 20, endlessFromStart: true)
        defer { relay.close() }
        var o = VFIOUserClient.Options(); o.offerTwinSocket = false
        let ca = try VFIOUserClient(path: relay.path, options: o)
        defer { ca.close() }
        let cb = try VFIOUserClient(path: b.path)
        defer { cb.close() }
        var to = DeviceStateTransfer.Options(); to.preCopy = false
        let t = DeviceStateTransfer(source: try DeviceMigration(device: ca), destination: try DeviceMigration(device: cb), options: to)
        let e = try bounded(60, { do { _ = try t.run(); return nil } catch { return error } }, unblock: { relay.close() })
        let s = "\(String(describing: e))"
        XCTAssertTrue(s.contains("the device's migration data did not end"), s)
        XCTAssertTrue(s.contains("the source device is back in RUNNING"), s)
        XCTAssertGreaterThan(relay.readsAnswered, 100, "the relay did answer full reads")
        XCTAssertEqual(try ca.migrationState(), .running)
        XCTAssertEqual(try cb.migrationState(), .running, "the destination was reset out of RESUMING")
    }

    /// The VM migration (MigrationSource's stop-copy, device read to its end with the VM paused).
    func testAnEndlessStopCopyInAVMMigrationFailsAndTheSourceVMRunsOn() throws {
        Log.level = .error
        defer { Log.level = .info }
        let server = try InProcessServer(path: InProcessServer.temporaryPath("endless-srv"), stateSize: 1 << 20, name: "endless")
        defer { server.stop() }
        let relay = try EndlessRelay(to: server.path, tag: "endless-vm", memorySize: 1 << 20)
        defer { relay.close() }
        var o = VFIOUserClient.Options(); o.offerTwinSocket = false
        let client = try VFIOUserClient(path: relay.path, options: o)
        defer { client.close() }
        var w = WorkloadConfig(); w.workingSet = 4 << 20; w.dirtyRate = 5_000; w.dmaEvery = 4
        let vm = try MicroVM(memorySize: 16 << 20, vcpus: 1, workload: w, devices: [client])
        defer { vm.stop() }
        let listener = try TCPListener(host: "127.0.0.1", port: 0, backlog: 4)
        defer { listener.close() }
        let sink = try OSThread(name: "sink") {
            guard let s = try? listener.accept(timeoutMilliseconds: 10_000) else { return }
            var b = [UInt8](repeating: 0, count: 1 << 16)
            while recv(s.fd.rawValue, &b, b.count, 0) > 0 {}
            s.fd.close()
        }
        defer { sink.join() }
        try vm.start(); vm.resume()
        usleep(200_000)
        var p = MigrationParameters(); p.peerTimeoutMS = 30_000; p.maxIterations = 1
        let m = try MigrationSource(vm: vm, to: TCPSocket.connect(host: "127.0.0.1", port: listener.port), parameters: p, policies: [.auto])
        let e = try bounded(60, { do { try m.run(); return nil } catch { return error } }, unblock: { _ = m.cancel(); relay.close() })
        XCTAssertTrue("\(String(describing: e))".contains("the device's migration data did not end"), "\(String(describing: e))")
        XCTAssertGreaterThan(relay.readsAnswered, 100)
        XCTAssertTrue(m.lostDevices.isEmpty, "\(m.lostDevices)")
        XCTAssertEqual(try client.migrationState(), .running, "the device is back in RUNNING")
        XCTAssertFalse(vm.isPaused, "the source VM runs on")
        let dma = vm.dmaRoundsOK
        usleep(300_000)
        XCTAssertGreaterThan(vm.dmaRoundsOK, dma, "and the guest still DMAs through its device")
        let r = vm.verify()
        XCTAssertTrue(r.ok, r.description)
    }
}
