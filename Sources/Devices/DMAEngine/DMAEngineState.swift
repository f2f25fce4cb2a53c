import CVFIOLive
import Glibc
import SystemCalls
import VFIO
import VFIOUser

/// The dma-engine migration stream: a sequence of self-checking records.
///
///     record := magic u32 "DMAE" | version u16 | type u16 | length u32 | checksum u64 | payload
///     types  := 0 header {memory size u64, chunk size u32, flags u32 (bit 0: chunks checksummed)}
///               1 memory chunk {offset u64, bytes}
///               2 registers {14 × u64, PCI config space 256 bytes}
///               3 end
///
/// Pre-copy sends every chunk once (the initial bytes), then only chunks written since; stop-copy
/// sends what is still dirty, the registers with any in-flight job, and the end record. The
/// destination checks every record as it arrives and applies nothing until RESUMING→STOP has
/// seen a complete, consistent image.
public enum DMAEngineStateFormat {
    public static let magic: UInt32 = 0x4541_4d44  // "DMAE"
    /// 3: every record's checksum is `recordChecksum` (three CRC32C lanes: SSE4.2's `crc32`
    /// runs at about twice the speed of version 2's multiply-xor), a chunk's seeded by its
    /// offset so its data can be received straight into place and checked there. A stream of
    /// another version is refused by its number.
    public static let version: UInt16 = 3
    public static let headerSize = 20
    public static let maxPayload = DMAEngine.chunkSize + 8
    public enum RecordType: UInt16 { case header = 0, chunk = 1, registers = 2, end = 3 }
    /// Header flag: memory chunk records carry `chunkChecksum` (otherwise their checksum is 0).
    public static let flagChunkChecksums: UInt32 = 1

    static func record(_ type: RecordType, _ payload: UnsafeRawBufferPointer) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: headerSize + payload.count)
        out.withUnsafeMutableBytes { o in
            if payload.count > 0 { memcpy(o.baseAddress! + headerSize, payload.baseAddress!, payload.count) }
            writeHeader(type, payload: payload, into: o.baseAddress!)
        }
        return out
    }

    /// The checksum of a non-chunk record's payload.
    public static func recordChecksum(_ payload: UnsafeRawBufferPointer) -> UInt64 {
        vl_crc3x64(Checksum.seed, payload.baseAddress, payload.count)
    }

    /// A chunk record's checksum: its data, seeded by its offset (so a chunk sent for another
    /// offset fails too).
    public static func chunkChecksum(offset: UInt64, data: UnsafeRawBufferPointer) -> UInt64 {
        vl_crc3x64(Checksum.seed ^ (offset &* 0x9e37_79b9_7f4a_7c15), data.baseAddress, data.count)
    }

    static func writeHeader(_ type: RecordType, payload: UnsafeRawBufferPointer, into p: UnsafeMutableRawPointer) {
        writeHeader(type, length: payload.count, checksum: recordChecksum(payload), into: p)
    }

    static func writeHeader(_ type: RecordType, length: Int, checksum: UInt64, into p: UnsafeMutableRawPointer) {
        p.storeBytes(of: magic.littleEndian, toByteOffset: 0, as: UInt32.self)
        p.storeBytes(of: version.littleEndian, toByteOffset: 4, as: UInt16.self)
        p.storeBytes(of: type.rawValue.littleEndian, toByteOffset: 6, as: UInt16.self)
        p.storeBytes(of: UInt32(length).littleEndian, toByteOffset: 8, as: UInt32.self)
        p.storeBytes(of: checksum.littleEndian, toByteOffset: 12, as: UInt64.self)
    }
    static func record(_ type: RecordType, _ payload: [UInt8]) -> [UInt8] {
        payload.withUnsafeBytes { record(type, $0) }
    }
}

