import SystemCalls
import VFIO

/// The vfio-live migration stream (all integers big-endian, as QEMU's stream):
///
///     stream  := header section* END
///     header  := "VLMIGRAT" | version u32 | flags u32
///     section := type u8 | 0 u8[3] | id u32 | length u64 | payload[length] | checksum u64
///
/// The checksum is `Checksum.update` chained over the payload's pieces in order: for RAM the
/// run table, then each run's data; for every other section the whole payload. With header
/// flag 2 (`flagUncheckedPayload`: the payload-checksum capability is off, QEMU's default) a
/// RAM section's checksum covers its run count and table only, and its page data travels
/// unchecked, as in QEMU, which relies on the transport. Sections:
///
///     CONFIG  ram size u64, vCPUs u32, devices u32, page size u32
///     RAM     runs u32, runs × {gpa u64, pages u32, flags u32 (1 = zero pages, no data)}, data
///     DEVICE  device index u32, then QEMU's VFIO records: SETUP, DATA (be64 length + bytes),
///             CONFIG (+ payload), INIT_DATA_SENT, each group ended by END_OF_STATE
///     VCPUS   count u32, count × {regs, sregs, fpu: each u32 length + bytes}
///     END     pages sent u64; since version 2 also flags u32 (1 = the source VM was running
///             at switch-over: the destination resumes; else it stays paused, as QEMU's
///             global run state) and 0 u32
///     MULTIFD channels u32, 0 u32, nonce u64 (multifd only, right after CONFIG)
///     SYNC    pass u64, flags u32 (1 = last), 0 u32: the end of a pass (main and every channel);
///             flags 2 on the main channel: a keep-alive, no barrier. A keep-alive whose pass
///             has bit 63 set is a probe (`probeBit`): once everything before it is applied,
///             this build's destination answers PRG with the rest of the pass, the probe's
///             number, on the back channel. Older destinations ignore keep-alives, and no
///             older source sets the bit, so either side may be older.
///     LIVE_UPDATE  (cpr-transfer / cpr-exec only; no RAM or DEVICE sections then: guest RAM
///             and the devices are handed over as descriptors) vCPUs paused at u64 (CLOCK_MONOTONIC
///             ns, the same clock in both processes), devices u32, devices × MSIs counted u64
public enum MigrationStream {
    public static let magic: [UInt8] = Array("VLMIGRAT".utf8)
    /// Version 2: END carries the source's run state, and the switch-over is two-phase on the
    /// back channel (RDY, GO; see Verdict). Version 1 streams are still read.
    public static let version: UInt32 = 2
    public static let readableVersions: ClosedRange<UInt32> = 1...2
    public static let headerSize = 16
    public static let sectionHeaderSize = 16
    public static let pageSize: UInt64 = 4096
    /// Bounds the destination enforces before it reads a payload.
    public static let maxRuns = 65536
    public static let maxSectionLength: UInt64 = 64 << 20
    /// A keep-alive SYNC's pass with this bit is a probe (see SYNC above).
    public static let probeBit: UInt64 = 1 << 63
    /// SYNC flags 2 (a keep-alive) with pass `probeBit | number`.
    public static func probePayload(_ number: UInt64) -> [UInt8] {
        var w = BEWriter(); w.u64(probeBit | number); w.u32(2); w.u32(0); return w.bytes
    }

    public enum SectionType: UInt8, CustomStringConvertible {
        case config = 1, ram = 2, device = 3, vcpus = 4, end = 5, liveUpdate = 6, multifd = 7, sync = 8
        public var description: String { ["", "CONFIG", "RAM", "DEVICE", "VCPUS", "END", "LIVE_UPDATE", "MULTIFD", "SYNC"][Int(rawValue)] }
    }

