/// A small, strict JSON value and parser for the VERSION capabilities object. vfio-live keeps
/// Foundation out of its core, and this parser is bounded (depth, length) so that the fuzzed
/// message decoder cannot be driven into deep recursion.
public indirect enum JSONValue: Equatable, CustomStringConvertible {
    case null
    case bool(Bool)
    case number(Double)
    case string(String)
    case array([JSONValue])
    case object([(String, JSONValue)])

    public static func == (a: JSONValue, b: JSONValue) -> Bool {
        switch (a, b) {
        case (.null, .null): return true
        case let (.bool(x), .bool(y)): return x == y
        case let (.number(x), .number(y)): return x == y
        case let (.string(x), .string(y)): return x == y
        case let (.array(x), .array(y)): return x == y
        case let (.object(x), .object(y)): return x.count == y.count && zip(x, y).allSatisfy { $0.0 == $1.0 && $0.1 == $1.1 }
        default: return false
        }
    }

    public subscript(key: String) -> JSONValue? {
        if case let .object(members) = self { return members.last { $0.0 == key }?.1 }
        return nil
    }
    public var uint64: UInt64? {
        if case let .number(d) = self, d >= 0, d <= 1.8e19, d == d.rounded() { return UInt64(d) }
        return nil
    }
    public var boolValue: Bool? { if case let .bool(b) = self { return b }; return nil }
    public var stringValue: String? { if case let .string(s) = self { return s }; return nil }

    public var description: String {
        switch self {
        case .null: return "null"
        case let .bool(b): return b ? "true" : "false"
        case let .number(d):
            if d == d.rounded(), abs(d) < 1e18 { return String(Int64(d)) }
            return String(d)
        case let .string(s):
            var out = "\""
            for u in s.unicodeScalars {
                switch u {
                case "\"": out += "\\\""
                case "\\": out += "\\\\"
                case "\n": out += "\\n"
                case "\t": out += "\\t"
                default:
                    if u.value < 0x20 { out += "\\u" + String(repeating: "0", count: 4 - String(u.value, radix: 16).count) + String(u.value, radix: 16) }
                    else { out.unicodeScalars.append(u) }
                }
            }
            return out + "\""
        case let .array(a): return "[" + a.map(\.description).joined(separator: ",") + "]"
        case let .object(m): return "{" + m.map { JSONValue.string($0.0).description + ":" + $0.1.description }.joined(separator: ",") + "}"
        }
    }

    public static func parse(_ bytes: ArraySlice<UInt8>, maxDepth: Int = 16) throws -> JSONValue {
        var p = JSONParser(bytes: Array(bytes), maxDepth: maxDepth)
        p.skipSpace()
        let v = try p.value(depth: 0)
        p.skipSpace()
        guard p.i == p.bytes.count else { throw WireError.invalid("VERSION capabilities: trailing data after JSON") }
        return v
    }
}

private struct JSONParser {
    let bytes: [UInt8]
    let maxDepth: Int
    var i = 0

    init(bytes: [UInt8], maxDepth: Int) { self.bytes = bytes; self.maxDepth = maxDepth }

    func fail(_ why: String) -> WireError { .invalid("VERSION capabilities: invalid JSON at byte \(i): \(why)") }

    mutating func skipSpace() {
        while i < bytes.count, [0x20, 0x0a, 0x0d, 0x09].contains(bytes[i]) { i += 1 }
    }

    mutating func expect(_ lit: String) throws {
        for c in lit.utf8 {
            guard i < bytes.count, bytes[i] == c else { throw fail("expected \(lit)") }
            i += 1
        }
    }

    mutating func value(depth: Int) throws -> JSONValue {
        guard depth < maxDepth else { throw fail("nested too deeply") }
        guard i < bytes.count else { throw fail("unexpected end") }
        switch bytes[i] {
        case UInt8(ascii: "{"):
            i += 1; skipSpace()
            var members: [(String, JSONValue)] = []
            if i < bytes.count, bytes[i] == UInt8(ascii: "}") { i += 1; return .object(members) }
            while true {
                skipSpace()
                guard case let .string(k) = try string() else { throw fail("key") }
                skipSpace(); try expect(":"); skipSpace()
                members.append((k, try value(depth: depth + 1)))
                skipSpace()
                guard i < bytes.count else { throw fail("unterminated object") }
                if bytes[i] == UInt8(ascii: ",") { i += 1; continue }
                if bytes[i] == UInt8(ascii: "}") { i += 1; return .object(members) }
                throw fail("expected , or }")
            }
        case UInt8(ascii: "["):
            i += 1; skipSpace()
            var items: [JSONValue] = []
            if i < bytes.count, bytes[i] == UInt8(ascii: "]") { i += 1; return .array(items) }
            while true {
                skipSpace()
                items.append(try value(depth: depth + 1))
                skipSpace()
                guard i < bytes.count else { throw fail("unterminated array") }
                if bytes[i] == UInt8(ascii: ",") { i += 1; continue }
                if bytes[i] == UInt8(ascii: "]") { i += 1; return .array(items) }
                throw fail("expected , or ]")
            }
        case UInt8(ascii: "\""): return try string()
        case UInt8(ascii: "t"): try expect("true"); return .bool(true)
        case UInt8(ascii: "f"): try expect("false"); return .bool(false)
        case UInt8(ascii: "n"): try expect("null"); return .null
        default: return try number()
        }
    }

    mutating func string() throws -> JSONValue {
        try expect("\"")
        var scalars = String.UnicodeScalarView()
        var raw: [UInt8] = []
        while true {
            guard i < bytes.count else { throw fail("unterminated string") }
            let c = bytes[i]; i += 1
            if c == UInt8(ascii: "\"") { break }
            if c < 0x20 { throw fail("control character in string") }
            if c == UInt8(ascii: "\\") {
                guard i < bytes.count else { throw fail("bad escape") }
                let e = bytes[i]; i += 1
                let map: [UInt8: UInt8] = [0x22: 0x22, 0x5c: 0x5c, 0x2f: 0x2f, 0x62: 8, 0x66: 12, 0x6e: 10, 0x72: 13, 0x74: 9]
                if let m = map[e] { raw.append(m); continue }
                guard e == UInt8(ascii: "u"), i + 4 <= bytes.count,
                      let v = UInt32(String(decoding: bytes[i..<i + 4], as: UTF8.self), radix: 16) else { throw fail("bad escape") }
                i += 4
                raw.append(contentsOf: Array(String(Unicode.Scalar(v) ?? "?").utf8))
                continue
            }
            raw.append(c)
        }
        guard let s = String(validating: raw, as: UTF8.self) else { throw fail("string is not UTF-8") }
        scalars.append(contentsOf: s.unicodeScalars)
        return .string(String(scalars))
    }

    mutating func number() throws -> JSONValue {
        let start = i
        while i < bytes.count, "-+.eE0123456789".utf8.contains(bytes[i]) { i += 1 }
        guard i > start, i - start <= 32, let d = Double(String(decoding: bytes[start..<i], as: UTF8.self)) else {
            throw fail("expected a value")
        }
        return .number(d)
    }
}
