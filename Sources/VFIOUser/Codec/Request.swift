import SystemCalls

/// A decoded client→server command. `decode` checks every length, count and fd count before a
/// handler sees the request; this is the surface the fuzz harness drives.
public enum VFIOUserRequest: Equatable {
    case version(VersionPayload)
    case dmaMap(DMAMapRequest)
    case dmaUnmap(DMAUnmapRequest)
    case deviceGetInfo(DeviceInfo)
    case deviceGetRegionInfo(argsz: UInt32, index: UInt32)
    case deviceGetRegionIOFDs(RegionIOFDsRequest)
    case deviceGetIRQInfo(IRQInfo)
    case deviceSetIRQs(SetIRQsRequest)
    case regionRead(RegionAccess)
    case regionWrite(RegionAccess)
    case deviceReset
    case dirtyPages(DirtyPagesRequest)
    case regionWriteMulti(RegionWriteMulti)
    case deviceFeature(DeviceFeature)
    case migDataRead(argsz: UInt32, size: UInt32)
    case migDataWrite(MigDataPayload)

    /// Limits a decoder enforces (from the negotiated capabilities).
    public struct Limits: Sendable {
        public var maxDataXferSize: UInt64
        public var maxFDs: Int
        public init(maxDataXferSize: UInt64 = Capabilities.defaultMaxDataXferSize, maxFDs: Int = 8) {
            self.maxDataXferSize = maxDataXferSize; self.maxFDs = maxFDs
        }
    }

    /// The errno to reply with, and the reason to log, for a request that fails to decode.
    public struct DecodeError: Error, CustomStringConvertible {
        public var errno: Errno
        public var reason: String
        public var description: String { reason }
    }