/// Why a resume was refused. The device is unchanged in every case.
public enum DMAEngineStateError: Error, CustomStringConvertible {
    case badMagic(UInt32), badVersion(UInt16), badType(UInt16), badLength(UInt32), badChunkLength(UInt32)
    case checksumMismatch(type: UInt16, expected: UInt64, actual: UInt64)
    case headerMissing, sizeMismatch(sent: UInt64, ours: UInt64), chunkOutOfRange(UInt64)
    case dataAfterEnd, incomplete(String), badFlags(UInt32), undeclaredChecksum(UInt64)

    public var description: String {
        switch self {
        case let .badMagic(m): return "record magic 0x\(String(m, radix: 16)) is not dma-engine state (0x\(String(DMAEngineStateFormat.magic, radix: 16)))"
        case let .badVersion(v): return "state format version \(v) is not supported (this build reads version \(DMAEngineStateFormat.version))"
        case let .badType(t): return "unknown record type \(t)"
        case let .badLength(l): return "record length \(l) exceeds the \(DMAEngineStateFormat.maxPayload)-byte limit"
        case let .badChunkLength(l): return "memory chunk record of \(l) bytes (a chunk record is \(8 + DMAEngine.chunkSize))"
        case let .checksumMismatch(t, e, a): return "record type \(t) is corrupt: checksum 0x\(String(a, radix: 16)), expected 0x\(String(e, radix: 16))"
        case .headerMissing: return "state does not start with a header record"
        case let .sizeMismatch(s, o): return "state is from a device with \(s) bytes of memory; this one has \(o) (start it with --state-size \(s))"
        case let .chunkOutOfRange(o): return "memory chunk at offset 0x\(String(o, radix: 16)) lies outside device memory"
        case .dataAfterEnd: return "data after the end record"
        case let .incomplete(why): return "state is incomplete: \(why)"
        case let .badFlags(f): return "header record flags 0x\(String(f, radix: 16)) include unknown bits (this build knows 0x\(String(DMAEngineStateFormat.flagChunkChecksums, radix: 16)))"
        case let .undeclaredChecksum(o): return "memory chunk at offset 0x\(String(o, radix: 16)) has a checksum, but the header declared none"
        }
    }
}

/// The saving side of one data session.
final class SaveSession {
    var outbox: [UInt8] = []
    var outboxPos = 0
    var headerSent = false
    var nextInitialChunk = 0
    var registersSent = false
    var endSent = false
    let chunkCount: Int
    /// Chunk records carry checksums (declared in the header record).
    let checksums: Bool
    init(chunkCount: Int, checksums: Bool) { self.chunkCount = chunkCount; self.checksums = checksums }
    var initialRemaining: Int { chunkCount - nextInitialChunk }
}

/// The resuming side: a parser fed piece by piece, which says where the next bytes go (`target`)
/// so that a chunk's data is received straight into place. Every record is checked when it is
/// whole. Memory chunks land in device memory itself when it held only zeros at STOP→RESUMING
/// (a fresh destination: a failed load zeroes what it wrote, which gives back the exact prior
/// state), in a staging copy applied at RESUMING→STOP otherwise. Registers are applied only at
/// RESUMING→STOP.
final class LoadSession {
    enum Phase { case head, chunkData, body }
    var sawHeader = false
    /// The header declared chunk checksums.
    var chunkChecksums = false
    var sawEnd = false
    var registers: (DMAEngine.Registers, [UInt8])?
    let staging: MappedRegion?
    let base: UnsafeMutableRawPointer
    let memorySize: UInt64
    var received: [Bool]
    /// Chunks written into device memory (direct mode): what a failed load must zero.
    var touched: [Bool]
    // The parser.
    var phase = Phase.head
    /// A record header, and for a chunk its offset: 28 bytes at most.
    var head = [UInt8](repeating: 0, count: DMAEngineStateFormat.headerSize + 8)
    var headHave = 0
    var type = DMAEngineStateFormat.RecordType.end
    var length = 0
    var sum: UInt64 = 0
    var body: [UInt8] = []
    var chunkOffset = 0
    var chunkHave = 0

