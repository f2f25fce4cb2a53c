import Glibc
import XCTest
@testable import Devices
import SystemCalls
import VFIO
@testable import VFIOUser

/// Issue 13 item 5: a client that DMA-maps a memfd and then shrinks it killed the server with
/// SIGBUS on the next device job. An fd sealed against shrinking (F_SEAL_SHRINK, as QEMU's
/// memory-backend-memfd seals by default) is mmapped; any other regular file is served with
/// pread/pwrite, where a shrunk file fails the job with EFAULT. Non-files are refused.
final class MemoryBackingTests: XCTestCase {
    var server: RunningServer!
    override func setUpWithError() throws { server = try RunningServer(stateSize: 1 << 20, name: "backing") }
    override func tearDown() { server.stop() }

    /// A regular tmpfs file: not sealable, so never sealed.
    func unsealedFile(size: UInt64) throws -> FileDescriptor {
        let path = "/dev/shm/vfio-live-test-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        let raw = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
        guard raw >= 0 else { throw Errno(errno) }
        unlink(path)
        let fd = FileDescriptor(adopting: raw)
        try fd.truncate(to: size)
        return fd
    }

    func testPipesAndSocketsAreRefused() throws {
        let p = try RawPeer(path: server.path); defer { p.close() }
        let before = openFDCount()
        var pfd: [Int32] = [0, 0]
        XCTAssertEqual(pipe(&pfd), 0)
        for fd in pfd {
            let r = try p.call(.dmaMap, DMAMapRequest(flags: [.read, .write], offset: 0, address: 0x10_0000, size: 4096).encode(), fds: [fd])
            XCTAssertTrue(r.header.isError); XCTAssertEqual(r.header.errorNumber, UInt32(EINVAL))
            close(fd)
        }
        let (a, b) = try UnixSocket.pair()
        let r = try p.call(.dmaMap, DMAMapRequest(flags: [.read], offset: 0, address: 0x10_0000, size: 4096).encode(), fds: [a.fd.rawValue])
        XCTAssertTrue(r.header.isError); XCTAssertEqual(r.header.errorNumber, UInt32(EINVAL))
        a.close(); b.close()
        XCTAssertEqual(server.server.dma.count, 0)
        XCTAssertLessThanOrEqual(openFDCount(), before, "refused fds were closed by the server")
    }

    /// The old code mmapped the file and died of SIGBUS here.
    func testShrunkUnsealedFileFailsTheJobNotTheServer() throws {
        let c = try VFIOUserClient(path: server.path); defer { c.close() }
        let size: UInt64 = 1 << 20
        let fd = try unsealedFile(size: size)
        let local = try MappedRegion(fd: fd, length: Int(size))
        for i in 0..<8192 { local.base.storeBytes(of: UInt8(truncatingIfNeeded: i &* 7), toByteOffset: i, as: UInt8.self) }
        try c.mapDMA(iova: 0x10_0000, size: size, local: local.base, fd: fd)
        XCTAssertFalse(server.server.dma.isMemoryMapped(iova: 0x10_0000), "an unsealed fd is not mmapped")
        // Works while the file is whole.
        try runJob(c, source: 0x10_0000, destination: DMAEngine.deviceMemoryBase, count: 8192, toRAM: false)
        XCTAssertEqual(try c.read64(0, DMAEngine.Reg.lastJobStatus), 0)
        try runJob(c, source: DMAEngine.deviceMemoryBase, destination: 0x10_0000 + 0x10000, count: 8192, toRAM: true)
        XCTAssertEqual(try c.read64(0, DMAEngine.Reg.lastJobStatus), 0)
        XCTAssertEqual(Array(UnsafeRawBufferPointer(start: local.base + 0x10000, count: 8192)),
                       Array(UnsafeRawBufferPointer(start: local.base, count: 8192)), "pwrite path wrote guest memory")
        // Shrink it under the server (we no longer touch our own view of it).
        try fd.truncate(to: 4096)
        try runJob(c, source: 0x10_0000 + 0x8000, destination: DMAEngine.deviceMemoryBase, count: 8192, toRAM: false)
        XCTAssertEqual(try c.read64(0, DMAEngine.Reg.lastJobStatus), UInt64(EFAULT), "the read job fails with EFAULT")
        try c.write32(0, DMAEngine.Reg.liveness, 0x12)
        XCTAssertEqual(try c.read32(0, DMAEngine.Reg.liveness), ~UInt32(0x12), "server alive")
        try c.unmapDMA(iova: 0x10_0000, size: size)
        _ = local
    }

    func testSealedMemfdIsMmappedAndCannotShrink() throws {
        let c = try VFIOUserClient(path: server.path); defer { c.close() }
        let ram = try GuestRAM(size: 1 << 20)  // MemFD.create seals F_SEAL_SHRINK
        try c.mapDMA(iova: 0x10_0000, size: ram.size, local: ram.map.base, fd: ram.fd)
        XCTAssertTrue(server.server.dma.isMemoryMapped(iova: 0x10_0000), "a sealed memfd takes the mmap path")
        XCTAssertThrowsError(try ram.fd.truncate(to: 4096), "F_SEAL_SHRINK forbids shrinking")
        ram.fill(offset: 0, count: 4096, seed: 5)
        try runJob(c, source: 0x10_0000, destination: DMAEngine.deviceMemoryBase, count: 4096, toRAM: false)
        XCTAssertEqual(try c.read64(0, DMAEngine.Reg.lastJobStatus), 0)
    }
}
