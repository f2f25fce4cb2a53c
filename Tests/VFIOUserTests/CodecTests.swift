import XCTest
import SystemCalls
import VFIO
@testable import VFIOUser

final class CodecTests: XCTestCase {
    func testHeaderLayout() throws {
        let h = MessageHeader(messageID: 0x1234, command: 5, messageSize: 48, flags: 0x21, errorNumber: 22)
        XCTAssertEqual(h.bytes, [0x34, 0x12, 5, 0, 48, 0, 0, 0, 0x21, 0, 0, 0, 22, 0, 0, 0])
        var r = WireReader(h.bytes, context: "h")
        XCTAssertEqual(try MessageHeader(decoding: &r), h)
        XCTAssertTrue(h.isReply && h.isError)
    }

    func testVersionJSONRoundTripAndNULTerminator() throws {
        var c = Capabilities()
        c.maxMessageFDs = 8; c.twinSocket = .init(supported: true, fdIndex: 0); c.migration = .init(pageSize: 4096)
        let bytes = VersionPayload(major: 0, minor: 2, capabilities: c).encode()
        XCTAssertEqual(bytes.last, 0, "JSON is NUL-terminated")
        let d = try VersionPayload(decoding: bytes[...])
        XCTAssertEqual(d.capabilities.maxMessageFDs, 8)
        XCTAssertEqual(d.capabilities.twinSocket, .init(supported: true, fdIndex: 0))
        XCTAssertEqual(d.capabilities.migration?.pageSize, 4096)
        // libvfio-user's observed reply, unknown keys and all.
        let lvu = #"{ "capabilities": { "max_msg_fds": 8, "max_data_xfer_size": 1048576, "migration": { "pgsize": 4096 }, "twin_socket": { "supported": true, "fd_index": 0 }, "future": [1, {"x": null}] } }"#
        let p = try VersionPayload(decoding: ([0, 0, 2, 0] + Array(lvu.utf8) + [0])[...])
        XCTAssertEqual(p.minor, 2)
        XCTAssertEqual(p.capabilities.maxDataXferSize, 1 << 20)
        XCTAssertEqual(p.capabilities.maxDMAMaps, 65535, "absent keys keep the spec defaults")
    }

    func testMalformedJSONIsAnErrorNotACrash() {
        for bad in [#"{"capabilities": {"max_msg_fds": -1}}"#, #"{"capabilities": ["#, #"{"capabilities": {"twin_socket": 3}}"#,
                    String(repeating: "[", count: 100), #"{"a":1} trailing"#, "\u{1}"] {
            XCTAssertThrowsError(try VersionPayload(decoding: ([0, 0, 0, 0] + Array(bad.utf8) + [0])[...]), bad)
        }
    }