    init(memory: MappedRegion, memorySize: UInt64, chunkCount: Int, direct: Bool) throws {
        self.memorySize = memorySize
        if direct {
            staging = nil
            base = memory.base
        } else {
            let s = try MappedRegion(anonymous: Int(memorySize), populate: true)
            staging = s
            base = s.base
        }
        received = [Bool](repeating: false, count: chunkCount)
        touched = [Bool](repeating: false, count: direct ? chunkCount : 0)
    }

    var direct: Bool { staging == nil }
    /// Bytes of partial record held (a stream that ends here is incomplete).
    var partialBytes: Int { phase == .head ? headHave : 1 }

    /// Where the next at most `max` bytes of the stream go.
    func target(max: Int) -> UnsafeMutableRawBufferPointer {
        let hs = DMAEngineStateFormat.headerSize
        switch phase {
        case .head:
            // A header and the 8 bytes after it in one receive: a chunk's offset, or the start
            // of another record's payload (every payload is 8 bytes or more except the end
            // record's, which is the last: bytes after it are refused).
            let want = hs + 8 - headHave
            return head.withUnsafeMutableBytes { UnsafeMutableRawBufferPointer(rebasing: $0[headHave..<headHave + Swift.min(want, max)]) }
        case .chunkData:
            let n = Swift.min(DMAEngine.chunkSize - chunkHave, max)
            return UnsafeMutableRawBufferPointer(start: base + chunkOffset + chunkHave, count: n)
        case .body:
            let have = body.count
            let n = Swift.min(length - have, max)
            body.append(contentsOf: repeatElement(0, count: n))
            return body.withUnsafeMutableBytes { UnsafeMutableRawBufferPointer(rebasing: $0[have..<have + n]) }
        }
    }

    /// `n` bytes arrived in the last `target`; check and stage whatever became whole.
    func consume(_ n: Int, apply: (DMAEngineStateFormat.RecordType, UnsafeRawBufferPointer) throws -> Void) throws {
        let hs = DMAEngineStateFormat.headerSize
        switch phase {
        case .head:
            let before = headHave
            headHave += n
            if before < hs && headHave >= hs {
                let (t, len, s) = try head.withUnsafeBytes { try Self.parseHeader($0.baseAddress!) }
                type = t; length = len; sum = s
                guard t == .chunk else {
                    let extra = headHave - hs
                    if extra > len {
                        if t == .end { throw DMAEngineStateError.dataAfterEnd }
                        throw DMAEngineStateError.incomplete("a type \(t.rawValue) record of \(len) bytes is shorter than any record of that type")
                    }
                    body = Array(head[hs..<hs + extra])
                    body.reserveCapacity(len)
                    phase = .body
                    if body.count == len { try finishBody(apply) }
                    return
                }
                guard len == 8 + DMAEngine.chunkSize else { throw DMAEngineStateError.badChunkLength(UInt32(len)) }
                guard !sawEnd else { throw DMAEngineStateError.dataAfterEnd }
                guard sawHeader else { throw DMAEngineStateError.headerMissing }
            }
            guard headHave == hs + 8 else { return }
            let off = head.withUnsafeBytes { UInt64(littleEndian: $0.loadUnaligned(fromByteOffset: hs, as: UInt64.self)) }
            guard off % UInt64(DMAEngine.chunkSize) == 0, off < memorySize else { throw DMAEngineStateError.chunkOutOfRange(off) }
            chunkOffset = Int(off)
            chunkHave = 0
            if direct { touched[chunkOffset / DMAEngine.chunkSize] = true }
            phase = .chunkData
        case .chunkData:
            chunkHave += n
            guard chunkHave == DMAEngine.chunkSize else { return }
            if chunkChecksums {
                let data = UnsafeRawBufferPointer(start: base + chunkOffset, count: DMAEngine.chunkSize)
                let actual = DMAEngineStateFormat.chunkChecksum(offset: UInt64(chunkOffset), data: data)
                guard actual == sum else { throw DMAEngineStateError.checksumMismatch(type: type.rawValue, expected: sum, actual: actual) }
            } else if sum != 0 {
                throw DMAEngineStateError.undeclaredChecksum(UInt64(chunkOffset))
            }
            received[chunkOffset / DMAEngine.chunkSize] = true
            headHave = 0
            phase = .head
        case .body:
            if body.count == length { try finishBody(apply) }
        }
    }