    /// Header flag: a live-update stream (no RAM; a LIVE_UPDATE section).
    public static let flagLiveUpdate: UInt32 = 1
    /// Header flag: RAM page data is not covered by the section checksums (capability
    /// x-vfio-live-payload-checksum off). Run tables, lengths and every other section still are.
    public static let flagUncheckedPayload: UInt32 = 2
    /// Header flag: multifd; a MULTIFD section follows CONFIG (see Multifd).
    public static let flagMultifd: UInt32 = 4
    static let knownFlags = flagLiveUpdate | flagUncheckedPayload | flagMultifd

    public static func header(flags: UInt32) -> [UInt8] {
        var h = BEWriter(); h.append(magic); h.u32(version); h.u32(flags); return h.bytes
    }
    public static func configPayload(ramSize: UInt64, vcpus: Int, devices: Int) -> [UInt8] {
        var w = BEWriter(); w.u64(ramSize); w.u32(UInt32(vcpus)); w.u32(UInt32(devices)); w.u32(UInt32(pageSize)); return w.bytes
    }
    /// END: pages sent, and whether the source VM was running (the destination's cue to resume).
    public static func endPayload(pagesSent: UInt64, sourceRunning: Bool) -> [UInt8] {
        var w = BEWriter(); w.u64(pagesSent); w.u32(sourceRunning ? 1 : 0); w.u32(0); return w.bytes
    }
    public static func vcpusPayload(_ states: [VCPUStateBytes]) -> [UInt8] {
        var v = BEWriter()
        v.u32(UInt32(states.count))
        for s in states { for part in [s.regs, s.sregs, s.fpu] { v.u32(UInt32(part.count)); v.append(part) } }
        return v.bytes
    }
    public static func sectionHeader(_ type: SectionType, id: UInt32, length: Int) -> [UInt8] {
        var h = BEWriter(); h.append([type.rawValue, 0, 0, 0]); h.u32(id); h.u64(UInt64(length)); return h.bytes
    }

    /// QEMU's VFIO device-state tags (hw/vfio/vfio-migration-internal.h).
    public enum VFIOTag: UInt64 {
        case endOfState = 0xffff_ffff_ef10_0001
        case configState = 0xffff_ffff_ef10_0002
        case setupState = 0xffff_ffff_ef10_0003
        case dataState = 0xffff_ffff_ef10_0004
        case initDataSent = 0xffff_ffff_ef10_0005
        case configLoadReady = 0xffff_ffff_ef10_0006
    }
}

/// A whole small stream in memory (a live update's: no RAM, a few hundred bytes).
public struct MigrationStreamEncoder {
    public private(set) var bytes: [UInt8]
    private var id: UInt32 = 0
    public init(flags: UInt32) { bytes = MigrationStream.header(flags: flags) }
    public mutating func section(_ type: MigrationStream.SectionType, _ payload: [UInt8]) {
        id &+= 1
        bytes += MigrationStream.sectionHeader(type, id: id, length: payload.count)
        bytes += payload
        var t = BEWriter(); t.u64(payload.withUnsafeBytes { Checksum.update(Checksum.seed, $0) })
        bytes += t.bytes
    }
}

/// A precise reason the destination refused the stream.
public enum StreamError: Error, CustomStringConvertible, Equatable {
    case notAMigrationStream
    case unsupportedVersion(UInt32)
    case unknownSection(UInt8, offset: UInt64)
    case sectionTooLarge(MigrationStream.SectionType, UInt64)
    case checksumMismatch(MigrationStream.SectionType, id: UInt32, offset: UInt64)
    case malformed(MigrationStream.SectionType, id: UInt32, String)
    case configMismatch(String)
    case truncated(offset: UInt64)
    case missingEnd
    /// The source sent nothing for the peer timeout (it hangs, or the link is dead).
    case peerSilent(ms: UInt64)

