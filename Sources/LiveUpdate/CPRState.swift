import Glibc
import SystemCalls
import Migration
import VFIO

/// The CPR state a VMM hands to its successor before anything else: a table of named
/// descriptors (QEMU's `cpr_save_fd(name, id, fd)` convention) and typed records (the VM's
/// shape, each device's adoption record, kernel object ids). The successor loads it before it
/// creates any device, and takes each descriptor by name instead of opening or configuring.
///
/// Encoding (big-endian, as QEMU's "QCPR" state):
///
///     header  := magic "VLCP" u32 | version u32 | entries u32 | records u32 | body length u32
///     body    := entries × {name length u16, name, id i32, fd number i32}
///                records × {name length u16, name, length u32, bytes}
///     trailer := checksum u64 of the body
///
/// Over a UNIX socket (cpr-transfer) the descriptors follow the body in SCM_RIGHTS messages of
/// one byte each (the number of fds it carries, at most `fdsPerMessage`), in table order; the
/// fd numbers in the body are the sender's and are ignored. In a memfd (cpr-exec) the numbers
/// are the descriptors themselves, kept open across exec.
public struct CPRState {
    public struct Entry {
        public var name: String
        public var id: Int32
        public var fd: FileDescriptor
        public init(name: String, id: Int32, fd: FileDescriptor) { self.name = name; self.id = id; self.fd = fd }
    }

    public var entries: [Entry] = []
    public var records: [(name: String, bytes: [UInt8])] = []

    public static let magic: UInt32 = 0x564c_4350  // "VLCP"
    public static let version: UInt32 = 1
    public static let headerSize = 20
    public static let maxEntries = 1024
    public static let maxRecords = 4096
    public static let maxBody = 16 << 20
    public static let maxName = 255
    public static let fdsPerMessage = 16

    public init() {}

    public mutating func save(_ name: String, id: Int32 = 0, _ fd: FileDescriptor) { entries.append(Entry(name: name, id: id, fd: fd)) }
    public mutating func saveRecord(_ name: String, _ bytes: [UInt8]) { records.append((name, bytes)) }

    /// The descriptor saved under (name, id), if any.
    public func find(_ name: String, id: Int32 = 0) -> FileDescriptor? { entries.first { $0.name == name && $0.id == id }?.fd }
    public func record(_ name: String) -> [UInt8]? { records.first { $0.name == name }?.bytes }

    /// Close every descriptor (a failed load: nothing received may leak).
    public func closeAll() { for e in entries { e.fd.close() } }

    // MARK: encoding

    public func encode() -> [UInt8] {
        var body = BEWriter()
        func name(_ s: String) { let b = Array(s.utf8.prefix(Self.maxName)); body.u16(UInt16(b.count)); body.append(b) }
        for e in entries { name(e.name); body.u32(UInt32(bitPattern: e.id)); body.u32(UInt32(bitPattern: e.fd.rawValue)) }
        for r in records { name(r.name); body.u32(UInt32(r.bytes.count)); body.append(r.bytes) }
        var out = BEWriter()
        for v in [Self.magic, Self.version, UInt32(entries.count), UInt32(records.count), UInt32(body.bytes.count)] { out.u32(v) }
        out.append(body.bytes)
        out.u64(body.bytes.withUnsafeBytes { Checksum.update(Checksum.seed, $0) })
        return out.bytes
    }

    /// The header's counts, validated against the bounds before any body byte is read.
    struct Header { var entries: Int; var records: Int; var bodyLength: Int }

    static func decodeHeader(_ h: ArraySlice<UInt8>) throws -> Header {
        var r = BEReader(h)
        guard let magic = r.u32(), magic == Self.magic else { throw CPRError.malformed("not a vfio-live CPR state (bad magic)") }
        guard let v = r.u32(), v == Self.version else { throw CPRError.malformed("unsupported CPR state version (this build reads \(Self.version))") }
        guard let e = r.u32(), let n = r.u32(), let len = r.u32() else { throw CPRError.malformed("truncated header") }
        guard e <= Self.maxEntries else { throw CPRError.malformed("\(e) descriptors (at most \(Self.maxEntries))") }
        guard n <= Self.maxRecords else { throw CPRError.malformed("\(n) records (at most \(Self.maxRecords))") }
        guard len <= Self.maxBody else { throw CPRError.malformed("body of \(len) bytes (at most \(Self.maxBody))") }
        return Header(entries: Int(e), records: Int(n), bodyLength: Int(len))
    }