    private func finishBody(_ apply: (DMAEngineStateFormat.RecordType, UnsafeRawBufferPointer) throws -> Void) throws {
        try body.withUnsafeBytes { b in
            let actual = DMAEngineStateFormat.recordChecksum(b)
            guard actual == sum else { throw DMAEngineStateError.checksumMismatch(type: type.rawValue, expected: sum, actual: actual) }
            try apply(type, b)
        }
        body = []
        headHave = 0
        phase = .head
    }

    static func parseHeader(_ p: UnsafeRawPointer) throws -> (DMAEngineStateFormat.RecordType, Int, UInt64) {
        let magic = UInt32(littleEndian: p.loadUnaligned(as: UInt32.self))
        let version = UInt16(littleEndian: p.loadUnaligned(fromByteOffset: 4, as: UInt16.self))
        let type = UInt16(littleEndian: p.loadUnaligned(fromByteOffset: 6, as: UInt16.self))
        let length = UInt32(littleEndian: p.loadUnaligned(fromByteOffset: 8, as: UInt32.self))
        let sum = UInt64(littleEndian: p.loadUnaligned(fromByteOffset: 12, as: UInt64.self))
        guard magic == DMAEngineStateFormat.magic else { throw DMAEngineStateError.badMagic(magic) }
        guard version == DMAEngineStateFormat.version else { throw DMAEngineStateError.badVersion(version) }
        guard let rt = DMAEngineStateFormat.RecordType(rawValue: type) else { throw DMAEngineStateError.badType(type) }
        guard length <= UInt32(DMAEngineStateFormat.maxPayload) else { throw DMAEngineStateError.badLength(length) }
        return (rt, Int(length), sum)
    }

    /// A load that will not complete: device memory gets back the zeros it held (direct mode).
    func abandon() {
        guard direct else { return }
        for (c, t) in touched.enumerated() where t { memset(base + c * DMAEngine.chunkSize, 0, DMAEngine.chunkSize) }
        touched = touched.map { _ in false }
    }
}

extension DMAEngine: MigratableDevice {
    public var migrationCapabilities: MigrationCapabilities { [.stopCopy, .preCopy] }
    var chunkCount: Int { Int(memorySize) / Self.chunkSize }

    public func migrationArc(from: MigrationState, to: MigrationState) throws {
        if let r = refuseArcForTesting, r.0 == from, r.1 == to {
            refuseArcForTesting = nil
            throw MigrationArcError.refused("dma-engine refuses \(from)→\(to) (fault injected)")
        }
        switch (from, to) {
        case (.running, .stop):
            quiesce()
        case (.stop, .running):
            resumeRunning()
        case (.running, .preCopy):
            openSave()
        case (.preCopy, .running):
            lock.mutex.withLock { save = nil }
        case (.preCopy, .stopCopy):
            quiesce()  // same session: the stream goes on
        case (.stop, .stopCopy):
            openSave()
        case (.stopCopy, .stop):
            lock.mutex.withLock { save = nil }
        case (.stop, .resuming):
            // Off the downtime path (a destination enters RESUMING before the source stops).
            let l = try LoadSession(memory: memory, memorySize: memorySize, chunkCount: chunkCount, direct: memoryIsAllZero())
            lock.mutex.withLock { load = l }
        case (.resuming, .stop):
            try finishLoad()
        default:
            throw MigrationArcError.refused("dma-engine does not implement the arc \(from)→\(to)")
        }
    }

