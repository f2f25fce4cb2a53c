import SystemCalls

// Payload layouts of every vfio-user command, byte-exact to the spec (offsets relative to the
// end of the 16-byte header). Each type has `encode()` and a throwing `init(decoding:)` that
// never reads past the payload.

/// Negotiated capabilities, the `capabilities` object of VERSION's JSON.
public struct Capabilities: Equatable, Sendable {
    public static let defaultMaxDataXferSize: UInt64 = 1 << 20
    public var maxMessageFDs: UInt64 = 1
    public var maxDataXferSize: UInt64 = Capabilities.defaultMaxDataXferSize
    public var maxDMAMaps: UInt64 = 65535
    public var pageSizes: UInt64 = 4096
    /// twin_socket: nil when absent; `fdIndex` only in a reply.
    public var twinSocket: TwinSocket?
    public var writeMultiple: Bool?
    /// The migration-v1-era `migration` object (`pgsize`, `max_bitmap_size`) that
    /// libvfio-user still parses and sends.
    public var migration: MigrationCap?
    /// Which keys were present (so that a reply can echo only what it knows was offered).
    public var present: Set<String> = []
    /// When set, `json` emits only these of the four numeric keys (a reply's capabilities are
    /// a subset of the client's: the spec).
    public var emitOnly: Set<String>?

    public struct TwinSocket: Equatable, Sendable {
        public var supported: Bool
        public var fdIndex: UInt64?
        public init(supported: Bool, fdIndex: UInt64? = nil) { self.supported = supported; self.fdIndex = fdIndex }
    }
    public struct MigrationCap: Equatable, Sendable {
        public var pageSize: UInt64
        public var maxBitmapSize: UInt64?
        public init(pageSize: UInt64, maxBitmapSize: UInt64? = nil) { self.pageSize = pageSize; self.maxBitmapSize = maxBitmapSize }
    }

    public init() {}

    public var json: JSONValue {
        var caps: [(String, JSONValue)] = [
            ("max_msg_fds", .number(Double(maxMessageFDs))),
            ("max_data_xfer_size", .number(Double(maxDataXferSize))),
            ("max_dma_maps", .number(Double(maxDMAMaps))),
            ("pgsizes", .number(Double(pageSizes))),
        ].filter { emitOnly?.contains($0.0) ?? true }
        if let t = twinSocket {
            var o: [(String, JSONValue)] = [("supported", .bool(t.supported))]
            if let i = t.fdIndex { o.append(("fd_index", .number(Double(i)))) }
            caps.append(("twin_socket", .object(o)))
        }
        if let wm = writeMultiple { caps.append(("write_multiple", .bool(wm))) }
        if let m = migration {
            var o: [(String, JSONValue)] = [("pgsize", .number(Double(m.pageSize)))]
            if let mb = m.maxBitmapSize { o.append(("max_bitmap_size", .number(Double(mb)))) }
            caps.append(("migration", .object(o)))
        }
        return .object([("capabilities", .object(caps))])
    }

    /// Parse `{"capabilities": {...}}`; unknown keys are accepted, wrong types are errors.
    public init(json: JSONValue) throws {
        guard case .object = json else { throw WireError.invalid("VERSION capabilities: top level is not an object") }
        guard let caps = json["capabilities"] else { return }
        guard case let .object(members) = caps else { throw WireError.invalid("VERSION: \"capabilities\" is not an object") }
        func number(_ key: String) throws -> UInt64? {
            guard let v = caps[key] else { return nil }
            guard let n = v.uint64 else { throw WireError.invalid("VERSION: capability \(key) is not a non-negative integer") }
            return n
        }
        present = Set(members.map(\.0))
        if let v = try number("max_msg_fds") { maxMessageFDs = v }
        if let v = try number("max_data_xfer_size") { maxDataXferSize = v }
        if let v = try number("max_dma_maps") { maxDMAMaps = v }
        if let v = try number("pgsizes") { pageSizes = v }
        if let t = caps["twin_socket"] {
            guard case .object = t else { throw WireError.invalid("VERSION: twin_socket is not an object") }
            let supported = t["supported"]?.boolValue ?? false
            var idx: UInt64? = nil
            if let i = t["fd_index"] {
                guard let n = i.uint64 else { throw WireError.invalid("VERSION: twin_socket.fd_index is not an integer") }
                idx = n
            }
            twinSocket = TwinSocket(supported: supported, fdIndex: idx)
        }
        if let wm = caps["write_multiple"] {
            guard let b = wm.boolValue else { throw WireError.invalid("VERSION: write_multiple is not a boolean") }
            writeMultiple = b
        }
        if let m = caps["migration"] {
            guard case .object = m else { throw WireError.invalid("VERSION: migration is not an object") }
            guard let pg = m["pgsize"]?.uint64 else { throw WireError.invalid("VERSION: migration.pgsize missing or not an integer") }
            migration = MigrationCap(pageSize: pg, maxBitmapSize: m["max_bitmap_size"]?.uint64)
        }
    }
}