    /// Parse the body; `fd(i, number)` supplies entry i's descriptor (received, or the number
    /// itself after exec). On any error the descriptors already supplied are closed.
    static func decodeBody(_ body: ArraySlice<UInt8>, checksum: UInt64, header: Header,
                           fd: (Int, Int32) throws -> FileDescriptor) throws -> CPRState {
        guard body.withUnsafeBytes({ Checksum.update(Checksum.seed, $0) }) == checksum else {
            throw CPRError.malformed("CPR state is corrupt (checksum mismatch)")
        }
        var s = CPRState()
        do {
            var r = BEReader(body)
            func name() throws -> String {
                guard let n = r.u16(), n <= Self.maxName, let b = r.bytes(Int(n)) else { throw CPRError.malformed("truncated or overlong name") }
                guard let str = String(validating: b, as: UTF8.self), !str.isEmpty else { throw CPRError.malformed("a name is empty or not UTF-8") }
                return str
            }
            for i in 0..<header.entries {
                let n = try name()
                guard let id = r.u32(), let number = r.u32() else { throw CPRError.malformed("descriptor \(i) truncated") }
                if s.entries.contains(where: { $0.name == n && $0.id == Int32(bitPattern: id) }) {
                    throw CPRError.malformed("descriptor \(n)/\(Int32(bitPattern: id)) appears twice")
                }
                s.entries.append(Entry(name: n, id: Int32(bitPattern: id), fd: try fd(i, Int32(bitPattern: number))))
            }
            for i in 0..<header.records {
                let n = try name()
                guard let len = r.u32(), let b = r.bytes(Int(len)) else { throw CPRError.malformed("record \(i) (\(n)) truncated") }
                s.records.append((n, Array(b)))
            }
            guard r.remaining == 0 else { throw CPRError.malformed("\(r.remaining) bytes after the last record") }
        } catch {
            s.closeAll()
            throw error
        }
        return s
    }

    // MARK: over a UNIX socket (cpr-transfer)

    /// Send the table, then the descriptors in order; returns the table's size in bytes.
    @discardableResult
    public func send(over socket: UnixSocket) throws -> Int {
        let table = encode()
        try socket.send(table)
        var i = 0
        while i < entries.count {
            let chunk = entries[i..<min(i + Self.fdsPerMessage, entries.count)].map { $0.fd.rawValue }
            try socket.send([UInt8(chunk.count)], fds: chunk)
            i += chunk.count
        }
        return table.count
    }

    /// Receive a state sent by `send(over:)`. Every bound is checked before it is used, and
    /// every descriptor received is closed if anything is wrong (wrong count, bad table).
    public static func receive(from socket: UnixSocket) throws -> CPRState {
        var head = [UInt8](repeating: 0, count: headerSize)
        do { _ = try head.withUnsafeMutableBytes { try socket.receiveExactly(into: $0, maxFDs: 0) } } catch {
            throw CPRError.channel("reading the CPR header: \(error)")
        }
        let h = try decodeHeader(head[...])
        var body = [UInt8](repeating: 0, count: h.bodyLength + 8)
        do { _ = try body.withUnsafeMutableBytes { try socket.receiveExactly(into: $0, maxFDs: 0) } } catch {
            throw CPRError.channel("reading the CPR table: \(error)")
        }
        var received: [FileDescriptor] = []
        do {
            while received.count < h.entries {
                var one: [UInt8] = [0]
                let got: ReceivedFDs
                do { got = try one.withUnsafeMutableBytes { try socket.receiveExactly(into: $0, maxFDs: fdsPerMessage) } } catch {
                    throw CPRError.channel("receiving descriptors (\(received.count) of \(h.entries) arrived): \(error)")
                }
                received += got.fds
                let expected = min(fdsPerMessage, h.entries - (received.count - got.fds.count))
                guard !got.truncated, Int(one[0]) == got.fds.count, got.fds.count == expected else {
                    throw CPRError.malformed("a descriptor message announced \(one[0]) fds, carried \(got.fds.count), \(expected) expected")
                }
            }
        } catch {
            for f in received { f.close() }
            throw error
        }
        let sum = body[h.bodyLength...].reduce(UInt64(0)) { $0 << 8 | UInt64($1) }
        do {
            return try decodeBody(body[..<h.bodyLength], checksum: sum, header: h) { i, _ in received[i] }
        } catch {
            for f in received { f.close() }
            throw error
        }
    }