    private func openSave() {
        // Everything is "initial" now; writes from here on mark chunks dirty again.
        _ = memoryDirty.takeWords()
        lock.mutex.withLock { save = SaveSession(chunkCount: chunkCount, checksums: stateChecksums) }
    }

    public func stopCopySize() -> UInt64 {
        let regsBytes = UInt64(DMAEngineStateFormat.headerSize * 3 + 14 * 8 + PCIConfigSpace.size + 16)
        let perChunk = UInt64(Self.chunkSize + DMAEngineStateFormat.headerSize + 8)
        let s = lock.mutex.withLock { save }
        let initial = UInt64(s?.initialRemaining ?? chunkCount)
        let dirtyChunks = UInt64(dirtyChunkCount())
        return (initial + dirtyChunks) * perChunk + regsBytes
    }

    public func preCopyInfo() -> (initialBytes: UInt64, dirtyBytes: UInt64) {
        let perChunk = UInt64(Self.chunkSize + DMAEngineStateFormat.headerSize + 8)
        let s = lock.mutex.withLock { save }
        return (UInt64(s?.initialRemaining ?? 0) * perChunk, UInt64(dirtyChunkCount()) * perChunk)
    }

    private static let pagesPerChunk = UInt64(chunkSize / 4096)

    private func dirtyChunkCount() -> Int { memoryDirty.dirtyGroupCount(pagesPerGroup: Self.pagesPerChunk) }

    /// Take the first dirty chunk (clearing its bits before copying, so that a write racing the
    /// copy marks it again) and return its record.
    private func nextDirtyChunkRecord(_ s: SaveSession) -> [UInt8]? {
        guard let page = memoryDirty.firstDirtyPage() else { return nil }
        let c = page / Self.pagesPerChunk
        memoryDirty.clear(firstPage: c * Self.pagesPerChunk, count: Self.pagesPerChunk)
        return chunkRecord(Int(c), s)
    }

    static var chunkRecordSize: Int { DMAEngineStateFormat.headerSize + 8 + chunkSize }

    private func chunkRecord(_ c: Int, _ s: SaveSession) -> [UInt8] {
        [UInt8](unsafeUninitializedCapacity: Self.chunkRecordSize) { b, n in
            writeChunkRecord(c, s, into: UnsafeMutableRawPointer(b.baseAddress!))
            n = Self.chunkRecordSize
        }
    }

    /// Header, offset, then one copy of the chunk, built where it is to be sent from; the
    /// checksum then reads the chunk while it is still in cache.
    private func writeChunkRecord(_ c: Int, _ s: SaveSession, into p: UnsafeMutableRawPointer) {
        let payload = 8 + Self.chunkSize
        let q = p + DMAEngineStateFormat.headerSize
        q.storeBytes(of: UInt64(c * Self.chunkSize).littleEndian, as: UInt64.self)
        memcpy(q + 8, memory.base + c * Self.chunkSize, Self.chunkSize)
        let sum = s.checksums ? DMAEngineStateFormat.chunkChecksum(offset: UInt64(c * Self.chunkSize), data: UnsafeRawBufferPointer(start: q + 8, count: Self.chunkSize)) : 0
        DMAEngineStateFormat.writeHeader(.chunk, length: payload, checksum: sum, into: p)
    }

    /// The chunk the stream sends next, if the next record is a chunk: the initial chunks in
    /// order, then dirty ones (its bits cleared before the copy, so that a racing write marks
    /// it again). The same order as `nextRecord`.
    private func nextChunk(_ s: SaveSession) -> Int? {
        guard s.headerSent else { return nil }
        if s.nextInitialChunk < s.chunkCount {
            defer { s.nextInitialChunk += 1 }
            return s.nextInitialChunk
        }
        guard let page = memoryDirty.firstDirtyPage() else { return nil }
        let c = page / Self.pagesPerChunk
        memoryDirty.clear(firstPage: c * Self.pagesPerChunk, count: Self.pagesPerChunk)
        return Int(c)
    }