/// VERSION (1) request and reply: major, minor, NUL-terminated JSON.
public struct VersionPayload: Equatable, Sendable {
    public var major: UInt16
    public var minor: UInt16
    public var capabilities: Capabilities
    public var rawJSON: String?

    public init(major: UInt16 = 0, minor: UInt16 = 2, capabilities: Capabilities) {
        self.major = major; self.minor = minor; self.capabilities = capabilities
    }

    public func encode() -> [UInt8] {
        var w = WireWriter()
        w.u16(major); w.u16(minor)
        w.append(Array(capabilities.json.description.utf8)); w.u8(0)
        return w.bytes
    }

    public init(decoding payload: ArraySlice<UInt8>) throws {
        var r = WireReader(payload, context: "VERSION")
        major = try r.u16(); minor = try r.u16()
        var json = r.rest()
        // The spec's JSON includes the terminating NUL; tolerate its absence and trailing NULs.
        while let last = json.last, last == 0 { json = json.dropLast() }
        if json.isEmpty {
            capabilities = Capabilities()
        } else {
            guard json.count <= 64 * 1024 else { throw WireError.invalid("VERSION: capabilities JSON larger than 64 KiB") }
            capabilities = try Capabilities(json: try JSONValue.parse(json))
            rawJSON = String(decoding: json, as: UTF8.self)
        }
    }
}

public struct DMAMapFlags: OptionSet, Sendable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    public static let read = DMAMapFlags(rawValue: 1 << 0)
    public static let write = DMAMapFlags(rawValue: 1 << 1)
    /// libvfio-user extensions.
    public static let lvuMMap = DMAMapFlags(rawValue: 1 << 2)
    public static let lvuFileIO = DMAMapFlags(rawValue: 1 << 3)
}

/// DMA_MAP (2) request, 32 bytes.
public struct DMAMapRequest: Equatable, Sendable {
    public static let size = 32
    public var argsz: UInt32 = 32
    public var flags: DMAMapFlags
    public var offset: UInt64
    public var address: UInt64
    public var size: UInt64

    public init(flags: DMAMapFlags, offset: UInt64, address: UInt64, size: UInt64) {
        self.flags = flags; self.offset = offset; self.address = address; self.size = size
    }
    public static func == (a: Self, b: Self) -> Bool {
        a.argsz == b.argsz && a.flags.rawValue == b.flags.rawValue && a.offset == b.offset && a.address == b.address && a.size == b.size
    }
    public func encode() -> [UInt8] {
        var w = WireWriter(capacity: 32)
        w.u32(argsz); w.u32(flags.rawValue); w.u64(offset); w.u64(address); w.u64(size)
        return w.bytes
    }
    public init(decoding p: ArraySlice<UInt8>) throws {
        var r = WireReader(p, context: "DMA_MAP")
        argsz = try r.u32(); flags = DMAMapFlags(rawValue: try r.u32())
        offset = try r.u64(); address = try r.u64(); size = try r.u64()
    }
}