    func testEveryRequestRoundTripsThroughTheDecoder() throws {
        func decode(_ cmd: VFIOUserCommand, _ payload: [UInt8], fds: Int = 0) throws -> VFIOUserRequest {
            let h = MessageHeader(messageID: 1, command: cmd.rawValue, messageSize: UInt32(16 + payload.count), flags: 0)
            return try VFIOUserRequest.decode(header: h, payload: payload[...], fdCount: fds)
        }
        let map = DMAMapRequest(flags: [.read, .write], offset: 0x1000, address: 0x10_0000, size: 0x20_0000)
        XCTAssertEqual(map.encode().count, 32)
        XCTAssertEqual(try decode(.dmaMap, map.encode(), fds: 1), .dmaMap(map))
        let unmap = DMAUnmapRequest(argsz: 56, flags: .getDirtyBitmap, address: 0x10_0000, size: 0x20_0000, bitmap: .init(pageSize: 4096, size: 64))
        XCTAssertEqual(unmap.encode().count, 40)
        XCTAssertEqual(try decode(.dmaUnmap, unmap.encode()), .dmaUnmap(unmap))
        XCTAssertEqual(try decode(.deviceGetInfo, DeviceInfo(flags: 0, regionCount: 0, irqCount: 0).encode()), .deviceGetInfo(DeviceInfo(flags: 0, regionCount: 0, irqCount: 0)))
        XCTAssertEqual(try decode(.deviceGetRegionInfo, RegionInfo(argsz: 80, flags: [], index: 7, size: 0).encodeRequest()), .deviceGetRegionInfo(argsz: 80, index: 7))
        let iofds = RegionIOFDsRequest(argsz: 256, index: 2)
        XCTAssertEqual(try decode(.deviceGetRegionIOFDs, iofds.encode()), .deviceGetRegionIOFDs(iofds))
        XCTAssertEqual(try decode(.deviceGetIRQInfo, IRQInfo(flags: [], index: 1, count: 0).encode()), .deviceGetIRQInfo(IRQInfo(flags: [], index: 1, count: 0)))
        let irqs = SetIRQsRequest(flags: [.dataEventFD, .actionTrigger], index: 1, start: 0, count: 2)
        XCTAssertEqual(irqs.encode().count, 20)
        XCTAssertEqual(try decode(.deviceSetIRQs, irqs.encode(), fds: 2), .deviceSetIRQs(irqs))
        let boolIRQ = SetIRQsRequest(flags: [.dataBool, .actionMask], index: 0, start: 0, count: 1, bools: [1])
        XCTAssertEqual(try decode(.deviceSetIRQs, boolIRQ.encode()), .deviceSetIRQs(boolIRQ))
        XCTAssertEqual(try decode(.regionRead, RegionAccess(offset: 8, region: 0, count: 4).encode()), .regionRead(RegionAccess(offset: 8, region: 0, count: 4)))
        let w = RegionAccess(offset: 8, region: 0, count: 3, data: [1, 2, 3])
        XCTAssertEqual(try decode(.regionWrite, w.encode()), .regionWrite(w))
        XCTAssertEqual(try decode(.deviceReset, []), .deviceReset)
        let dp = DirtyPagesRequest(argsz: 56, flags: DirtyPagesRequest.getBitmap, range: (0x1000, 0x4000, 4096, 8))
        XCTAssertEqual(dp.encode().count, 48)
        XCTAssertEqual(try decode(.dirtyPages, dp.encode()), .dirtyPages(dp))
        let multi = RegionWriteMulti(entries: [.init(offset: 4, region: 0, data: [9, 9, 9, 9])])
        XCTAssertEqual(multi.encode().count, 8 + 24)
        XCTAssertEqual(try decode(.regionWriteMulti, multi.encode()), .regionWriteMulti(multi))
        let feat = DeviceFeature(flags: DeviceFeature.migration | DeviceFeature.get, data: [0, 0, 0, 0, 0, 0, 0, 0])
        XCTAssertEqual(try decode(.deviceFeature, feat.encode()), .deviceFeature(feat))
        var mr = WireWriter(); mr.u32(8 + 4096); mr.u32(4096)
        XCTAssertEqual(try decode(.migDataRead, mr.bytes), .migDataRead(argsz: 8 + 4096, size: 4096))
        let mw = MigDataPayload(argsz: 11, size: 3, data: [7, 8, 9])
        XCTAssertEqual(try decode(.migDataWrite, mw.encode()), .migDataWrite(mw))
        // Server-to-client commands have their own codec.
        let dmaw = DMAAccess(address: 0x1000, count: 2, data: [5, 6])
        XCTAssertEqual(try DMAAccess(decoding: dmaw.encode()[...], context: "x"), dmaw)
        XCTAssertEqual(dmaw.encode().count, 18, "u64 count, data at +16 (spec and libvfio-user, not QEMU's struct)")
    }

    func testRegionInfoCapsAndArgszNegotiation() throws {
        let info = RegionInfo(flags: [.read, .write, .mmap], index: 9, size: 0x101000,
                              sparseAreas: [.init(offset: 0x1000, size: 0x100000)], type: (3, 1))
        let short = info.encodeReply(requestArgsz: 32)
        XCTAssertFalse(short.includesCaps)
        XCTAssertEqual(short.bytes.count, 32)
        let d0 = try RegionInfo(decoding: short.bytes[...])
        XCTAssertEqual(Int(d0.argsz), info.fullSize, "a short argsz gets the size needed")
        XCTAssertFalse(d0.flags.contains(.caps), "no CAPS flag without the caps (QEMU 11.1's vfio-user-pci refuses CAPS with cap_offset 0)")
        let full = info.encodeReply(requestArgsz: 1024)
        let d = try RegionInfo(decoding: full.bytes[...])
        XCTAssertEqual(d.flags, info.flags.union(.caps))
        XCTAssertEqual(d.sparseAreas, info.sparseAreas)
        XCTAssertEqual(d.type?.type, 3); XCTAssertEqual(d.type?.subtype, 1)
        XCTAssertEqual(d.size, info.size); XCTAssertEqual(d.capOffset, 32)
        // A looping capability chain is refused, not followed forever.
        var loop = full.bytes
        loop[32 + 4] = 32; loop[32 + 5] = 0  // first cap's next points to itself
        XCTAssertThrowsError(try RegionInfo(decoding: loop[...]))
    }