    private func registersRecord() -> [UInt8] {
        let r = lock.mutex.withLock { regs }
        var w = WireWriter()
        for v in [UInt64(r.liveness), UInt64(r.factorial), UInt64(r.status), UInt64(r.irqStatus), r.dmaSource, r.dmaDestination,
                  r.dmaCount, r.dmaCommand, r.jobsCompleted, r.lastJobStatus, r.lastJobChecksum, r.jobProgress, r.jobChecksum,
                  r.dmaStepDelay] {
            w.u64(v)
        }
        w.append(config.snapshot())
        return DMAEngineStateFormat.record(.registers, w.bytes)
    }

    /// Produce the next record for the session, or nil when nothing is available now.
    private func nextRecord(_ s: SaveSession, stopped: Bool) -> [UInt8]? {
        if !s.headerSent {
            s.headerSent = true
            var w = WireWriter(); w.u64(memorySize); w.u32(UInt32(Self.chunkSize))
            w.u32(s.checksums ? DMAEngineStateFormat.flagChunkChecksums : 0)
            return DMAEngineStateFormat.record(.header, w.bytes)
        }
        if s.nextInitialChunk < s.chunkCount {
            defer { s.nextInitialChunk += 1 }
            return chunkRecord(s.nextInitialChunk, s)
        }
        if let d = nextDirtyChunkRecord(s) { return d }
        guard stopped else { return nil }
        if !s.registersSent { s.registersSent = true; return registersRecord() }
        if !s.endSent { s.endSent = true; return DMAEngineStateFormat.record(.end, []) }
        return nil
    }

    public func readMigrationData(max: Int) throws -> [UInt8] {
        try [UInt8](unsafeUninitializedCapacity: Swift.max(max, 0)) { b, n in
            n = 0
            n = try readMigrationData(into: UnsafeMutableRawBufferPointer(b))
        }
    }

    /// Fills `o` with the next bytes of the stream: a chunk record that fits whole is built in
    /// `o` itself (the MIG_DATA_READ reply buffer), anything else goes through the outbox.
    public func readMigrationData(into o: UnsafeMutableRawBufferPointer) throws -> Int {
        guard let s = lock.mutex.withLock({ save }) else {
            throw DeviceError(.EINVAL, "no data session (device is not saving)")
        }
        let stopped = !lock.mutex.withLock { runAllowed }
        let max = o.count
        var filled = 0
        while filled < max {
            if s.outboxPos < s.outbox.count {
                let n = min(max - filled, s.outbox.count - s.outboxPos)
                _ = s.outbox.withUnsafeBytes { memcpy(o.baseAddress! + filled, $0.baseAddress! + s.outboxPos, n) }
                s.outboxPos += n
                filled += n
                continue
            }
            if max - filled >= Self.chunkRecordSize, let c = nextChunk(s) {
                writeChunkRecord(c, s, into: o.baseAddress! + filled)
                filled += Self.chunkRecordSize
                continue
            }
            guard let rec = nextRecord(s, stopped: stopped) else { break }
            s.outbox = rec; s.outboxPos = 0
        }
        return filled
    }