public struct DMAUnmapFlags: OptionSet, Sendable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    public static let getDirtyBitmap = DMAUnmapFlags(rawValue: 1 << 0)
    public static let unmapAll = DMAUnmapFlags(rawValue: 1 << 1)
}

/// DMA_UNMAP (3): 24 bytes, plus a 16-byte `{pgsize, size}` bitmap header with GET_DIRTY_BITMAP.
/// The reply echoes the 24 bytes, then (with the flag) the bitmap header and the bitmap.
public struct DMAUnmapRequest: Equatable, Sendable {
    public var argsz: UInt32
    public var flags: DMAUnmapFlags
    public var address: UInt64
    public var size: UInt64
    public var bitmap: BitmapHeader?

    public struct BitmapHeader: Equatable, Sendable {
        public var pageSize: UInt64
        public var size: UInt64
        public init(pageSize: UInt64, size: UInt64) { self.pageSize = pageSize; self.size = size }
    }

    public init(argsz: UInt32 = 24, flags: DMAUnmapFlags = [], address: UInt64, size: UInt64, bitmap: BitmapHeader? = nil) {
        self.argsz = argsz; self.flags = flags; self.address = address; self.size = size; self.bitmap = bitmap
    }
    public static func == (a: Self, b: Self) -> Bool {
        a.argsz == b.argsz && a.flags.rawValue == b.flags.rawValue && a.address == b.address && a.size == b.size && a.bitmap == b.bitmap
    }
    public func encode() -> [UInt8] {
        var w = WireWriter(capacity: 40)
        w.u32(argsz); w.u32(flags.rawValue); w.u64(address); w.u64(size)
        if let b = bitmap { w.u64(b.pageSize); w.u64(b.size) }
        return w.bytes
    }
    public init(decoding p: ArraySlice<UInt8>) throws {
        var r = WireReader(p, context: "DMA_UNMAP")
        argsz = try r.u32(); flags = DMAUnmapFlags(rawValue: try r.u32())
        address = try r.u64(); size = try r.u64()
        if flags.contains(.getDirtyBitmap) {
            bitmap = BitmapHeader(pageSize: try r.u64(), size: try r.u64())
        }
    }
}

/// DEVICE_GET_INFO (4): `{argsz, flags, num_regions, num_irqs}`; a longer kernel-style reply
/// (with cap_offset) is accepted.
public struct DeviceInfo: Equatable, Sendable {
    public static let flagReset: UInt32 = 1 << 0
    public static let flagPCI: UInt32 = 1 << 1
    public var argsz: UInt32 = 16
    public var flags: UInt32
    public var regionCount: UInt32
    public var irqCount: UInt32

    public init(flags: UInt32, regionCount: UInt32, irqCount: UInt32) {
        self.flags = flags; self.regionCount = regionCount; self.irqCount = irqCount
    }
    public func encode() -> [UInt8] {
        var w = WireWriter(capacity: 16)
        w.u32(argsz); w.u32(flags); w.u32(regionCount); w.u32(irqCount)
        return w.bytes
    }
    public init(decoding p: ArraySlice<UInt8>) throws {
        var r = WireReader(p, context: "DEVICE_GET_INFO")
        argsz = try r.u32(); flags = try r.u32(); regionCount = try r.u32(); irqCount = try r.u32()
    }
}

public struct RegionFlags: OptionSet, Hashable, Sendable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    public static let read = RegionFlags(rawValue: 1 << 0)
    public static let write = RegionFlags(rawValue: 1 << 1)
    public static let mmap = RegionFlags(rawValue: 1 << 2)
    public static let caps = RegionFlags(rawValue: 1 << 3)
}

public struct SparseMMapArea: Equatable, Sendable {
    public var offset: UInt64
    public var size: UInt64
    public init(offset: UInt64, size: UInt64) { self.offset = offset; self.size = size }
}

/// DEVICE_GET_REGION_INFO (5): `struct vfio_region_info` plus the capability chain.
public struct RegionInfo: Equatable, Sendable {
    public static let baseSize = 32
    public var argsz: UInt32
    public var flags: RegionFlags
    public var index: UInt32
    public var capOffset: UInt32 = 0
    public var size: UInt64
    public var offset: UInt64
    public var sparseAreas: [SparseMMapArea]?
    public var type: (type: UInt32, subtype: UInt32)?