    public var description: String {
        switch self {
        case .notAMigrationStream: return "not a vfio-live migration stream (bad magic)"
        case let .unsupportedVersion(v): return "unsupported migration stream version \(v) (this build reads \(MigrationStream.readableVersions.lowerBound)-\(MigrationStream.readableVersions.upperBound))"
        case let .unknownSection(t, off): return "unknown section type \(t) at stream offset \(off)"
        case let .sectionTooLarge(t, n): return "\(t) section of \(n) bytes exceeds the \(MigrationStream.maxSectionLength)-byte limit"
        case let .checksumMismatch(t, id, off): return "\(t) section \(id) at stream offset \(off) is corrupt (checksum mismatch)"
        case let .malformed(t, id, why): return "\(t) section \(id): \(why)"
        case let .configMismatch(why): return "the source VM does not match this one: \(why)"
        case let .truncated(off): return "stream ends in the middle of a section (offset \(off))"
        case .missingEnd: return "stream ended without an END section"
        case let .peerSilent(ms): return "the source sent nothing for \(ms) ms (it hangs, or the link is down)"
        }
    }
}

/// Where decoded sections go (the destination VMM; a fuzz harness's null sink).
public protocol MigrationSink: AnyObject {
    func config(ramSize: UInt64, vcpus: UInt32, devices: UInt32) throws
    /// The guest pages [gpa, gpa + pages×4 KiB); `destination` receives the data directly.
    func ramDestination(gpa: UInt64, pages: UInt32) throws -> UnsafeMutableRawBufferPointer
    func ramZero(gpa: UInt64, pages: UInt32) throws
    func deviceSetup(device: UInt32) throws
    func deviceData(device: UInt32, _ data: UnsafeRawBufferPointer) throws
    func deviceConfig(device: UInt32, _ data: ArraySlice<UInt8>) throws
    func deviceInitialDataSent(device: UInt32) throws
    func vcpus(_ states: [VCPUStateBytes]) throws
    func end(pagesSent: UInt64) throws
    /// The source's run state at switch-over (version-2 END, just before `end`).
    func sourceRunState(running: Bool) throws
    /// A live update's VMM-side state (only in live-update streams).
    func liveUpdate(pausedAt: UInt64, interrupts: [UInt64]) throws
    /// Multifd: `channels` extra connections with this nonce in their hello (MULTIFD section).
    func multifd(channels: UInt32, nonce: UInt64) throws
    /// The end of pass `sequence` (SYNC), on the main channel or a multifd channel.
    func sync(sequence: UInt64, last: Bool) throws
    /// A probe on the main channel (a keep-alive SYNC with `probeBit`): every section before
    /// it has been applied.
    func probe(_ number: UInt64) throws
}

extension MigrationSink {
    public func sourceRunState(running: Bool) throws {}
    public func liveUpdate(pausedAt: UInt64, interrupts: [UInt64]) throws {
        throw StreamError.malformed(.liveUpdate, id: 0, "a LIVE_UPDATE section in a migration stream (start the destination with --incoming cpr:unix:PATH for a live update)")
    }
    public func multifd(channels: UInt32, nonce: UInt64) throws {
        throw StreamError.malformed(.multifd, id: 0, "the source asks for \(channels) multifd channels, which this destination does not take")
    }
    public func sync(sequence: UInt64, last: Bool) throws {
        throw StreamError.malformed(.sync, id: 0, "a SYNC section without multifd")
    }
    public func probe(_ number: UInt64) throws {}
}

/// vCPU state as it travels (Machine's VCPUState, without depending on Machine).
public struct VCPUStateBytes: Sendable, Equatable {
    public var regs: [UInt8], sregs: [UInt8], fpu: [UInt8]
    public init(regs: [UInt8], sregs: [UInt8], fpu: [UInt8]) { self.regs = regs; self.sregs = sregs; self.fpu = fpu }
}

/// A byte source the decoder reads exactly from (a socket, or memory for the fuzzer).
public protocol ByteSource: AnyObject {
    func readExactly(_ buffer: UnsafeMutableRawBufferPointer) throws
    /// Fill every buffer in order (a socket does it with readv, straight into guest pages).
    func readExactly(vectors: [UnsafeMutableRawBufferPointer]) throws
}