    /// In STOP_COPY (memory stable: the engine is quiesced and BAR writes are refused) each
    /// whole chunk record is its 28-byte header in `scratch` and the chunk in device memory,
    /// checksummed where it lies: the socket's copy is the only one. While the device runs,
    /// a chunk written during the send would not match its checksum: nil, the copying path.
    public func readMigrationDataPieces(scratch o: UnsafeMutableRawBufferPointer) throws -> [UnsafeRawBufferPointer]? {
        guard let s = lock.mutex.withLock({ save }) else {
            throw DeviceError(.EINVAL, "no data session (device is not saving)")
        }
        guard !lock.mutex.withLock({ runAllowed }) else { return nil }  // STOP_COPY: quiesce() has returned
        let max = o.count
        let hs = DMAEngineStateFormat.headerSize
        var pieces: [UnsafeRawBufferPointer] = []
        var filled = 0, used = 0  // bytes of the reply; bytes of scratch
        func fromScratch(_ n: Int) {
            if let last = pieces.last, last.baseAddress == UnsafeRawPointer(o.baseAddress! + used - last.count) {
                pieces[pieces.count - 1] = UnsafeRawBufferPointer(start: last.baseAddress, count: last.count + n)
            } else {
                pieces.append(UnsafeRawBufferPointer(start: o.baseAddress! + used, count: n))
            }
            used += n
            filled += n
        }
        while filled < max {
            if s.outboxPos < s.outbox.count {
                let n = min(max - filled, s.outbox.count - s.outboxPos)
                _ = s.outbox.withUnsafeBytes { memcpy(o.baseAddress! + used, $0.baseAddress! + s.outboxPos, n) }
                s.outboxPos += n
                fromScratch(n)
                continue
            }
            if max - filled >= Self.chunkRecordSize, let c = nextChunk(s) {
                let p = o.baseAddress! + used
                let data = UnsafeRawBufferPointer(start: memory.base + c * Self.chunkSize, count: Self.chunkSize)
                p.storeBytes(of: UInt64(c * Self.chunkSize).littleEndian, toByteOffset: hs, as: UInt64.self)
                let sum = s.checksums ? DMAEngineStateFormat.chunkChecksum(offset: UInt64(c * Self.chunkSize), data: data) : 0
                DMAEngineStateFormat.writeHeader(.chunk, length: 8 + Self.chunkSize, checksum: sum, into: p)
                fromScratch(hs + 8)
                pieces.append(data)
                filled += Self.chunkSize
                continue
            }
            guard let rec = nextRecord(s, stopped: true) else { break }
            s.outbox = rec; s.outboxPos = 0
        }
        return pieces
    }

    public func writeMigrationData(_ data: UnsafeRawBufferPointer) throws {
        var at = 0
        try writeMigrationData(count: data.count) { b in
            memcpy(b.baseAddress!, data.baseAddress! + at, b.count)
            at += b.count
        }
    }

    /// The resuming stream, `count` bytes that `read` delivers into the parser's targets: a
    /// chunk's data goes straight to device memory (or staging) from the socket.
    public func writeMigrationData(count: Int, from read: (UnsafeMutableRawBufferPointer) throws -> Void) throws {
        guard let l = lock.mutex.withLock({ load }) else { throw DeviceError(.EINVAL, "no resuming session") }
        // Fault injection: flip the byte the old whole-message path flipped (middle of the write).
        var corruptAt: Int? = nil
        if corruptNextWriteForTesting, count > 0 { corruptNextWriteForTesting = false; corruptAt = count - count / 2 - 1 }
        var pos = 0
        do {
            while pos < count {
                let b = l.target(max: count - pos)
                try read(b)
                if let c = corruptAt, c >= pos, c < pos + b.count { b[c - pos] ^= 0x40; corruptAt = nil }
                pos += b.count
                try l.consume(b.count) { t, p in try apply(t, p, to: l) }
            }
        } catch let e as DMAEngineStateError {
            // A corrupt stream poisons the session: nothing of it will ever be applied.
            l.abandon()
            lock.mutex.withLock { if load === l { load = nil } }
            throw DeviceError(.EINVAL, "dma-engine state rejected: \(e)")
        } catch {
            // The bytes stopped coming part-way (the connection is lost): the parser is out of
            // step with the stream, so this session cannot go on.
            l.abandon()
            lock.mutex.withLock { if load === l { load = nil } }
            throw error
        }
    }

