import Devices
import Glibc
import Machine
@testable import Migration
import SystemCalls
import VFIO
@testable import VFIOUser
import XCTest

/// A vfio-user relay in front of a real server that swallows the messages `drop` picks once
/// armed (the server never sees them: a device hung on that command) and passes the rest.
final class SwallowingRelay: @unchecked Sendable {
    var path: String { plumbing.path }
    private let lock = Mutex()
    private var plumbing: RelayPlumbing!
    private var swallowedStorage = 0
    var swallowed: Int { lock.withLock { swallowedStorage } }

    init(to serverPath: String, tag: String, drop: @escaping @Sendable (Message) -> Bool) throws {
        plumbing = try RelayPlumbing(to: serverPath, tag: tag, name: "swallow") { [self] c, s in
            let cc = VFIOUserConnection(socket: c, maxReceiveFDs: 8, maxMessageSize: 80 << 20)
            let cs = VFIOUserConnection(socket: s, maxReceiveFDs: 8, maxMessageSize: 80 << 20)
            func pump(_ a: VFIOUserConnection, _ b: VFIOUserConnection, filter: Bool) {
                while let m = try? a.receive() {
                    defer { m.closeFDs() }
                    if filter && drop(m) { lock.withLock { swallowedStorage += 1 }; continue }
                    try? b.send(id: m.header.messageID, command: m.header.command, flags: m.header.flags, errorNumber: m.header.errorNumber,
                                payload: m.payload, fds: m.fds.map(\.rawValue))
                }
                _ = shutdown(b.socket.fd.rawValue, Int32(SHUT_RDWR))
            }
            return [try OSThread(name: "swallow-c2s") { pump(cc, cs, filter: true) },
                    try OSThread(name: "swallow-s2c") { pump(cs, cc, filter: false) }]
        }
    }

    /// DEVICE_FEATURE SET MIG_DEVICE_STATE to one of `states`.
    static func setsState(_ m: Message, _ states: Set<MigrationState>) -> Bool {
        guard m.header.isCommand, m.header.command == VFIOUserCommand.deviceFeature.rawValue, m.payload.count >= 12 else { return false }
        var r = WireReader(m.payload[...], context: "test")
        _ = try? r.u32()
        let flags = (try? r.u32()) ?? 0, raw = (try? r.u32()) ?? 0
        guard flags & 0xffff == DeviceFeature.migDeviceState, flags & DeviceFeature.set != 0, let s = MigrationState(rawValue: raw) else { return false }
        return states.contains(s)
    }

    func close() { plumbing.close() }
}

/// Recorded bug (hostile pass): after GO the destination brings its devices to RUNNING; one
/// that hangs there costs it its device timeout (10 s) before it can say ERR, but the source
/// waited for the answer only its peer timeout (5 s): it declared the outcome unknown and
/// stayed paused, while the destination then failed and stayed paused too (the VM ran nowhere
/// until an operator chose). The source now waits the destination's device bound after GO,
/// gets the ERR, and the VM runs on at the source.
final class HungDeviceAfterGOTests: XCTestCase {
    func testADestinationDeviceHungAfterGOEndsInERRAndTheSourceRunsOn() throws {
        Log.level = .error
        defer { Log.level = .info }
        var w = WorkloadConfig(); w.workingSet = 8 << 20; w.dirtyRate = 20_000; w.dmaEvery = 4
        let srcServer = try InProcessServer(path: InProcessServer.temporaryPath("hag-src"), stateSize: 1 << 20, name: "hag-src")
        defer { srcServer.stop() }
        let srcClient = try VFIOUserClient(path: srcServer.path)
        defer { srcClient.close() }
        let srcVM = try MicroVM(memorySize: 32 << 20, vcpus: 1, workload: w, devices: [srcClient])
        defer { srcVM.stop() }
        let dstServer = try InProcessServer(path: InProcessServer.temporaryPath("hag-dst"), stateSize: 1 << 20, name: "hag-dst")
        defer { dstServer.stop() }
        // The destination's only moves to RUNNING(_P2P) come after GO.
        let relay = try SwallowingRelay(to: dstServer.path, tag: "hag-relay") { SwallowingRelay.setsState($0, [.running, .runningP2P]) }
        defer { relay.close() }
        var o = VFIOUserClient.Options(); o.offerTwinSocket = false; o.timeoutMilliseconds = 2000
        let dstClient = try VFIOUserClient(path: relay.path, options: o)
        defer { dstClient.close() }
        let dstVM = try MicroVM(memorySize: 32 << 20, vcpus: 1, workload: w, devices: [dstClient])
        defer { dstVM.stop() }
        let listener = try TCPListener(host: "127.0.0.1", port: 0, backlog: 4)
        defer { listener.close() }
        try srcVM.start(); srcVM.resume(); try dstVM.start()
        usleep(200_000)
        var dstError: Error?
        let dst = try OSThread(name: "hag-dst") {
            do {
                guard let s = try listener.accept(timeoutMilliseconds: 20_000) else { throw MigrationError.channel("no connection") }
                let d = try MigrationDestination(vm: dstVM, from: s)
                try d.run()
            } catch { dstError = error }
        }
        var p = MigrationParameters(); p.peerTimeoutMS = 1000; p.maxIterations = 2
        let m = try MigrationSource(vm: srcVM, to: TCPSocket.connect(host: "127.0.0.1", port: listener.port), parameters: p, policies: [.auto])
        XCTAssertThrowsError(try m.run()) { e in
            guard case .destination(let why)? = e as? MigrationError else { return XCTFail("not the destination's ERR: \(e)") }
            XCTAssertTrue(why.contains("did not answer"), why)
        }
        dst.join()
        XCTAssertNotNil(dstError, "the destination failed")
        XCTAssertGreaterThan(relay.swallowed, 0, "the destination's device did hang after GO")
        XCTAssertFalse(srcVM.isPaused, "the source VM runs on")
        XCTAssertEqual(try srcClient.migrationState(), .running, "its device is back in RUNNING")
        XCTAssertTrue(dstVM.isPaused, "the destination never ran the guest")
        let dma = srcVM.dmaRoundsOK
        usleep(300_000)
        XCTAssertGreaterThan(srcVM.dmaRoundsOK, dma)
        let r = srcVM.verify()
        XCTAssertTrue(r.ok, r.description)
    }
}
