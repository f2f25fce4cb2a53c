import Glibc
import XCTest
@testable import Devices
import SystemCalls
import VFIO
@testable import VFIOUser

/// A client that writes raw bytes, to play a broken or hostile peer.
final class RawPeer {
    let sock: UnixSocket
    let conn: VFIOUserConnection
    init(path: String, negotiate: Bool = true) throws {
        sock = try UnixSocket.connect(path: path)
        conn = VFIOUserConnection(socket: sock, maxReceiveFDs: 8, maxMessageSize: 64 << 20)
        if negotiate {
            let r = try call(.version, VersionPayload(major: 0, minor: 2, capabilities: Capabilities()).encode())
            XCTAssertFalse(r.header.isError)
        }
    }
    func call(_ cmd: VFIOUserCommand, _ payload: [UInt8], fds: [Int32] = [], id: UInt16 = 7) throws -> Message {
        try conn.send(id: id, command: cmd.rawValue, flags: 0, payload: payload, fds: fds)
        return try conn.receive()
    }
    /// Send raw bytes (a header that lies, garbage...) and read one reply.
    func raw(_ bytes: [UInt8], fds: [Int32] = []) throws -> Message {
        try sock.send(bytes, fds: fds)
        return try conn.receive()
    }
    func close() { conn.close() }
}

final class BadInputTests: XCTestCase {
    var server: RunningServer!
    var errors: [String] = []

    override func setUpWithError() throws {
        server = try RunningServer(stateSize: 1 << 20, name: "bad-input")
        errors = []
        Log.sink = { [weak self] line in self?.errors.append(line) }
    }
    override func tearDown() {
        Log.sink = nil
        server.stop()
    }

    /// The server is still serving: a fresh request on the same connection works.
    func assertStillServing(_ p: RawPeer, file: StaticString = #filePath, line: UInt = #line) throws {
        let r = try p.call(.regionRead, RegionAccess(offset: 0, region: 0, count: 4).encode())
        XCTAssertFalse(r.header.isError, "server stopped serving", file: file, line: line)
        XCTAssertEqual(Array(r.payload[16...]), [0xed, 0, 0, 1], file: file, line: line)
    }

    func assertError(_ m: Message, _ e: Errno, file: StaticString = #filePath, line: UInt = #line) {
        XCTAssertTrue(m.header.isReply && m.header.isError, "expected an error reply", file: file, line: line)
        XCTAssertEqual(m.header.errorNumber, UInt32(e.rawValue), "errno", file: file, line: line)
        XCTAssertEqual(m.payload.count, 0, "an error reply is header only", file: file, line: line)
    }

    func testUnknownCommand() throws {
        let p = try RawPeer(path: server.path); defer { p.close() }
        var h = MessageHeader(messageID: 3, command: 200, messageSize: 16, flags: 0).bytes
        assertError(try p.raw(h), .ENOSYS)
        h = MessageHeader(messageID: 3, command: VFIOUserCommand.dirtyPages.rawValue, messageSize: 24, flags: 0).bytes + [8, 0, 0, 0, 3, 0, 0, 0]
        assertError(try p.raw(h), .EINVAL)  // DIRTY_PAGES with START|STOP
        try assertStillServing(p)
        XCTAssertEqual(errors.filter { $0.hasPrefix("warning") }.count, 2, "one log line per refused message: \(errors)")
    }

    func testTruncatedAndUndersizedMessages() throws {
        let p = try RawPeer(path: server.path); defer { p.close() }
        // REGION_READ whose payload is 5 bytes instead of 16.
        assertError(try p.raw(MessageHeader(messageID: 4, command: 9, messageSize: 21, flags: 0).bytes + [0, 0, 0, 0, 0]), .EINVAL)
        // msg_size smaller than the header itself.
        assertError(try p.raw(MessageHeader(messageID: 5, command: 9, messageSize: 8, flags: 0).bytes), .EINVAL)
        try assertStillServing(p)
    }