    public init(argsz: UInt32 = 32, flags: RegionFlags, index: UInt32, size: UInt64, offset: UInt64 = 0,
                sparseAreas: [SparseMMapArea]? = nil, type: (UInt32, UInt32)? = nil) {
        self.argsz = argsz; self.flags = flags; self.index = index; self.size = size; self.offset = offset
        self.sparseAreas = sparseAreas; self.type = type
    }

    public static func == (a: Self, b: Self) -> Bool {
        a.flags == b.flags && a.index == b.index && a.size == b.size && a.offset == b.offset &&
            a.sparseAreas == b.sparseAreas && a.type?.type == b.type?.type && a.type?.subtype == b.type?.subtype
    }

    /// The capability chain bytes (relative offsets start at 32, the end of the fixed part).
    public func capabilityBytes() -> [UInt8] {
        var w = WireWriter()
        var caps: [(id: UInt16, body: [UInt8])] = []
        if let areas = sparseAreas {
            var b = WireWriter()
            b.u32(UInt32(areas.count)); b.u32(0)
            for a in areas { b.u64(a.offset); b.u64(a.size) }
            caps.append((1, b.bytes))
        }
        if let t = type {
            var b = WireWriter(); b.u32(t.type); b.u32(t.subtype)
            caps.append((2, b.bytes))
        }
        var at = RegionInfo.baseSize
        for (i, c) in caps.enumerated() {
            let len = 8 + c.body.count
            let next = i + 1 < caps.count ? UInt32(at + len) : 0
            w.u16(c.id); w.u16(1); w.u32(next); w.append(c.body)
            at += len
        }
        return w.bytes
    }

    /// Full reply size (fixed part + caps).
    public var fullSize: Int { RegionInfo.baseSize + capabilityBytes().count }

    /// Encode a reply honouring the requester's argsz: if it is too small for the caps, the
    /// spec says send what fits with argsz set to the size needed.
    public func encodeReply(requestArgsz: UInt32) -> (bytes: [UInt8], includesCaps: Bool) {
        let caps = capabilityBytes()
        let full = RegionInfo.baseSize + caps.count
        let fits = Int(requestArgsz) >= full
        // CAPS only with the caps themselves: QEMU's vfio-user client refuses (EINVAL) a reply
        // that has CAPS with cap_offset 0 before it looks at the larger argsz and asks again.
        var f = flags
        if fits && !caps.isEmpty { f.insert(.caps) }
        var w = WireWriter(capacity: full)
        w.u32(UInt32(full)); w.u32(f.rawValue); w.u32(index)
        w.u32(fits && !caps.isEmpty ? UInt32(RegionInfo.baseSize) : 0)
        w.u64(size); w.u64(offset)
        if fits { w.append(caps) }
        return (w.bytes, fits && !caps.isEmpty)
    }

    public func encodeRequest() -> [UInt8] {
        var w = WireWriter(capacity: 32)
        w.u32(argsz); w.u32(0); w.u32(index); w.u32(0); w.u64(0); w.u64(0)
        return w.bytes
    }