    public static func decode(header h: MessageHeader, payload p: ArraySlice<UInt8>, fdCount: Int,
                              limits: Limits = Limits()) throws -> VFIOUserRequest {
        func fail(_ e: Errno, _ why: String) -> DecodeError { DecodeError(errno: e, reason: why) }
        guard h.isCommand else { throw fail(.EINVAL, "message type \(h.flags & MessageHeader.typeMask) is not a command") }
        guard let cmd = h.knownCommand else { throw fail(.ENOSYS, "unknown command \(h.command)") }
        func noFDs() throws {
            if fdCount != 0 { throw fail(.EINVAL, "\(cmd) carries \(fdCount) fds but takes none") }
        }
        do {
            switch cmd {
            case .version:
                try noFDs()
                return .version(try VersionPayload(decoding: p))
            case .dmaMap:
                let m = try DMAMapRequest(decoding: p)
                guard fdCount <= 1 else { throw fail(.EINVAL, "DMA_MAP carries \(fdCount) fds (at most 1)") }
                guard m.argsz >= UInt32(DMAMapRequest.size) else { throw fail(.EINVAL, "DMA_MAP argsz \(m.argsz) < 32") }
                guard m.size > 0 else { throw fail(.EINVAL, "DMA_MAP of size 0") }
                guard m.address &+ m.size > m.address || m.address &+ m.size == 0 else { throw fail(.EINVAL, "DMA_MAP range wraps around") }
                let unknown = m.flags.rawValue & ~(DMAMapFlags.read.rawValue | DMAMapFlags.write.rawValue | DMAMapFlags.lvuMMap.rawValue | DMAMapFlags.lvuFileIO.rawValue)
                guard unknown == 0 else { throw fail(.EINVAL, "DMA_MAP has unknown flags 0x\(String(unknown, radix: 16))") }
                return .dmaMap(m)
            case .dmaUnmap:
                try noFDs()
                let u = try DMAUnmapRequest(decoding: p)
                let known = DMAUnmapFlags.getDirtyBitmap.rawValue | DMAUnmapFlags.unmapAll.rawValue
                guard u.flags.rawValue & ~known == 0 else { throw fail(.EINVAL, "DMA_UNMAP has unknown flags 0x\(String(u.flags.rawValue, radix: 16))") }
                if u.flags.contains(.unmapAll) {
                    guard !u.flags.contains(.getDirtyBitmap) else { throw fail(.EINVAL, "DMA_UNMAP: UNMAP_ALL cannot be combined with GET_DIRTY_BITMAP") }
                    guard u.address == 0, u.size == 0 else { throw fail(.EINVAL, "DMA_UNMAP: UNMAP_ALL needs addr = size = 0") }
                }
                // argsz is the reply buffer: too small for the echo is refused before acting
                // (the kernel's argsz < minsz rule).
                let minArgsz: UInt32 = u.bitmap == nil ? 24 : 40
                guard u.argsz >= minArgsz else { throw fail(.EINVAL, "DMA_UNMAP argsz \(u.argsz) < \(minArgsz)") }
                return .dmaUnmap(u)
            case .deviceGetInfo:
                try noFDs()
                let i = try DeviceInfo(decoding: p)
                guard i.argsz >= 16 else { throw fail(.EINVAL, "DEVICE_GET_INFO argsz \(i.argsz) < 16") }
                return .deviceGetInfo(i)
            case .deviceGetRegionInfo:
                try noFDs()
                var r = WireReader(p, context: "DEVICE_GET_REGION_INFO")
                let argsz = try r.u32(); _ = try r.u32(); let index = try r.u32()
                guard argsz >= UInt32(RegionInfo.baseSize) else { throw fail(.EINVAL, "DEVICE_GET_REGION_INFO argsz \(argsz) < 32") }
                return .deviceGetRegionInfo(argsz: argsz, index: index)
            case .deviceGetRegionIOFDs:
                try noFDs()
                let q = try RegionIOFDsRequest(decoding: p)
                guard q.argsz >= 16 else { throw fail(.EINVAL, "DEVICE_GET_REGION_IO_FDS argsz \(q.argsz) < 16") }
                return .deviceGetRegionIOFDs(q)
            case .deviceGetIRQInfo:
                try noFDs()
                let q = try IRQInfo(decoding: p)
                guard q.argsz >= 16 else { throw fail(.EINVAL, "DEVICE_GET_IRQ_INFO argsz \(q.argsz) < 16") }
                return .deviceGetIRQInfo(q)
            case .deviceSetIRQs:
                let s = try SetIRQsRequest(decoding: p)
                let data = s.flags.intersection(.dataTypes)
                let action = s.flags.intersection(.actions)
                guard s.flags.rawValue & ~(IRQSetFlags.dataTypes.rawValue | IRQSetFlags.actions.rawValue) == 0 else {
                    throw fail(.EINVAL, "DEVICE_SET_IRQS has unknown flags 0x\(String(s.flags.rawValue, radix: 16))")
                }
                guard data.rawValue.nonzeroBitCount == 1 else { throw fail(.EINVAL, "DEVICE_SET_IRQS needs exactly one DATA type") }
                guard action.rawValue.nonzeroBitCount == 1 else { throw fail(.EINVAL, "DEVICE_SET_IRQS needs exactly one ACTION") }
                if data == .dataEventFD {
                    guard fdCount == Int(s.count) || fdCount == 0 else {
                        throw fail(.EINVAL, "DEVICE_SET_IRQS with DATA_EVENTFD: count \(s.count) but \(fdCount) fds")
                    }
                } else if fdCount != 0 {
                    throw fail(.EINVAL, "DEVICE_SET_IRQS carries fds without DATA_EVENTFD")
                }
                return .deviceSetIRQs(s)
            case .regionRead:
                try noFDs()
                let a = try RegionAccess(decoding: p, context: "REGION_READ")
                guard UInt64(a.count) <= limits.maxDataXferSize else {
                    throw fail(.E2BIG, "REGION_READ count \(a.count) exceeds max_data_xfer_size \(limits.maxDataXferSize)")
                }
                return .regionRead(RegionAccess(offset: a.offset, region: a.region, count: a.count))
            case .regionWrite:
                try noFDs()
                let a = try RegionAccess(decoding: p, context: "REGION_WRITE")
                guard UInt64(a.count) <= limits.maxDataXferSize else {
                    throw fail(.E2BIG, "REGION_WRITE count \(a.count) exceeds max_data_xfer_size \(limits.maxDataXferSize)")
                }
                guard a.data.count == Int(a.count) else {
                    throw fail(.EINVAL, "REGION_WRITE count \(a.count) but \(a.data.count) data bytes")
                }
                return .regionWrite(a)
            case .deviceReset:
                try noFDs()
                return .deviceReset
            case .dirtyPages:
                try noFDs()
                let d = try DirtyPagesRequest(decoding: p)
                guard d.argsz >= 8 else { throw fail(.EINVAL, "DIRTY_PAGES argsz \(d.argsz) < 8") }
                return .dirtyPages(d)
            case .regionWriteMulti:
                try noFDs()
                return .regionWriteMulti(try RegionWriteMulti(decoding: p))
            case .deviceFeature:
                try noFDs()
                let f = try DeviceFeature(decoding: p)
                let known = DeviceFeature.indexMask | DeviceFeature.get | DeviceFeature.set | DeviceFeature.probe
                guard f.flags & ~known == 0 else { throw fail(.EINVAL, "DEVICE_FEATURE has unknown flags 0x\(String(f.flags, radix: 16))") }
                guard !(f.isGet && f.isSet) || f.isProbe else { throw fail(.EINVAL, "DEVICE_FEATURE: GET and SET together without PROBE") }
                // argsz covers the whole struct the client holds: at least what it sent.
                guard UInt64(f.argsz) >= 8 + UInt64(f.data.count) else {
                    throw fail(.EINVAL, "DEVICE_FEATURE argsz \(f.argsz) < the \(8 + f.data.count) bytes sent")
                }
                return .deviceFeature(f)
            case .migDataRead:
                try noFDs()
                var r = WireReader(p, context: "MIG_DATA_READ")
                let argsz = try r.u32(), size = try r.u32()
                guard UInt64(size) <= limits.maxDataXferSize else {
                    throw fail(.EINVAL, "MIG_DATA_READ size \(size) exceeds max_data_xfer_size \(limits.maxDataXferSize)")
                }
                guard UInt64(argsz) >= 8 + UInt64(size) else { throw fail(.EINVAL, "MIG_DATA_READ argsz \(argsz) < 8 + size \(size)") }
                return .migDataRead(argsz: argsz, size: size)
            case .migDataWrite:
                try noFDs()
                let m = try MigDataPayload(decoding: p, context: "MIG_DATA_WRITE", dataBySize: false)
                guard UInt64(m.size) <= limits.maxDataXferSize else {
                    throw fail(.EINVAL, "MIG_DATA_WRITE size \(m.size) exceeds max_data_xfer_size \(limits.maxDataXferSize)")
                }
                guard m.data.count == Int(m.size) else { throw fail(.EINVAL, "MIG_DATA_WRITE size \(m.size) but \(m.data.count) data bytes") }
                // argsz covers the struct the client holds, as for MIG_DATA_READ: the fast path
                // refuses the same message, so both paths give it the same answer.
                guard UInt64(m.argsz) >= 8 + UInt64(m.size) else { throw fail(.EINVAL, "MIG_DATA_WRITE argsz \(m.argsz) < 8 + size \(m.size)") }
                return .migDataWrite(m)
            case .dmaRead, .dmaWrite:
                throw fail(.EINVAL, "\(cmd) is a server-to-client command")
            }
        } catch let e as WireError {
            throw fail(e.errno, e.description)
        }
    }
}