    func testOversizedMessageIsDrainedAndRefused() throws {
        let p = try RawPeer(path: server.path); defer { p.close() }
        let size = 3 << 20
        var msg = MessageHeader(messageID: 6, command: 10, messageSize: UInt32(16 + size), flags: 0).bytes
        msg += [UInt8](repeating: 0xaa, count: size)
        let sender = try OSThread { try? p.sock.send(msg) }
        let r = try p.conn.receive()
        sender.join()
        assertError(r, .E2BIG)
        try assertStillServing(p)
    }

    func testWrongFDCountsAreRefusedAndClosed() throws {
        let p = try RawPeer(path: server.path); defer { p.close() }
        let e1 = try EventFD(), e2 = try EventFD()
        let many = try (0..<12).map { _ in try EventFD() }
        let before = openFDCount()
        // An fd with a command that takes none.
        assertError(try p.call(.regionRead, RegionAccess(offset: 0, region: 0, count: 4).encode(), fds: [e1.fd.rawValue]), .EINVAL)
        // SET_IRQS with DATA_EVENTFD: count 1 but 2 fds.
        assertError(try p.call(.deviceSetIRQs, SetIRQsRequest(flags: [.dataEventFD, .actionTrigger], index: 1, start: 0, count: 1).encode(),
                               fds: [e1.fd.rawValue, e2.fd.rawValue]), .EINVAL)
        // More fds than max_msg_fds (8): the surplus is closed by the receiver.
        assertError(try p.call(.regionRead, RegionAccess(offset: 0, region: 0, count: 4).encode(), fds: many.map { $0.fd.rawValue }), .EINVAL)
        try assertStillServing(p)
        // The server runs in this process: every fd it received must be closed again.
        XCTAssertEqual(openFDCount(), before, "every fd the server received was closed")
    }

    func testDMAMapErrors() throws {
        let p = try RawPeer(path: server.path); defer { p.close() }
        let ram = try GuestRAM(size: 1 << 20)
        let before = openFDCount()
        let ok = DMAMapRequest(flags: [.read, .write], offset: 0, address: 0x10_0000, size: 1 << 20)
        XCTAssertFalse(try p.call(.dmaMap, ok.encode(), fds: [ram.fd.rawValue]).header.isError)
        // Overlap: EEXIST per the spec.
        let overlap = DMAMapRequest(flags: [.read], offset: 0, address: 0x18_0000, size: 1 << 20)
        assertError(try p.call(.dmaMap, overlap.encode(), fds: [ram.fd.rawValue]), .EEXIST)
        // A mapping past the end of the file it maps (mmap would SIGBUS later).
        let pastEOF = DMAMapRequest(flags: [.read], offset: 4096, address: 0x100_0000, size: 1 << 20)
        assertError(try p.call(.dmaMap, pastEOF.encode(), fds: [ram.fd.rawValue]), .EINVAL)
        // Unaligned, and no permission at all.
        assertError(try p.call(.dmaMap, DMAMapRequest(flags: [.read], offset: 0, address: 0x200_0001, size: 4096).encode()), .EINVAL)
        assertError(try p.call(.dmaMap, DMAMapRequest(flags: [], offset: 0, address: 0x200_0000, size: 4096).encode()), .EINVAL)
        // A partial unmap: ENOENT. A range holding no mapping succeeds and does nothing, as
        // the kernel's type1 does (QEMU's intel-iommu unmaps whole address-space chunks).
        assertError(try p.call(.dmaUnmap, DMAUnmapRequest(address: 0x10_0000, size: 4096).encode()), .ENOENT)
        assertError(try p.call(.dmaUnmap, DMAUnmapRequest(address: 0x8_0000, size: 0x10_0000).encode()), .ENOENT)
        XCTAssertFalse(try p.call(.dmaUnmap, DMAUnmapRequest(address: 0x500_0000, size: 4096).encode()).header.isError)
        XCTAssertEqual(server.server.dma.count, 1)
        XCTAssertEqual(openFDCount(), before + 1, "the refused maps' fds were closed; only the good one is held")
        XCTAssertFalse(try p.call(.dmaUnmap, DMAUnmapRequest(address: 0x10_0000, size: 1 << 20).encode()).header.isError)
        XCTAssertEqual(openFDCount(), before, "unmap closes the mapping's fd")
        try assertStillServing(p)
    }