extension ByteSource {
    public func readExactly(vectors: [UnsafeMutableRawBufferPointer]) throws {
        for v in vectors where v.count > 0 { try readExactly(v) }
    }
}

/// Decodes a stream from a source into a sink, checking every length, bound and checksum
/// before the data is used: a section's data may already be in guest RAM when its checksum
/// fails, but the destination's guest never runs on it (the migration fails).
public final class MigrationStreamDecoder {
    let source: ByteSource
    let sink: MigrationSink
    public private(set) var offset: UInt64 = 0
    public private(set) var sectionsRead = 0
    private var ramSize: UInt64 = 0
    private var devices: UInt32 = 0

    public init(source: ByteSource, sink: MigrationSink) { self.source = source; self.sink = sink }

    /// A multifd channel's decoder: the main stream's CONFIG and flags, given.
    init(channel source: ByteSource, sink: MigrationSink, ramSize: UInt64, devices: UInt32, flags: UInt32) {
        self.source = source; self.sink = sink; self.ramSize = ramSize; self.devices = devices; self.flags = flags
    }

    /// A multifd channel's sections (RAM, DEVICE, SYNC) until its last SYNC.
    func runChannel() throws {
        while true {
            let (type, id, length, start) = try readSectionHeader()
            switch type {
            case .ram:
                let sum = try decodeRAM(id: id, length: length)
                try verify(type, id, start, sum)
            case .device, .sync:
                let payload = try read(Int(length))
                try verify(type, id, start, payload.withUnsafeBytes { Checksum.update(Checksum.seed, $0) })
                if type == .sync {
                    var r = BEReader(payload[...])
                    guard let seq = r.u64(), let f = r.u32(), r.u32() == 0, r.remaining == 0, f & ~1 == 0 else { throw StreamError.malformed(.sync, id: id, "not 16 bytes of pass and flags") }
                    try sink.sync(sequence: seq, last: f & 1 != 0)
                    if f & 1 != 0 { return }
                } else {
                    try apply(type, id: id, payload)
                }
            default:
                throw StreamError.malformed(type, id: id, "a \(type) section on a multifd channel (only RAM, DEVICE and SYNC travel there)")
            }
        }
    }

    /// One section header, checked before anything of its payload is read: a known type, and a
    /// length within `maxSectionLength` (the main stream and every multifd channel alike).
    /// `start` is the header's stream offset, which errors name.
    private func readSectionHeader() throws -> (type: MigrationStream.SectionType, id: UInt32, length: UInt64, start: UInt64) {
        let start = offset
        let h = try read(MigrationStream.sectionHeaderSize)
        guard let type = MigrationStream.SectionType(rawValue: h[0]) else { throw StreamError.unknownSection(h[0], offset: start) }
        let id = Self.be32(h[4...]), length = Self.be64(h[8...])
        guard length <= MigrationStream.maxSectionLength else { throw StreamError.sectionTooLarge(type, length) }
        sectionsRead += 1
        return (type, id, length, start)
    }

    private func read(_ n: Int) throws -> [UInt8] {
        var b = [UInt8](repeating: 0, count: n)
        try readInto(&b)
        return b
    }
    private func readInto(_ b: inout [UInt8]) throws {
        do { try b.withUnsafeMutableBytes { try source.readExactly($0) } } catch let e as Errno where e == .ECONNRESET || e == .EPROTO {
            throw StreamError.truncated(offset: offset)
        }
        offset += UInt64(b.count)
    }
    private func readInto(_ p: UnsafeMutableRawBufferPointer) throws {
        do { try source.readExactly(p) } catch let e as Errno where e == .ECONNRESET || e == .EPROTO {
            throw StreamError.truncated(offset: offset)
        }
        offset += UInt64(p.count)
    }
    private static func be64(_ b: ArraySlice<UInt8>) -> UInt64 { b.prefix(8).reduce(0) { $0 << 8 | UInt64($1) } }
    private static func be32(_ b: ArraySlice<UInt8>) -> UInt32 { b.prefix(4).reduce(0) { $0 << 8 | UInt32($1) } }