    func testRegionIOFDsDecodesSpecAndLibvfioUserStrides() throws {
        let spec = RegionIOFDsReply(index: 0, entries: [.init(offset: 0x10, size: 4, fdIndex: 0, type: 0, flags: 0, datamatch: 0xabc)])
        XCTAssertEqual(try RegionIOFDsReply(decoding: spec.encode()[...]).entries, spec.entries)
        // libvfio-user: 48-byte entries, datamatch at +40.
        var w = WireWriter(); w.u32(16 + 48); w.u32(0); w.u32(0); w.u32(1)
        w.u64(0x10); w.u64(4); w.u32(0); w.u32(0); w.u32(0); w.u32(0); w.u64(0); w.u64(0xabc)
        XCTAssertEqual(try RegionIOFDsReply(decoding: w.bytes[...]).entries.first?.datamatch, 0xabc)
    }

    func testDecoderRejectsWhatTheSpecForbids() {
        func fails(_ cmd: UInt16, _ payload: [UInt8], fds: Int = 0, _ errno: Errno) {
            let h = MessageHeader(messageID: 1, command: cmd, messageSize: UInt32(16 + payload.count), flags: 0)
            XCTAssertThrowsError(try VFIOUserRequest.decode(header: h, payload: payload[...], fdCount: fds)) {
                XCTAssertEqual(($0 as? VFIOUserRequest.DecodeError)?.errno, errno, "command \(cmd)")
            }
        }
        fails(99, [], .ENOSYS)
        fails(VFIOUserCommand.regionRead.rawValue, [1, 2, 3], .EINVAL)  // truncated
        fails(VFIOUserCommand.regionRead.rawValue, RegionAccess(offset: 0, region: 0, count: 4).encode(), fds: 1, .EINVAL)
        fails(VFIOUserCommand.regionRead.rawValue, RegionAccess(offset: 0, region: 0, count: 2 << 20).encode(), .E2BIG)
        fails(VFIOUserCommand.regionWrite.rawValue, RegionAccess(offset: 0, region: 0, count: 8, data: [1]).encode(), .EINVAL)
        fails(VFIOUserCommand.dmaMap.rawValue, DMAMapRequest(flags: [.read], offset: 0, address: 0, size: 4096).encode(), fds: 2, .EINVAL)
        fails(VFIOUserCommand.dmaMap.rawValue, DMAMapRequest(flags: [.read], offset: 0, address: 0, size: 0).encode(), .EINVAL)
        fails(VFIOUserCommand.dmaUnmap.rawValue, DMAUnmapRequest(flags: [.unmapAll, .getDirtyBitmap], address: 0, size: 0, bitmap: .init(pageSize: 4096, size: 8)).encode(), .EINVAL)
        fails(VFIOUserCommand.deviceSetIRQs.rawValue, SetIRQsRequest(flags: [.dataEventFD, .dataBool, .actionTrigger], index: 0, start: 0, count: 1, bools: [1]).encode(), .EINVAL)
        fails(VFIOUserCommand.deviceSetIRQs.rawValue, SetIRQsRequest(flags: [.dataEventFD, .actionTrigger], index: 0, start: 0, count: 2).encode(), fds: 1, .EINVAL)
        fails(VFIOUserCommand.deviceFeature.rawValue, DeviceFeature(flags: 1 | DeviceFeature.get | DeviceFeature.set).encode(), .EINVAL)
        fails(VFIOUserCommand.dmaRead.rawValue, DMAAccess(address: 0, count: 0).encode(), .EINVAL)
        var mr = WireWriter(); mr.u32(8); mr.u32(4096)
        fails(VFIOUserCommand.migDataRead.rawValue, mr.bytes, .EINVAL)  // argsz too small for size
        fails(VFIOUserCommand.migDataWrite.rawValue, MigDataPayload(argsz: 8, size: 4, data: [1, 2, 3, 4]).encode(), .EINVAL)  // argsz too small for size
    }
}
