import Foundation
import Glibc
import Machine
@testable import Migration
import SystemCalls
import VFIO
import VFIOUser
import XCTest

/// A vfio-user server the project did not write (Tests/Fixtures/foreign_vfio_user_server.py),
/// as its own process.
final class ForeignMigrationServer {
    static var script: String {
        let tests = ((#filePath as NSString).deletingLastPathComponent as NSString).deletingLastPathComponent
        return (tests as NSString).appendingPathComponent("Fixtures/foreign_vfio_user_server.py")
    }
    let path: String
    let pid: pid_t

    init(_ tag: String, _ options: [String]) throws {
        path = "/tmp/vfio-live-foreign-mig-\(getpid())-\(tag).sock"
        unlink(path)
        pid = try ChildProcess.spawn("/usr/bin/env", ["env", "python3", Self.script, path] + options)
        let deadline = monotonicNanoseconds() + 10_000_000_000
        while access(path, F_OK) != 0 {
            if let st = ChildProcess.exitStatus(pid) { throw XCTSkip("the foreign server exited (status \(st)): is python3 installed?") }
            guard monotonicNanoseconds() < deadline else { kill(pid, SIGKILL); _ = ChildProcess.wait(pid); throw Errno.ETIMEDOUT }
            usleep(10_000)
        }
    }

    func stop() { kill(pid, SIGTERM); _ = ChildProcess.wait(pid); unlink(path) }
}

/// Issue 11 item 7: a foreign device's state migrates through a VM migration when the server
/// implements migration v2, and one without migration blocks it with QEMU's reason.
final class ForeignDeviceMigrationTests: XCTestCase {
    var servers: [ForeignMigrationServer] = []
    var vms: [MicroVM] = []

    override func setUp() { Log.level = .error }
    override func tearDown() {
        for v in vms { v.stop() }
        for s in servers { s.stop() }
        Log.level = .info
    }

    func makeVM(_ tag: String, _ options: [String]) throws -> MicroVM {
        let s = try ForeignMigrationServer(tag, options)
        servers.append(s)
        var w = WorkloadConfig()
        w.workingSet = 8 << 20
        w.dirtyRate = 50_000
        let vm = try MicroVM(memorySize: 32 << 20, workload: w, devices: [VFIOUserClient(path: s.path)])
        vms.append(vm)
        return vm
    }

    func u32(_ b: [UInt8]) -> UInt32 { b.enumerated().reduce(UInt32(0)) { $0 | UInt32($1.element) << (8 * UInt32($1.offset)) } }
    func bytes(_ v: UInt32) -> [UInt8] { (0..<4).map { UInt8(v >> (8 * UInt32($0)) & 0xff) } }

    /// MSI at 0x60 and a PCIe capability at 0x48 (not the dma-engine's 0x40), STOP_COPY only
    /// (no PRE_COPY): the device's registers written before the migration read back the same
    /// through the destination VMM, and its interrupt works there.
    func testForeignDeviceStateMigratesBetweenTwoServerProcesses() throws {
        let src = try makeVM("src", ["--irq", "msi"])
        let dst = try makeVM("dst", ["--irq", "msi"])
        XCTAssertEqual(src.devices[0].pci?.interrupt, .msi(capability: 0x60))
        try src.start(); src.resume()
        try dst.start()
        let bar = src.devices[0].bar0
        try src.mmioWrite(bar + 4, bytes(0x5eed_1234))
        try src.mmioWrite(bar + 8, bytes(0x0bad_f00d))
        for _ in 0..<3 { try src.mmioWrite(bar + 0x0c, bytes(1)) }
        XCTAssertEqual(u32(try dst.mmioRead(dst.devices[0].bar0 + 4, count: 4)), 0, "the destination's device starts blank")

        let listener = try TCPListener(host: "127.0.0.1", port: 0)
        defer { listener.close() }
        var destError: Error?
        let t = try OSThread(name: "destination") {
            do {
                guard let sock = try listener.accept(timeoutMilliseconds: 20_000) else { throw MigrationError.channel("no connection") }
                let d = try MigrationDestination(vm: dst, from: sock)
                d.verifyBeforeResume = true
                try d.run()
            } catch { destError = error }
        }
        let m = try MigrationSource(vm: src, to: TCPSocket.connect(host: "127.0.0.1", port: listener.port),
                                    parameters: MigrationParameters(), policies: [.auto])
        try m.run()
        t.join()
        XCTAssertNil(destError)
        XCTAssertEqual(m.stats.status, .completed)
        XCTAssertGreaterThan(m.stats.deviceBytes.first ?? 0, 0, "the device's state blob travelled")

        let db = dst.devices[0].bar0
        XCTAssertEqual(u32(try dst.mmioRead(db + 4, count: 4)), 0x5eed_1234, "scratch 0 migrated")
        XCTAssertEqual(u32(try dst.mmioRead(db + 8, count: 4)), 0x0bad_f00d, "scratch 1 migrated")
        XCTAssertEqual(u32(try dst.mmioRead(db + 0x10, count: 4)), 3, "the doorbell count migrated")
        let before = dst.interruptsCounted[0]
        try dst.mmioWrite(db + 0x0c, bytes(1))
        let deadline = monotonicNanoseconds() + 5_000_000_000
        while dst.interruptsCounted[0] <= before && monotonicNanoseconds() < deadline { usleep(5_000) }
        XCTAssertGreaterThan(dst.interruptsCounted[0], before, "the device interrupts the destination VMM")
        XCTAssertTrue(dst.verify().ok)
    }

    /// QEMU's reason, from hw/vfio/migration.c: "VFIO device doesn't support migration".
    func testForeignDeviceWithoutMigrationBlocksWithQEMUsReason() throws {
        let src = try makeVM("nomig", ["--irq", "msix", "--migration", "off"])
        try src.start(); src.resume()
        let listener = try TCPListener(host: "127.0.0.1", port: 0)
        defer { listener.close() }
        XCTAssertThrowsError(try MigrationSource(vm: src, to: TCPSocket.connect(host: "127.0.0.1", port: listener.port),
                                                 parameters: MigrationParameters(), policies: [.auto])) { e in
            XCTAssertTrue("\(e)".contains("VFIO device doesn't support migration"), "\(e)")
        }
        usleep(100_000)
        XCTAssertNil(src.failure, "the VM runs on")
        XCTAssertFalse(src.isPaused)
    }
}