    public private(set) var flags: UInt32 = 0
    public private(set) var version: UInt32 = 0

    public func readHeader() throws {
        let h = try read(MigrationStream.headerSize)
        guard Array(h[0..<8]) == MigrationStream.magic else { throw StreamError.notAMigrationStream }
        let v = Self.be32(h[8...])
        guard MigrationStream.readableVersions.contains(v) else { throw StreamError.unsupportedVersion(v) }
        version = v
        flags = Self.be32(h[12...])
        guard flags & ~MigrationStream.knownFlags == 0 else { throw StreamError.malformed(.config, id: 0, "unknown stream flags \(hex(UInt64(flags)))") }
    }

    /// Decode sections until END. Returns when the END section was applied.
    public func run() throws {
        try readHeader()
        var sawConfig = false
        while true {
            let (type, id, length, start) = try readSectionHeader()
            if type != .config && !sawConfig { throw StreamError.malformed(type, id: id, "the stream must start with CONFIG") }
            var sum = Checksum.seed
            if flags & MigrationStream.flagLiveUpdate != 0, type == .ram || type == .device {
                throw StreamError.malformed(type, id: id, "a live-update stream carries no \(type) sections (guest RAM and devices are handed over)")
            }
            switch type {
            case .ram:
                sum = try decodeRAM(id: id, length: length)
            default:
                let payload = try read(Int(length))
                sum = payload.withUnsafeBytes { Checksum.update(sum, $0) }
                try verify(type, id, start, sum)
                try apply(type, id: id, payload)
                if type == .config { sawConfig = true }
                if type == .end { return }
                continue
            }
            try verify(type, id, start, sum)
        }
    }

    private func verify(_ t: MigrationStream.SectionType, _ id: UInt32, _ start: UInt64, _ sum: UInt64) throws {
        let trailer = try read(8)
        guard Self.be64(trailer[...]) == sum else { throw StreamError.checksumMismatch(t, id: id, offset: start) }
    }

    private func decodeRAM(id: UInt32, length: UInt64) throws -> UInt64 {
        func bad(_ why: String) -> StreamError { .malformed(.ram, id: id, why) }
        guard length >= 4 else { throw bad("shorter than its run count") }
        let countBytes = try read(4)
        let runs = Int(Self.be32(countBytes[...]))
        guard runs <= MigrationStream.maxRuns else { throw bad("\(runs) runs (at most \(MigrationStream.maxRuns))") }
        let tableBytes = UInt64(runs) * 16
        guard length >= 4 + tableBytes else { throw bad("\(runs) runs do not fit in \(length) bytes") }
        let table = try read(runs * 16)
        var sum = (countBytes + table).withUnsafeBytes { Checksum.update(Checksum.seed, $0) }
        var dataBytes: UInt64 = 0
        var parsed: [(UInt64, UInt32, Bool)] = []
        for r in 0..<runs {
            let e = table[(r * 16)...]
            let gpa = Self.be64(e), pages = Self.be32(e.dropFirst(8)), flags = Self.be32(e.dropFirst(12))
            guard gpa % MigrationStream.pageSize == 0, pages > 0, flags & ~1 == 0 else {
                throw bad("run \(r): gpa \(hex(gpa)), \(pages) pages, flags \(flags) is not a valid run")
            }
            let bytes = UInt64(pages) * MigrationStream.pageSize
            guard gpa < ramSize, bytes <= ramSize - gpa else {
                throw bad("run \(r): [\(hex(gpa)), +\(hex(bytes))) lies outside guest RAM of \(ramSize) bytes")
            }
            if flags & 1 == 0 { dataBytes += bytes }
            parsed.append((gpa, pages, flags & 1 != 0))
        }
        guard length == 4 + tableBytes + dataBytes else {
            throw bad("length \(length) does not match its runs (\(4 + tableBytes + dataBytes) bytes)")
        }
        if flags & MigrationStream.flagUncheckedPayload != 0 {
            // No payload checksum: one readv puts every run's data at its guest address.
            var vectors: [UnsafeMutableRawBufferPointer] = []
            vectors.reserveCapacity(parsed.count)
            for (gpa, pages, zero) in parsed {
                if zero { try sink.ramZero(gpa: gpa, pages: pages) } else { vectors.append(try sink.ramDestination(gpa: gpa, pages: pages)) }
            }
            do { try source.readExactly(vectors: vectors) } catch let e as Errno where e == .ECONNRESET || e == .EPROTO {
                throw StreamError.truncated(offset: offset)
            }
            offset += dataBytes
            return sum
        }
        for (gpa, pages, zero) in parsed {
            if zero { try sink.ramZero(gpa: gpa, pages: pages); continue }
            let dst = try sink.ramDestination(gpa: gpa, pages: pages)
            try readInto(dst)
            sum = Checksum.update(sum, UnsafeRawBufferPointer(dst))
        }
        return sum
    }

