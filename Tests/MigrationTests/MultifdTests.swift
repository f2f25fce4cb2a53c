import Devices
import Glibc
import Machine
@testable import Migration
import SystemCalls
import VFIO
import XCTest

/// Multifd (QEMU's capability and multifd-channels): extra TCP or UNIX connections carry RAM
/// and device state beside the main channel; every failure ends with the source running, its
/// device RUNNING and every page verifying.
extension LiveMigrationTests {
    static func multifdParameters(_ n: Int, checksum: Bool = false) -> MigrationParameters {
        var p = MigrationParameters(); p.multifd = true; p.multifdChannels = n; p.payloadChecksum = checksum; return p
    }

    /// The destination takes its channels from the same listener as the main connection.
    func startMultifdDestination(_ configure: ((MigrationDestination) throws -> Void)? = nil) throws -> () -> Error? {
        try startDestination { [self] d in
            let l = listener!
            d.acceptChannel = { ms in try l.accept(timeoutMilliseconds: ms) }
            try configure?(d)
        }
    }

    func connectMultifdSource(_ p: MigrationParameters) throws -> MigrationSource {
        let m = try connectSource(p)
        let port = listener.port
        m.openChannel = { try TCPSocket.connect(host: "127.0.0.1", port: port) }
        return m
    }

    func testMultifdTwoChannelsMigratesARunningVMWithItsDevice() throws {
        try startSource()
        var destDigest: UInt64 = 0
        let wait = try startMultifdDestination { [self] d in d.afterDevicesLoaded = { destDigest = self.dst.server.device.stateDigest() } }
        let m = try connectMultifdSource(Self.multifdParameters(2))
        var onChannels: [MigrationStream.SectionType: Int] = [:]
        let seen = Mutex()
        m.afterChannelSectionForTesting = { _, t in seen.withLock { onChannels[t, default: 0] += 1 } }
        try m.run()
        XCTAssertNil(wait())
        XCTAssertGreaterThan(onChannels[.ram] ?? 0, 0, "RAM went on the channels")
        XCTAssertGreaterThan(onChannels[.device] ?? 0, 1, "device state went on the channels, in pre-copy and stop-copy")
        XCTAssertGreaterThan(onChannels[.sync] ?? 0, 2, "every pass ended with a SYNC on each channel")
        XCTAssertEqual(destDigest, src.server.device.stateDigest(), "the device state arrived whole")
        usleep(200_000)
        let r = dst.vm.verify()
        XCTAssertTrue(r.ok, r.description)
    }

    func testMultifdThreeChannelsWithPayloadChecksum() throws {
        try startSource()
        let wait = try startMultifdDestination()
        let m = try connectMultifdSource(Self.multifdParameters(3, checksum: true))
        try m.run()
        XCTAssertNil(wait())
        usleep(200_000)
        let r = dst.vm.verify()
        XCTAssertTrue(r.ok, r.description)
    }

    /// Channel setup failure (1): the destination takes no extra channels. It refuses with the
    /// reason, and the source rolls back.
    func testMultifdRefusedByADestinationWithoutChannels() throws {
        try startSource()
        let wait = try startDestination()  // no acceptChannel
        let m = try connectMultifdSource(Self.multifdParameters(2))
        XCTAssertThrowsError(try m.run())
        try assertSourceRunsOn(m, status: .failed, reasonContains: "takes none")
        XCTAssertTrue("\(wait().map { "\($0)" } ?? "")".contains("multifd"))
        XCTAssertTrue(dst.vm.isPaused)
    }

    /// Channel setup failure (2): the second channel cannot be opened. Nothing went out on the
    /// main channel, so the destination sees a connection that closed empty.
    func testMultifdChannelThatCannotConnect() throws {
        try startSource()
        let wait = try startMultifdDestination()
        let m = try connectSource(Self.multifdParameters(2))
        var opened = 0
        let port = listener.port
        m.openChannel = {
            opened += 1
            if opened == 2 { throw Errno(ECONNREFUSED) }
            return try TCPSocket.connect(host: "127.0.0.1", port: port)
        }
        XCTAssertThrowsError(try m.run())
        try assertSourceRunsOn(m, status: .failed, reasonContains: "opening multifd channel 1 of 2")
        let e = wait()
        guard case .closedBeforeStream? = e as? MigrationError else { return XCTFail("destination: \(String(describing: e))") }
    }

    /// A channel is cut mid-stream: both sides fail, the destination stays paused.
    func testMultifdChannelCutMidStream() throws {
        try startSource()
        let wait = try startMultifdDestination()
        let m = try connectSource(Self.multifdParameters(2))
        let port = listener.port
        var channels: [StreamSocket] = []
        m.openChannel = { let s = try TCPSocket.connect(host: "127.0.0.1", port: port); channels.append(s); return s }
        var ram = 0
        let lock = Mutex()
        m.afterChannelSectionForTesting = { ch, t in
            lock.withLock {
                guard ch == 1, t == .ram else { return }
                ram += 1
                if ram == 3 { _ = shutdown(channels[1].fd.rawValue, Int32(SHUT_RDWR)) }
            }
        }
        XCTAssertThrowsError(try m.run())
        try assertSourceRunsOn(m, status: .failed, reasonContains: "multifd channel 1")
        XCTAssertNotNil(wait())
        XCTAssertTrue(dst.vm.isPaused)
        XCTAssertEqual(try dst.client.migrationState(), .running, "the destination device was reset out of RESUMING")
    }

    /// The destination dies with its channels open: it reads a little on each connection, then
    /// everything closes at once.
    func testMultifdDestinationDyingWithChannelsOpen() throws {
        try startSource()
        let l = listener!
        let t = try OSThread { [self] in
            var conns: [TCPSocket] = []
            for _ in 0..<3 { if let s = try? l.accept(timeoutMilliseconds: 20_000) { conns.append(s) } }
            for s in conns {
                var b = [UInt8](repeating: 0, count: 24)
                _ = try? b.withUnsafeMutableBytes { try s.receiveExactly(into: $0, maxFDs: 0) }
            }
            usleep(100_000)
            for s in conns { s.fd.close() }
            _ = self
        }
        let m = try connectMultifdSource(Self.multifdParameters(2))
        XCTAssertThrowsError(try m.run())
        t.join()
        try assertSourceRunsOn(m, status: .failed, reasonContains: "multifd channel")
    }

    /// Over UNIX sockets: the channels connect to the same path.
    func testMultifdOverUNIXSockets() throws {
        try startSource()
        let path = InProcessServer.temporaryPath("mfd-unix")
        let ul = try UnixListener(path: path, backlog: 16)
        defer { ul.close(); unlink(path) }
        var result: Error?
        let t = try OSThread { [self] in
            do {
                guard let s = try ul.accept(timeoutMilliseconds: 20_000) else { throw MigrationError.channel("no connection") }
                let d = try MigrationDestination(vm: dst.vm, from: s)
                d.acceptChannel = { ms in try ul.accept(timeoutMilliseconds: ms) }
                d.verifyBeforeResume = true
                try d.run()
            } catch { result = error }
        }
        let m = try MigrationSource(vm: src.vm, to: UnixSocket.connect(path: path), parameters: Self.multifdParameters(2), policies: [.auto])
        m.openChannel = { try UnixSocket.connect(path: path) }
        try m.run()
        t.join()
        XCTAssertNil(result)
        usleep(200_000)
        XCTAssertTrue(dst.vm.verify().ok)
    }
}
