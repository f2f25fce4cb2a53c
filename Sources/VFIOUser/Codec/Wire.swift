import SystemCalls

/// Why a vfio-user message could not be decoded. Each case reads as the error it is.
public enum WireError: Error, Equatable, CustomStringConvertible {
    case truncated(what: String, need: Int, have: Int)
    case invalid(String)

    public var description: String {
        switch self {
        case let .truncated(what, need, have): return "\(what): truncated (need \(need) bytes, have \(have))"
        case let .invalid(why): return why
        }
    }
    /// The errno a server replies with for this decode failure.
    public var errno: Errno { .EINVAL }
}

/// Little-endian writer for vfio-user payloads (the spec's "host endianness" is LE on x86).
public struct WireWriter {
    public private(set) var bytes: [UInt8]
    public init(capacity: Int = 64) { bytes = []; bytes.reserveCapacity(capacity) }

    public mutating func u8(_ v: UInt8) { bytes.append(v) }
    public mutating func u16(_ v: UInt16) { withUnsafeBytes(of: v.littleEndian) { bytes.append(contentsOf: $0) } }
    public mutating func u32(_ v: UInt32) { withUnsafeBytes(of: v.littleEndian) { bytes.append(contentsOf: $0) } }
    public mutating func u64(_ v: UInt64) { withUnsafeBytes(of: v.littleEndian) { bytes.append(contentsOf: $0) } }
    public mutating func i32(_ v: Int32) { u32(UInt32(bitPattern: v)) }
    public mutating func append<C: Collection>(_ data: C) where C.Element == UInt8 { bytes.append(contentsOf: data) }
    public mutating func zeros(_ n: Int) { bytes.append(contentsOf: repeatElement(0, count: n)) }
    public var count: Int { bytes.count }
    /// Overwrite a u32 already written (for argsz fields known only at the end).
    public mutating func patchU32(at offset: Int, _ v: UInt32) {
        withUnsafeBytes(of: v.littleEndian) { for i in 0..<4 { bytes[offset + i] = $0[i] } }
    }
}

/// Bounded little-endian reader: every read checks the remaining length and throws
/// `WireError.truncated` instead of reading past the end.
public struct WireReader {
    public let bytes: ArraySlice<UInt8>
    public private(set) var position: Int
    public let context: String

    public init(_ bytes: ArraySlice<UInt8>, context: String) {
        self.bytes = bytes
        position = bytes.startIndex
        self.context = context
    }
    public init(_ bytes: [UInt8], context: String) { self.init(bytes[...], context: context) }

    public var remaining: Int { bytes.endIndex - position }
    public var consumed: Int { position - bytes.startIndex }

    private mutating func take(_ n: Int) throws -> ArraySlice<UInt8> {
        guard n >= 0, remaining >= n else {
            throw WireError.truncated(what: context, need: consumed + n, have: bytes.count)
        }
        defer { position += n }
        return bytes[position..<position + n]
    }

    public mutating func u8() throws -> UInt8 { try take(1).first! }
    public mutating func u16() throws -> UInt16 { let s = try take(2); return UInt16(s[s.startIndex]) | UInt16(s[s.startIndex + 1]) << 8 }
    public mutating func u32() throws -> UInt32 {
        let s = try take(4); var v: UInt32 = 0
        for i in 0..<4 { v |= UInt32(s[s.startIndex + i]) << (8 * UInt32(i)) }
        return v
    }
    public mutating func u64() throws -> UInt64 {
        let s = try take(8); var v: UInt64 = 0
        for i in 0..<8 { v |= UInt64(s[s.startIndex + i]) << (8 * UInt64(i)) }
        return v
    }
    public mutating func i32() throws -> Int32 { Int32(bitPattern: try u32()) }
    public mutating func bytes(_ n: Int) throws -> ArraySlice<UInt8> { try take(n) }
    public mutating func rest() -> ArraySlice<UInt8> { defer { position = bytes.endIndex }; return bytes[position...] }
    public mutating func skip(_ n: Int) throws { _ = try take(n) }
}

/// Big-endian helpers (QEMU's migration stream is big-endian).
extension WireWriter {
    public mutating func be32(_ v: UInt32) { withUnsafeBytes(of: v.bigEndian) { bytes.append(contentsOf: $0) } }
    public mutating func be64(_ v: UInt64) { withUnsafeBytes(of: v.bigEndian) { bytes.append(contentsOf: $0) } }
}