    /// Stage a whole non-chunk record.
    private func apply(_ t: DMAEngineStateFormat.RecordType, _ payload: UnsafeRawBufferPointer, to l: LoadSession) throws {
        let p = Array(payload)[...]
        var r = WireReader(p, context: "record")
        guard !l.sawEnd else { throw DMAEngineStateError.dataAfterEnd }
        if t != .header && !l.sawHeader { throw DMAEngineStateError.headerMissing }
        switch t {
        case .header:
            let size = try r.u64()
            guard size == memorySize else { throw DMAEngineStateError.sizeMismatch(sent: size, ours: memorySize) }
            _ = try r.u32()  // chunk size: fixed by the chunk record's length check
            let flags = try r.u32()
            guard flags & ~DMAEngineStateFormat.flagChunkChecksums == 0 else { throw DMAEngineStateError.badFlags(flags) }
            l.chunkChecksums = flags & DMAEngineStateFormat.flagChunkChecksums != 0
            l.sawHeader = true
        case .chunk:
            preconditionFailure("chunk records are received in place by LoadSession")
        case .registers:
            var g = Registers()
            g.liveness = UInt32(truncatingIfNeeded: try r.u64()); g.factorial = UInt32(truncatingIfNeeded: try r.u64())
            g.status = UInt32(truncatingIfNeeded: try r.u64()); g.irqStatus = UInt32(truncatingIfNeeded: try r.u64())
            g.dmaSource = try r.u64(); g.dmaDestination = try r.u64(); g.dmaCount = try r.u64(); g.dmaCommand = try r.u64()
            g.jobsCompleted = try r.u64(); g.lastJobStatus = try r.u64(); g.lastJobChecksum = try r.u64()
            g.jobProgress = try r.u64(); g.jobChecksum = try r.u64(); g.dmaStepDelay = try r.u64()
            let cfg = Array(try r.bytes(PCIConfigSpace.size))
            guard g.jobProgress <= g.dmaCount else { throw DMAEngineStateError.incomplete("job progress \(g.jobProgress) beyond its count \(g.dmaCount)") }
            l.registers = (g, cfg)
        case .end:
            l.sawEnd = true
        }
    }

    /// Device memory holds only zeros (a fresh device): a load may then go straight into it.
    func memoryIsAllZero() -> Bool {
        let words = Int(memorySize) / 8
        let p = UnsafeRawPointer(memory.base).assumingMemoryBound(to: UInt64.self)
        var i = 0
        while i < words {
            var acc: UInt64 = 0
            let end = Swift.min(i + 8192, words)
            while i < end { acc |= p[i] | p[i + 1] | p[i + 2] | p[i + 3]; i += 4 }
            if acc != 0 { return false }
        }
        return true
    }

    /// RESUMING→STOP: check the image is whole, then (and only then) load it.
    private func finishLoad() throws {
        guard let l = lock.mutex.withLock({ load }) else {
            throw MigrationArcError.refused("no valid state was received (a corrupt record ended the session)")
        }
        var why: String?
        if !l.sawHeader { why = "no header record" }
        else if !l.sawEnd { why = "the end record never arrived (stream truncated)" }
        else if l.registers == nil { why = "no registers record" }
        else if let missing = l.received.firstIndex(of: false) { why = "memory chunk \(missing) was never sent" }
        else if l.partialBytes > 0 { why = "a partial record left over" }
        if let why {
            l.abandon()
            lock.mutex.withLock { load = nil }
            throw MigrationArcError.refused("dma-engine state rejected: \(DMAEngineStateError.incomplete(why))")
        }
        let (g, cfg) = l.registers!
        lock.mutex.withLock {
            if let st = l.staging { memcpy(memory.base, st.base, Int(memorySize)) }
            regs = g
            config.restore(cfg)
            load = nil
            runAllowed = false  // STOP: the job (if any) continues at STOP→RUNNING
        }
        _ = memoryDirty.takeWords()
    }
}