    public init(decoding p: ArraySlice<UInt8>) throws {
        var r = WireReader(p, context: "DEVICE_GET_REGION_INFO")
        argsz = try r.u32(); flags = RegionFlags(rawValue: try r.u32()); index = try r.u32()
        capOffset = try r.u32(); size = try r.u64(); offset = try r.u64()
        guard flags.contains(.caps), capOffset != 0 else { return }
        // Walk the chain; offsets are from the start of the payload. Bound the walk so a
        // looping chain cannot hang the decoder.
        var off = Int(capOffset)
        var hops = 0
        while off != 0 {
            hops += 1
            guard hops <= 16 else { throw WireError.invalid("region info: capability chain too long or looping") }
            guard off >= RegionInfo.baseSize, off + 8 <= p.count else {
                throw WireError.invalid("region info: capability offset \(off) outside the \(p.count)-byte reply")
            }
            var c = WireReader(p[(p.startIndex + off)...], context: "region info capability")
            let id = try c.u16(); _ = try c.u16(); let next = try c.u32()
            switch id {
            case 1:
                let n = try c.u32(); _ = try c.u32()
                guard n <= 1024 else { throw WireError.invalid("region info: \(n) sparse mmap areas (at most 1024)") }
                var areas: [SparseMMapArea] = []
                for _ in 0..<n { areas.append(SparseMMapArea(offset: try c.u64(), size: try c.u64())) }
                sparseAreas = areas
            case 2:
                type = (try c.u32(), try c.u32())
            default:
                break  // unknown capabilities are skipped
            }
            guard next == 0 || Int(next) > off else { throw WireError.invalid("region info: capability chain goes backwards") }
            off = Int(next)
        }
    }
}

/// DEVICE_GET_REGION_IO_FDS (6).
public struct RegionIOFDsRequest: Equatable, Sendable {
    public var argsz: UInt32
    public var flags: UInt32 = 0
    public var index: UInt32
    public var count: UInt32 = 0
    public init(argsz: UInt32, index: UInt32) { self.argsz = argsz; self.index = index }
    public func encode() -> [UInt8] { var w = WireWriter(); w.u32(argsz); w.u32(flags); w.u32(index); w.u32(count); return w.bytes }
    public init(decoding p: ArraySlice<UInt8>) throws {
        var r = WireReader(p, context: "DEVICE_GET_REGION_IO_FDS")
        argsz = try r.u32(); flags = try r.u32(); index = try r.u32(); count = try r.u32()
    }
}

public struct RegionIOFDEntry: Equatable, Sendable {
    public var offset: UInt64
    public var size: UInt64
    public var fdIndex: UInt32
    public var type: UInt32
    public var flags: UInt32
    public var datamatch: UInt64
    public init(offset: UInt64, size: UInt64, fdIndex: UInt32, type: UInt32, flags: UInt32, datamatch: UInt64) {
        self.offset = offset; self.size = size; self.fdIndex = fdIndex; self.type = type; self.flags = flags; self.datamatch = datamatch
    }
}

public struct RegionIOFDsReply: Equatable, Sendable {
    public var argsz: UInt32
    public var flags: UInt32
    public var index: UInt32
    public var entries: [RegionIOFDEntry]

    public init(argsz: UInt32 = 0, flags: UInt32 = 0, index: UInt32, entries: [RegionIOFDEntry]) {
        self.argsz = argsz; self.flags = flags; self.index = index; self.entries = entries
    }

    /// Spec layout: 40-byte entries with datamatch at +32.
    public func encode() -> [UInt8] {
        var w = WireWriter()
        w.u32(UInt32(16 + 40 * entries.count)); w.u32(flags); w.u32(index); w.u32(UInt32(entries.count))
        for e in entries { w.u64(e.offset); w.u64(e.size); w.u32(e.fdIndex); w.u32(e.type); w.u32(e.flags); w.u32(0); w.u64(e.datamatch) }
        return w.bytes
    }

    /// Stride comes from the reply (`(argsz - 16) / count`), so libvfio-user's 48-byte entries
    /// decode too; for those, datamatch is at +40.
    public init(decoding p: ArraySlice<UInt8>) throws {
        var r = WireReader(p, context: "DEVICE_GET_REGION_IO_FDS reply")
        argsz = try r.u32(); flags = try r.u32(); index = try r.u32()
        let count = try r.u32()
        entries = []
        guard count > 0 else { return }
        guard count <= 1024 else { throw WireError.invalid("region io fds: \(count) entries (at most 1024)") }
        let body = min(Int(argsz), p.count) - 16
        let stride = body / Int(count)
        guard stride >= 40 else { throw WireError.invalid("region io fds: entry stride \(stride) is less than 40 bytes") }
        for i in 0..<Int(count) {
            var e = WireReader(p[(p.startIndex + 16 + i * stride)..<(p.startIndex + 16 + (i + 1) * stride)], context: "region io fd entry")
            let off = try e.u64(), sz = try e.u64(), fdi = try e.u32(), ty = try e.u32(), fl = try e.u32()
            _ = try e.u32()
            var dm = try e.u64()
            if stride >= 48 { dm = try e.u64() }  // libvfio-user: shadow_offset then datamatch
            entries.append(RegionIOFDEntry(offset: off, size: sz, fdIndex: fdi, type: ty, flags: fl, datamatch: dm))
        }
    }
}