    private func apply(_ type: MigrationStream.SectionType, id: UInt32, _ p: [UInt8]) throws {
        func bad(_ why: String) -> StreamError { .malformed(type, id: id, why) }
        var r = BEReader(p[...])
        switch type {
        case .config:
            guard let size = r.u64(), let vcpus = r.u32(), let devs = r.u32(), let ps = r.u32() else { throw bad("truncated") }
            guard ps == UInt32(MigrationStream.pageSize) else { throw bad("page size \(ps) (only 4096)") }
            guard size > 0, size % MigrationStream.pageSize == 0 else { throw bad("RAM size \(size) is not a whole number of pages") }
            ramSize = size
            devices = devs
            try sink.config(ramSize: size, vcpus: vcpus, devices: devs)
        case .device:
            guard let dev = r.u32() else { throw bad("truncated") }
            guard dev < devices else { throw bad("device \(dev) but the VM has \(devices)") }
            while r.remaining > 0 {
                guard let raw = r.u64() else { throw bad("truncated record tag") }
                guard let tag = MigrationStream.VFIOTag(rawValue: raw) else { throw bad("unknown VFIO record tag \(hex(raw))") }
                switch tag {
                case .endOfState: continue
                case .setupState:
                    guard r.u64() == MigrationStream.VFIOTag.endOfState.rawValue else { throw bad("SETUP STATE: EOS not found") }
                    try sink.deviceSetup(device: dev)
                case .dataState:
                    guard let n = r.u64(), let data = r.bytes(Int(clamping: n)) else { throw bad("DATA record truncated") }
                    try data.withUnsafeBytes { try sink.deviceData(device: dev, $0) }
                case .configState:
                    guard let n = r.u32(), let data = r.bytes(Int(n)) else { throw bad("CONFIG record truncated") }
                    guard r.u64() == MigrationStream.VFIOTag.endOfState.rawValue else { throw bad("CONFIG STATE: EOS not found") }
                    try sink.deviceConfig(device: dev, data)
                case .initDataSent:
                    try sink.deviceInitialDataSent(device: dev)
                case .configLoadReady:
                    throw bad("CONFIG_LOAD_READY is only used with multifd, which this stream does not use")
                }
            }
        case .vcpus:
            guard let n = r.u32(), n <= 64 else { throw bad("vCPU count missing or above 64") }
            var states: [VCPUStateBytes] = []
            for i in 0..<n {
                var parts: [[UInt8]] = []
                for _ in 0..<3 {
                    guard let len = r.u32(), len <= 64 * 1024, let b = r.bytes(Int(len)) else { throw bad("vCPU \(i) state truncated") }
                    parts.append(Array(b))
                }
                states.append(VCPUStateBytes(regs: parts[0], sregs: parts[1], fpu: parts[2]))
            }
            guard r.remaining == 0 else { throw bad("\(r.remaining) bytes after the last vCPU") }
            try sink.vcpus(states)
        case .end:
            guard let pages = r.u64() else { throw bad("truncated") }
            if r.remaining == 8, let f = r.u32(), let zero = r.u32() {
                guard f & ~1 == 0, zero == 0 else { throw bad("unknown run-state flags \(hex(UInt64(f))) / \(zero)") }
                try sink.sourceRunState(running: f & 1 != 0)
            }
            guard r.remaining == 0 else { throw bad("END carries 8 or 16 bytes") }
            try sink.end(pagesSent: pages)
        case .multifd:
            guard flags & MigrationStream.flagMultifd != 0 else { throw bad("MULTIFD in a stream whose header does not say multifd") }
            guard let n = r.u32(), r.u32() == 0, let nonce = r.u64(), r.remaining == 0 else { throw bad("not 16 bytes of channels and nonce") }
            guard Multifd.channelRange.contains(Int(n)) else { throw bad("\(n) channels (\(Multifd.channelRange.lowerBound)-\(Multifd.channelRange.upperBound))") }
            try sink.multifd(channels: n, nonce: nonce)
        case .sync:
            // Flag 2: a keep-alive of a silent main channel (no barrier).
            guard let seq = r.u64(), let f = r.u32(), r.u32() == 0, r.remaining == 0, f & ~3 == 0 else { throw bad("not 16 bytes of pass and flags") }
            if f & 2 == 0 { try sink.sync(sequence: seq, last: f & 1 != 0) } else if seq & MigrationStream.probeBit != 0 { try sink.probe(seq & ~MigrationStream.probeBit) }
        case .liveUpdate:
            guard let at = r.u64(), let n = r.u32(), n == devices else { throw bad("truncated, or its device count differs from CONFIG's") }
            var irqs: [UInt64] = []
            for _ in 0..<n { guard let c = r.u64() else { throw bad("truncated") }; irqs.append(c) }
            guard r.remaining == 0 else { throw bad("\(r.remaining) trailing bytes") }
            try sink.liveUpdate(pausedAt: at, interrupts: irqs)
        case .ram:
            break
        }
    }
}