    /// QEMU 11.1 behind intel-iommu maps 4 KiB pages, then on an invalidation unmaps the
    /// whole address space in power-of-two chunks up to 2^64; those must take the pages away.
    func testUnmapOfARangeTakesEveryMappingInsideIt() throws {
        let table = DMAMapTable()
        let ram = try GuestRAM(size: 64 * 1024)
        for i: UInt64 in 0..<4 {
            try table.map(DMAMapRequest(flags: [.read, .write], offset: i * 4096, address: i * 4096, size: 4096), fd: try ram.fd.duplicate())
        }
        try table.map(DMAMapRequest(flags: [.read], offset: 0, address: 0xfef0_0000, size: 4096), fd: try ram.fd.duplicate())
        XCTAssertEqual(try table.unmapRange(address: 0, size: 0x8000_0000), 4)
        XCTAssertEqual(try table.unmapRange(address: 0x8000_0000, size: 0x4000_0000), 0, "nothing there: success, as type1")
        XCTAssertEqual(try table.unmapRange(address: 0xfef0_0000, size: 0xffff_ffff_0110_0000), 1, "a range ending at 2^64")
        XCTAssertEqual(table.count, 0)
        XCTAssertThrowsError(try table.unmapRange(address: 0xffff_ffff_ffff_f000, size: 0x2000), "wraps")
        try table.map(DMAMapRequest(flags: [.read, .write], offset: 0, address: 0, size: 0x2000), fd: try ram.fd.duplicate())
        XCTAssertThrowsError(try table.unmapRange(address: 0x1000, size: 0x2000), "cuts a mapping")
        XCTAssertEqual(table.count, 1)
        try table.map(DMAMapRequest(flags: [.read, .write], offset: 0, address: 0x2000, size: 0x1000), fd: try ram.fd.duplicate())
        XCTAssertEqual(table.count, 2, "the range was free again after its pages went")
    }

    func testDeviceDMAOutsideMappingsNeverTouchesOtherMemory() throws {
        let table = DMAMapTable()
        let ram = try GuestRAM(size: 64 * 1024)
        try table.map(DMAMapRequest(flags: [.read, .write], offset: 0, address: 0x1_0000, size: 64 * 1024), fd: try ram.fd.duplicate())
        var buf = [UInt8](repeating: 1, count: 8192)
        for addr: UInt64 in [0, 0x1_0000 - 1, 0x2_0000 - 4096, 0xffff_ffff_ffff_f000] {
            XCTAssertThrowsError(try buf.withUnsafeBytes { try table.write(address: addr, from: $0) }, "write at \(hex(addr))")
            XCTAssertThrowsError(try buf.withUnsafeMutableBytes { try table.read(address: addr, into: $0) }, "read at \(hex(addr))")
        }
        XCTAssertEqual(ram.bytes(offset: 0, count: 64 * 1024), [UInt8](repeating: 0, count: 64 * 1024), "a refused access wrote nothing")
        // Read-only mapping: writes refused.
        try table.map(DMAMapRequest(flags: [.read], offset: 0, address: 0x10_0000, size: 64 * 1024), fd: try ram.fd.duplicate())
        XCTAssertThrowsError(try buf.withUnsafeBytes { try table.write(address: 0x10_0000, from: $0) })
    }

    func testCommandsBeforeVersionAndBadVersions() throws {
        let first = try RawPeer(path: server.path, negotiate: false); defer { first.close() }
        assertError(try first.call(.deviceGetInfo, DeviceInfo(flags: 0, regionCount: 0, irqCount: 0).encode()), .EINVAL)
        assertError(try first.call(.version, VersionPayload(major: 1, minor: 0, capabilities: Capabilities()).encode()), .ENOTSUP)
        // The spec closes the connection after a major mismatch (the server did): go on with a new one.
        let p = try RawPeer(path: server.path, negotiate: false); defer { p.close() }
        var c = Capabilities(); c.migration = .init(pageSize: 8192)
        assertError(try p.call(.version, VersionPayload(major: 0, minor: 0, capabilities: c).encode()), .EINVAL)
        assertError(try p.call(.version, [0, 0, 0, 0] + Array("{not json".utf8) + [0]), .EINVAL)
        XCTAssertFalse(try p.call(.version, VersionPayload(major: 0, minor: 9, capabilities: Capabilities()).encode()).header.isError)
        assertError(try p.call(.version, VersionPayload(major: 0, minor: 0, capabilities: Capabilities()).encode()), .EINVAL)  // twice
        try assertStillServing(p)
    }