public struct IRQInfoFlags: OptionSet, Sendable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    public static let eventfd = IRQInfoFlags(rawValue: 1 << 0)
    public static let maskable = IRQInfoFlags(rawValue: 1 << 1)
    public static let automasked = IRQInfoFlags(rawValue: 1 << 2)
    public static let noresize = IRQInfoFlags(rawValue: 1 << 3)
}

/// DEVICE_GET_IRQ_INFO (7): `{argsz, flags, index, count}`.
public struct IRQInfo: Equatable, Sendable {
    public var argsz: UInt32 = 16
    public var flags: IRQInfoFlags
    public var index: UInt32
    public var count: UInt32
    public init(flags: IRQInfoFlags, index: UInt32, count: UInt32) { self.flags = flags; self.index = index; self.count = count }
    public static func == (a: Self, b: Self) -> Bool { a.flags.rawValue == b.flags.rawValue && a.index == b.index && a.count == b.count }
    public func encode() -> [UInt8] { var w = WireWriter(); w.u32(argsz); w.u32(flags.rawValue); w.u32(index); w.u32(count); return w.bytes }
    public init(decoding p: ArraySlice<UInt8>) throws {
        var r = WireReader(p, context: "DEVICE_GET_IRQ_INFO")
        argsz = try r.u32(); flags = IRQInfoFlags(rawValue: try r.u32()); index = try r.u32(); count = try r.u32()
    }
}

public struct IRQSetFlags: OptionSet, Sendable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    public static let dataNone = IRQSetFlags(rawValue: 1 << 0)
    public static let dataBool = IRQSetFlags(rawValue: 1 << 1)
    public static let dataEventFD = IRQSetFlags(rawValue: 1 << 2)
    public static let actionMask = IRQSetFlags(rawValue: 1 << 3)
    public static let actionUnmask = IRQSetFlags(rawValue: 1 << 4)
    public static let actionTrigger = IRQSetFlags(rawValue: 1 << 5)
    public static let dataTypes: IRQSetFlags = [.dataNone, .dataBool, .dataEventFD]
    public static let actions: IRQSetFlags = [.actionMask, .actionUnmask, .actionTrigger]
}

/// DEVICE_SET_IRQS (8): 20 bytes plus `count` bools with DATA_BOOL.
public struct SetIRQsRequest: Equatable, Sendable {
    public var argsz: UInt32
    public var flags: IRQSetFlags
    public var index: UInt32
    public var start: UInt32
    public var count: UInt32
    public var bools: [UInt8]

    public init(flags: IRQSetFlags, index: UInt32, start: UInt32, count: UInt32, bools: [UInt8] = []) {
        self.flags = flags; self.index = index; self.start = start; self.count = count; self.bools = bools
        argsz = UInt32(20 + bools.count)
    }
    public static func == (a: Self, b: Self) -> Bool {
        a.flags.rawValue == b.flags.rawValue && a.index == b.index && a.start == b.start && a.count == b.count && a.bools == b.bools
    }
    public func encode() -> [UInt8] {
        var w = WireWriter(); w.u32(argsz); w.u32(flags.rawValue); w.u32(index); w.u32(start); w.u32(count); w.append(bools)
        return w.bytes
    }
    public init(decoding p: ArraySlice<UInt8>) throws {
        var r = WireReader(p, context: "DEVICE_SET_IRQS")
        argsz = try r.u32(); flags = IRQSetFlags(rawValue: try r.u32()); index = try r.u32(); start = try r.u32(); count = try r.u32()
        bools = []
        if flags.contains(.dataBool) {
            guard count <= 4096 else { throw WireError.invalid("DEVICE_SET_IRQS: count \(count) too large for DATA_BOOL") }
            bools = Array(try r.bytes(Int(count)))
        }
    }
}