/// Big-endian reader that returns nil instead of reading past the end.
public struct BEReader {
    var b: ArraySlice<UInt8>
    public init(_ b: ArraySlice<UInt8>) { self.b = b }
    public var remaining: Int { b.count }
    public mutating func u16() -> UInt16? { guard b.count >= 2 else { return nil }; defer { b = b.dropFirst(2) }; return b.prefix(2).reduce(0) { $0 << 8 | UInt16($1) } }
    public mutating func u32() -> UInt32? { guard b.count >= 4 else { return nil }; defer { b = b.dropFirst(4) }; return b.prefix(4).reduce(0) { $0 << 8 | UInt32($1) } }
    public mutating func u64() -> UInt64? { guard b.count >= 8 else { return nil }; defer { b = b.dropFirst(8) }; return b.prefix(8).reduce(0) { $0 << 8 | UInt64($1) } }
    public mutating func bytes(_ n: Int) -> ArraySlice<UInt8>? { guard n >= 0, b.count >= n else { return nil }; defer { b = b.dropFirst(n) }; return b.prefix(n) }
}

/// Big-endian writer for section payloads.
public struct BEWriter {
    public private(set) var bytes: [UInt8] = []
    public init() {}
    public mutating func u32(_ v: UInt32) { withUnsafeBytes(of: v.bigEndian) { bytes.append(contentsOf: $0) } }
    public mutating func u64(_ v: UInt64) { withUnsafeBytes(of: v.bigEndian) { bytes.append(contentsOf: $0) } }
    public mutating func u16(_ v: UInt16) { withUnsafeBytes(of: v.bigEndian) { bytes.append(contentsOf: $0) } }
    public mutating func append<C: Collection>(_ c: C) where C.Element == UInt8 { bytes.append(contentsOf: c) }
}