    // MARK: across exec (cpr-exec)

    /// Write the state, followed by `trailer` (the main stream), into a memfd that survives
    /// exec, and clear close-on-exec on it and on every saved descriptor.
    public func writeForExec(trailer: [UInt8]) throws -> FileDescriptor {
        let bytes = encode() + trailer
        let fd = try MemFD.create(name: "vfio-live-cpr-state", size: UInt64(bytes.count))
        try bytes.withUnsafeBytes { b in
            var off = 0
            while off < b.count { off += try fd.pwrite(UnsafeRawBufferPointer(rebasing: b[off...]), offset: UInt64(off)) }
        }
        return fd
    }

    /// Set close-on-exec on (after exec, or after a failed exec) or off (just before exec)
    /// for every saved descriptor.
    public func setCloseOnExec(_ on: Bool) throws {
        for e in entries { try e.fd.setCloseOnExec(on) }
    }

    /// Read a state written by `writeForExec` from memfd `fd`; returns it and the bytes after it.
    /// Descriptors are adopted by number and must be open; close-on-exec is set on them again.
    public static func readAfterExec(_ fd: FileDescriptor) throws -> (CPRState, [UInt8]) {
        let size = try fd.fileSize()
        guard size >= UInt64(headerSize + 8), size <= UInt64(headerSize + maxBody + 8 + (64 << 20)) else {
            throw CPRError.malformed("CPR state memfd of \(size) bytes")
        }
        var all = [UInt8](repeating: 0, count: Int(size))
        try all.withUnsafeMutableBytes { b in
            var off = 0
            while off < b.count {
                let n = try fd.pread(into: UnsafeMutableRawBufferPointer(rebasing: b[off...]), offset: UInt64(off))
                guard n > 0 else { throw CPRError.malformed("CPR state memfd ends early") }
                off += n
            }
        }
        let h = try decodeHeader(all[0..<headerSize])
        let end = headerSize + h.bodyLength
        guard all.count >= end + 8 else { throw CPRError.malformed("CPR state truncated") }
        let sum = all[end..<(end + 8)].reduce(UInt64(0)) { $0 << 8 | UInt64($1) }
        var seen = Set<Int32>()
        let s = try decodeBody(all[headerSize..<end], checksum: sum, header: h) { i, number in
            guard number >= 0, fcntl(number, F_GETFD) >= 0, seen.insert(number).inserted else {
                throw CPRError.malformed("descriptor \(i) (number \(number)) was not kept open across exec")
            }
            let f = FileDescriptor(adopting: number)
            try f.setCloseOnExec(true)
            return f
        }
        return (s, Array(all[(end + 8)...]))
    }
}

/// A live update's errors, each a message the user can act on.
public enum CPRError: Error, CustomStringConvertible {
    /// The update cannot start; nothing was touched.
    case blocked(String)
    case malformed(String)
    case channel(String)
    /// The successor reported a failure (its words).
    case successor(String)
    /// exec of the new binary failed; the VM runs on in this process.
    case exec(String)

    public var description: String {
        switch self {
        case let .blocked(why): return "live update blocked: \(why)"
        case let .malformed(why): return "bad CPR state: \(why)"
        case let .channel(why): return "CPR channel: \(why)"
        case let .successor(why): return "the new VMM failed: \(why)"
        case let .exec(why): return "cpr-exec: \(why)"
        }
    }
}