/// REGION_READ (9) / REGION_WRITE (10): `{offset u64, region u32, count u32}` + data.
public struct RegionAccess: Equatable, Sendable {
    public static let headerSize = 16
    public var offset: UInt64
    public var region: UInt32
    public var count: UInt32
    public var data: ArraySlice<UInt8>

    public init(offset: UInt64, region: UInt32, count: UInt32, data: ArraySlice<UInt8> = []) {
        self.offset = offset; self.region = region; self.count = count; self.data = data
    }
    public func encode() -> [UInt8] {
        var w = WireWriter(capacity: 16 + data.count); w.u64(offset); w.u32(region); w.u32(count); w.append(data)
        return w.bytes
    }
    public init(decoding p: ArraySlice<UInt8>, context: String) throws {
        var r = WireReader(p, context: context)
        offset = try r.u64(); region = try r.u32(); count = try r.u32(); data = r.rest()
    }
}

/// DMA_READ (11) / DMA_WRITE (12), server→client: `{addr u64, count u64}` + data (u64 count,
/// data at +16: the spec and libvfio-user, not QEMU's 32-bit-count struct).
public struct DMAAccess: Equatable, Sendable {
    public static let headerSize = 16
    public var address: UInt64
    public var count: UInt64
    public var data: ArraySlice<UInt8>
    public init(address: UInt64, count: UInt64, data: ArraySlice<UInt8> = []) { self.address = address; self.count = count; self.data = data }
    public func encode() -> [UInt8] {
        var w = WireWriter(capacity: 16 + data.count); w.u64(address); w.u64(count); w.append(data)
        return w.bytes
    }
    public init(decoding p: ArraySlice<UInt8>, context: String) throws {
        var r = WireReader(p, context: context)
        address = try r.u64(); count = try r.u64(); data = r.rest()
    }
}

/// REGION_WRITE_MULTI (15): `{wr_cnt u64}` + entries of `{offset u64, region u32, count u32, data[8]}`.
public struct RegionWriteMulti: Equatable, Sendable {
    public struct Entry: Equatable, Sendable {
        public var offset: UInt64
        public var region: UInt32
        public var count: UInt32
        public var data: [UInt8]
        public init(offset: UInt64, region: UInt32, data: [UInt8]) {
            self.offset = offset; self.region = region; count = UInt32(data.count); self.data = data
        }
    }
    public var entries: [Entry]
    public init(entries: [Entry]) { self.entries = entries }
    public func encode() -> [UInt8] {
        var w = WireWriter(); w.u64(UInt64(entries.count))
        for e in entries {
            w.u64(e.offset); w.u32(e.region); w.u32(e.count)
            var d = e.data; d += [UInt8](repeating: 0, count: max(0, 8 - d.count)); w.append(d.prefix(8))
        }
        return w.bytes
    }
    public init(decoding p: ArraySlice<UInt8>) throws {
        var r = WireReader(p, context: "REGION_WRITE_MULTI")
        let n = try r.u64()
        guard n <= 200 * 8 else { throw WireError.invalid("REGION_WRITE_MULTI: \(n) entries") }
        entries = []
        for _ in 0..<n {
            let off = try r.u64(), reg = try r.u32(), cnt = try r.u32()
            let d = try r.bytes(8)
            guard cnt <= 8 else { throw WireError.invalid("REGION_WRITE_MULTI: entry count \(cnt) exceeds 8 bytes") }
            entries.append(Entry(offset: off, region: reg, data: Array(d.prefix(Int(cnt)))))
        }
    }
}

/// DEVICE_FEATURE (16): `{argsz u32, flags u32, data[]}`.
public struct DeviceFeature: Equatable, Sendable {
    public static let get: UInt32 = 1 << 16
    public static let set: UInt32 = 1 << 17
    public static let probe: UInt32 = 1 << 18
    public static let indexMask: UInt32 = 0xffff