    func testRegionAndIRQBounds() throws {
        let p = try RawPeer(path: server.path); defer { p.close() }
        assertError(try p.call(.regionRead, RegionAccess(offset: DMAEngine.bar0Size - 2, region: 0, count: 4).encode()), .EINVAL)
        assertError(try p.call(.regionRead, RegionAccess(offset: 0, region: 42, count: 4).encode()), .EINVAL)
        assertError(try p.call(.regionWrite, RegionAccess(offset: 0, region: 4, count: 1, data: [1]).encode()), .EINVAL)  // read-only view
        assertError(try p.call(.deviceGetIRQInfo, IRQInfo(flags: [], index: 9, count: 0).encode()), .EINVAL)
        let e = try EventFD()
        assertError(try p.call(.deviceSetIRQs, SetIRQsRequest(flags: [.dataEventFD, .actionTrigger], index: 0, start: 1, count: 1).encode(), fds: [e.fd.rawValue]), .EINVAL)
        assertError(try p.call(.deviceSetIRQs, SetIRQsRequest(flags: [.dataNone, .actionMask], index: 1, start: 0, count: 1).encode()), .EINVAL)  // MSI not maskable
        try assertStillServing(p)
    }

    func testNoReplyFlagSuppressesReplies() throws {
        let p = try RawPeer(path: server.path); defer { p.close() }
        try p.conn.send(id: 9, command: VFIOUserCommand.regionWrite.rawValue, flags: MessageHeader.flagNoReply,
                        payload: RegionAccess(offset: DMAEngine.Reg.liveness, region: 0, count: 4, data: [1, 0, 0, 0]).encode())
        try p.conn.send(id: 10, command: 200, flags: MessageHeader.flagNoReply, payload: [UInt8]())  // even errors
        let r = try p.call(.regionRead, RegionAccess(offset: DMAEngine.Reg.liveness, region: 0, count: 4).encode(), id: 11)
        XCTAssertEqual(r.header.messageID, 11)
        XCTAssertEqual(Array(r.payload[16...]), [0xfe, 0xff, 0xff, 0xff])
    }

    func testDisconnectKeepsDeviceStateAndDropsMappings() throws {
        let ram = try GuestRAM(size: 1 << 20)
        do {
            let c = try VFIOUserClient(path: server.path)
            try c.mapDMA(iova: 0x10_0000, size: ram.size, local: ram.map.base, fd: ram.fd)
            try c.setIRQs(index: 1, eventfds: [try EventFD()])
            try c.write32(0, DMAEngine.Reg.liveness, 0x55)
            c.close()
        }
        // Wait for the server to notice.
        let deadline = monotonicNanoseconds() + 5_000_000_000
        while server.server.dma.count != 0 && monotonicNanoseconds() < deadline { usleep(1000) }
        XCTAssertEqual(server.server.dma.count, 0, "mappings dropped on disconnect")
        let c = try VFIOUserClient(path: server.path)
        defer { c.close() }
        XCTAssertEqual(try c.read32(0, DMAEngine.Reg.liveness), ~UInt32(0x55), "device state kept across reconnect")
        // Without a new DMA_MAP a job cannot reach guest RAM.
        try runJob(c, source: 0x10_0000, destination: DMAEngine.deviceMemoryBase, count: 4096, toRAM: false)
        XCTAssertEqual(try c.read64(0, DMAEngine.Reg.lastJobStatus), UInt64(EFAULT))
    }
}