    public static let migration: UInt32 = 1
    public static let migDeviceState: UInt32 = 2
    public static let dmaLoggingStart: UInt32 = 6
    public static let dmaLoggingStop: UInt32 = 7
    public static let dmaLoggingReport: UInt32 = 8
    public static let migDataSize: UInt32 = 9

    public var argsz: UInt32
    public var flags: UInt32
    public var data: ArraySlice<UInt8>

    public init(argsz: UInt32? = nil, flags: UInt32, data: ArraySlice<UInt8> = []) {
        self.flags = flags; self.data = data; self.argsz = argsz ?? UInt32(8 + data.count)
    }
    public var feature: UInt32 { flags & Self.indexMask }
    public var isGet: Bool { flags & Self.get != 0 }
    public var isSet: Bool { flags & Self.set != 0 }
    public var isProbe: Bool { flags & Self.probe != 0 }

    public func encode() -> [UInt8] { var w = WireWriter(); w.u32(argsz); w.u32(flags); w.append(data); return w.bytes }
    public init(decoding p: ArraySlice<UInt8>) throws {
        var r = WireReader(p, context: "DEVICE_FEATURE")
        argsz = try r.u32(); flags = try r.u32(); data = r.rest()
    }
}

/// MIG_DATA_READ (17) / MIG_DATA_WRITE (18): `{argsz u32, size u32, data}`.
public struct MigDataPayload: Equatable, Sendable {
    public var argsz: UInt32
    public var size: UInt32
    public var data: ArraySlice<UInt8>
    public init(argsz: UInt32, size: UInt32, data: ArraySlice<UInt8> = []) { self.argsz = argsz; self.size = size; self.data = data }
    public func encode() -> [UInt8] { var w = WireWriter(capacity: 8 + data.count); w.u32(argsz); w.u32(size); w.append(data); return w.bytes }
    /// Parse by `size`, never by message size: libvfio-user pads MIG_DATA_READ replies to the
    /// requested length.
    public init(decoding p: ArraySlice<UInt8>, context: String, dataBySize: Bool) throws {
        var r = WireReader(p, context: context)
        argsz = try r.u32(); size = try r.u32()
        if dataBySize { data = try r.bytes(Int(size)) } else { data = r.rest() }
    }
}

/// DIRTY_PAGES (14), migration-v1 era: `{argsz, flags}` + for GET_BITMAP a 40-byte range
/// `{iova, size, bitmap {pgsize, size, (data slot)}}`; the reply's bitmap starts at offset 48.
public struct DirtyPagesRequest: Equatable, Sendable {
    public static let start: UInt32 = 1, stop: UInt32 = 2, getBitmap: UInt32 = 4
    public var argsz: UInt32
    public var flags: UInt32
    public var range: (iova: UInt64, size: UInt64, pageSize: UInt64, bitmapSize: UInt64)?
    public init(argsz: UInt32 = 8, flags: UInt32, range: (UInt64, UInt64, UInt64, UInt64)? = nil) {
        self.argsz = argsz; self.flags = flags; self.range = range
    }
    public static func == (a: Self, b: Self) -> Bool {
        a.argsz == b.argsz && a.flags == b.flags && a.range?.iova == b.range?.iova && a.range?.size == b.range?.size &&
            a.range?.pageSize == b.range?.pageSize && a.range?.bitmapSize == b.range?.bitmapSize
    }
    public func encode() -> [UInt8] {
        var w = WireWriter(); w.u32(argsz); w.u32(flags)
        if let r = range { w.u64(r.iova); w.u64(r.size); w.u64(r.pageSize); w.u64(r.bitmapSize); w.u64(0) }
        return w.bytes
    }
    public init(decoding p: ArraySlice<UInt8>) throws {
        var r = WireReader(p, context: "DIRTY_PAGES")
        argsz = try r.u32(); flags = try r.u32()
        if flags & Self.getBitmap != 0 {
            range = (try r.u64(), try r.u64(), try r.u64(), try r.u64())
            _ = try r.u64()
        }
    }
}
