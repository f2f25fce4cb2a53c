import VFIOUser

/// A JSON value as QEMU's QMP parser sees it: integer tokens stay integers (QAPI refuses
/// `1.0` where it wants an integer), and 64-bit unsigned values keep every bit.
public indirect enum QMPValue: Equatable {
    case null
    case bool(Bool)
    case int(Int64)
    case uint(UInt64)
    case double(Double)
    case string(String)
    case array([QMPValue])
    case object([(String, QMPValue)])

    public static func == (a: QMPValue, b: QMPValue) -> Bool {
        switch (a, b) {
        case (.null, .null): return true
        case let (.bool(x), .bool(y)): return x == y
        case let (.int(x), .int(y)): return x == y
        case let (.uint(x), .uint(y)): return x == y
        case let (.double(x), .double(y)): return x == y
        case let (.string(x), .string(y)): return x == y
        case let (.array(x), .array(y)): return x == y
        case let (.object(x), .object(y)): return x.count == y.count && zip(x, y).allSatisfy { $0.0 == $1.0 && $0.1 == $1.1 }
        default: return false
        }
    }

    public subscript(key: String) -> QMPValue? {
        if case let .object(m) = self { return m.first { $0.0 == key }?.1 }
        return nil
    }

    /// The value for the handlers, which take the project's JSONValue.
    public var json: JSONValue {
        switch self {
        case .null: return .null
        case let .bool(b): return .bool(b)
        case let .int(i): return .number(Double(i))
        case let .uint(u): return .number(Double(u))
        case let .double(d): return .number(d)
        case let .string(s): return .string(s)
        case let .array(a): return .array(a.map(\.json))
        case let .object(m): return .object(m.map { ($0.0, $0.1.json) })
        }
    }

    /// A handler's JSONValue answer, integers made exact where a double holds one exactly.
    public init(_ j: JSONValue) {
        switch j {
        case .null: self = .null
        case let .bool(b): self = .bool(b)
        case let .number(d):
            if d == d.rounded(), abs(d) < 9.2e18 { self = .int(Int64(d)) } else { self = .double(d) }
        case let .string(s): self = .string(s)
        case let .array(a): self = .array(a.map(QMPValue.init))
        case let .object(m): self = .object(m.map { ($0.0, QMPValue($0.1)) })
        }
    }

    /// A QAPI uint64 as QEMU's input visitor reads it: exact, and a negative int64 taken as
    /// its two's complement (QEMU accepts negatives "for backward compatibility"). nil for
    /// anything else (a double, 2^64 and above, a non-number).
    public var uint64: UInt64? {
        switch self {
        case let .uint(u): return u
        case let .int(i): return UInt64(bitPattern: i)
        default: return nil
        }
    }
}

/// QEMU's QMP input stream, rebuilt from its observable behaviour (QEMU 11.1): a byte-wise lexer
/// with error recovery, a push parser fed token by token, and the per-message limits.
///
/// - A lexical error ("stray") resets the message at once; the lexer then skips bytes up to a
///   structural character, a control character or 0xFE/0xFF (so a newline ends an unterminated
///   string, and the next line is read afresh).
/// - A syntax error is reported at once; the rest of that message is skipped until its braces
///   and brackets balance (or go negative).
/// - Limits per message: 64 MiB of tokens, 2 Mi tokens, nesting 1024, as QEMU's.
/// - Positions are "line:column" of the token, 1-based, in bytes since the connection opened.
///   QEMU's column is one too far after a token ended by lookahead (a number or keyword) or after
///   a lexical error; that is kept, so that messages compare equal.
public struct QMPStreamer {
    public static let maxMessageBytes = 64 << 20
    public static let maxTokens = 2 << 20
    public static let maxNesting = 1024

    public enum Output { case value(QMPValue), error(String) }

    private enum State { case start, recovery, dq, dqEscape, sq, sqEscape, zero, expE, expSign, expDigits, mantissa, mantissaDigits, digits, sign, keyword }
    private enum TokenType { case lcurly, rcurly, lsquare, rsquare, colon, comma, integer, float, keyword, string }
    private enum Step { case to(State), token(TokenType), tokenLookahead(TokenType), startLookahead, error }

    private var state = State.start
    private var token: [UInt8] = []
    private var x = 0, y = 0
    private var startX = 1, startY = 0
    // Streamer (message) state.
    private var braces = 0, brackets = 0, tokenCount = 0, tokenBytes = 0
    private var skipping = false
    private var parser = PushParser()
    /// QEMU's 64 MiB; smaller only in tests of the mechanism.
    let messageLimit: Int

    public init() { messageLimit = Self.maxMessageBytes }
    init(messageLimit: Int) { self.messageLimit = messageLimit }

    /// Feed bytes; each complete message or error is handed to `emit` in order.
    public mutating func feed(_ bytes: UnsafeRawBufferPointer, emit: (Output) -> Void) {
        for b in bytes { feedByte(b, emit) }
    }

    private mutating func feedByte(_ ch: UInt8, _ emit: (Output) -> Void) {
        x += 1
        if ch == 0x0a { x = 0; y += 1 }
        var consumed = false
        while !consumed {
            let step = transition(state, ch)
            switch step {
            case let .to(s):
                consumed = true
                token.append(ch)
                if s == .start { token.removeAll(keepingCapacity: true); markStart() }  // whitespace
                state = s
            case let .token(t):
                consumed = true
                token.append(ch)
                process(t, emit); token.removeAll(keepingCapacity: true); markStart(); state = .start
            case let .tokenLookahead(t):
                process(t, emit); token.removeAll(keepingCapacity: true); markStart(); state = .start
            case .startLookahead:
                token.removeAll(keepingCapacity: true); markStart(); state = .start
            case .error:
                consumed = true
                token.append(ch)
                lexicalError(emit)
                token.removeAll(keepingCapacity: true); markStart(); state = .recovery
            }
            if state == .recovery && consumed { token.removeAll(keepingCapacity: true); markStart() }
        }
        // A single token longer than the message limit: QEMU's lexer cuts it off here.
        if token.count > messageLimit {
            if !skipping { limitError("JSON token size limit exceeded", emit) }
            token.removeAll(); markStart(); state = .start
        }
    }

    private mutating func markStart() { startX = x + 1; startY = y }
    private var position: String { "\(startY + 1):\(startX)" }

    private func transition(_ s: State, _ c: UInt8) -> Step {
        let digit = c >= 0x30 && c <= 0x39
        switch s {
        case .recovery:
            if c < 0x20 && c != 0x09 { return .startLookahead }
            if c >= 0xFE { return .startLookahead }
            if "[]{}:,".utf8.contains(c) { return .startLookahead }
            return .to(.recovery)
        case .dq, .sq:
            if c == 0x5c { return .to(s == .dq ? .dqEscape : .sqEscape) }
            if (s == .dq && c == 0x22) || (s == .sq && c == 0x27) { return .token(.string) }
            return c >= 0x20 && c <= 0xFD ? .to(s) : .error
        case .dqEscape, .sqEscape:
            return c >= 0x20 && c <= 0xFD ? .to(s == .dqEscape ? .dq : .sq) : .error
        case .zero:
            if digit { return .error }
            if c == 0x2e { return .to(.mantissa) }
            return .tokenLookahead(.integer)
        case .digits:
            if digit { return .to(.digits) }
            if c == 0x65 || c == 0x45 { return .to(.expE) }
            if c == 0x2e { return .to(.mantissa) }
            return .tokenLookahead(.integer)
        case .sign:
            if c == 0x30 { return .to(.zero) }
            return digit ? .to(.digits) : .error
        case .mantissa: return digit ? .to(.mantissaDigits) : .error
        case .mantissaDigits:
            if digit { return .to(.mantissaDigits) }
            if c == 0x65 || c == 0x45 { return .to(.expE) }
            return .tokenLookahead(.float)
        case .expE:
            if c == 0x2b || c == 0x2d { return .to(.expSign) }
            return digit ? .to(.expDigits) : .error
        case .expSign: return digit ? .to(.expDigits) : .error
        case .expDigits: return digit ? .to(.expDigits) : .tokenLookahead(.float)
        case .keyword: return c >= 0x61 && c <= 0x7a ? .to(.keyword) : .tokenLookahead(.keyword)
        case .start:
            switch c {
            case 0x22: return .to(.dq)
            case 0x27: return .to(.sq)
            case 0x30: return .to(.zero)
            case 0x31...0x39: return .to(.digits)
            case 0x2d: return .to(.sign)
            case 0x7b: return .token(.lcurly)
            case 0x7d: return .token(.rcurly)
            case 0x5b: return .token(.lsquare)
            case 0x5d: return .token(.rsquare)
            case 0x2c: return .token(.comma)
            case 0x3a: return .token(.colon)
            case 0x61...0x7a: return .to(.keyword)
            case 0x20, 0x09, 0x0d, 0x0a: return .to(.start)
            default: return .error
            }
        }
    }

    private mutating func resetMessage() {
        braces = 0; brackets = 0; tokenCount = 0; tokenBytes = 0; skipping = false
        parser = PushParser()
    }

    private mutating func lexicalError(_ emit: (Output) -> Void) {
        // Inside a message already in error, QEMU drops it silently; otherwise it names the bytes
        // (up to a NUL, as a C string; invalid UTF-8 shown as U+FFFD).
        if !skipping {
            let shown = token.prefix { $0 != 0 }
            emit(.error("\(position): JSON parse error, stray '\(String(decoding: shown, as: UTF8.self))'"))
        }
        resetMessage()
    }

    private mutating func limitError(_ desc: String, _ emit: (Output) -> Void) {
        emit(.error(desc))
        parser = PushParser()
        skipping = true
        endIfBalanced()
    }

    private mutating func endIfBalanced() {
        if braces < 0 || brackets < 0 || (braces == 0 && brackets == 0) { resetMessage() }
    }

    private mutating func process(_ t: TokenType, _ emit: (Output) -> Void) {
        switch t {
        case .lcurly: braces += 1
        case .rcurly: braces -= 1
        case .lsquare: brackets += 1
        case .rsquare: brackets -= 1
        default: break
        }
        if skipping { return endIfBalanced() }
        if tokenBytes + token.count + 1 > messageLimit { return limitError("JSON token size limit exceeded", emit) }
        if tokenCount + 1 > Self.maxTokens { return limitError("JSON token count limit exceeded", emit) }
        if braces + brackets > Self.maxNesting { return limitError("JSON nesting depth limit exceeded", emit) }
        tokenCount += 1
        tokenBytes += token.count
        switch parser.feed(t: kind(t), token: token) {
        case .more: endIfBalanced()
        case let .done(v):
            emit(.value(v))
            resetMessage()
        case let .failed(msg):
            emit(.error("\(position): JSON parse error, \(msg)"))
            parser = PushParser()
            skipping = true
            endIfBalanced()
        }
    }

    private func kind(_ t: TokenType) -> PushParser.Token {
        switch t {
        case .lcurly: return .lcurly
        case .rcurly: return .rcurly
        case .lsquare: return .lsquare
        case .rsquare: return .rsquare
        case .colon: return .colon
        case .comma: return .comma
        case .integer: return .integer
        case .float: return .float
        case .keyword: return .keyword
        case .string: return .string
        }
    }
}

/// The parser half: a stack of open containers, fed one token at a time (no recursion, so the
/// 1024 levels the streamer allows cost no stack).
struct PushParser {
    enum Token { case lcurly, rcurly, lsquare, rsquare, colon, comma, integer, float, keyword, string }
    enum Result { case more, done(QMPValue), failed(String) }

    private enum State { case afterOpen, beforeKey, afterKey, beforeValue, afterValue }
    /// An open container; a class so that appending to it never copies what it holds.
    private final class Frame {
        let isObject: Bool
        var members: [(String, QMPValue)] = []
        var items: [QMPValue] = []
        var keys = Set<String>()
        var key = ""
        var state = State.afterOpen
        init(object: Bool) { isObject = object }
    }
    private var stack: [Frame] = []

    mutating func feed(t: Token, token: [UInt8]) -> Result {
        guard let top = stack.last else { return beginValue(t, token) }
        switch (top.isObject, top.state) {
        case (true, .afterOpen) where t == .rcurly, (true, .afterValue) where t == .rcurly:
            stack.removeLast()
            return complete(.object(top.members))
        case (false, .afterOpen) where t == .rsquare, (false, .afterValue) where t == .rsquare:
            stack.removeLast()
            return complete(.array(top.items))
        case (true, .afterOpen), (true, .beforeKey):
            top.state = .beforeKey
            guard t == .string else { return .failed("expecting key") }
            switch Self.string(token) {
            case let .failure(e): return .failed(e.m)
            case let .success(k): top.key = k; top.state = .afterKey; return .more
            }
        case (true, .afterKey):
            guard t == .colon else { return .failed("expecting ':'") }
            top.state = .beforeValue
            return .more
        case (_, .afterOpen), (_, .beforeValue):
            top.state = .beforeValue
            return beginValue(t, token)
        case (true, .afterValue):
            guard t == .comma else { return .failed("expected ',' or '}'") }
            top.state = .beforeKey
            return .more
        case (false, _):
            guard t == .comma else { return .failed("expected ',' or ']'") }
            top.state = .beforeValue
            return .more
        }
    }

    private mutating func beginValue(_ t: Token, _ token: [UInt8]) -> Result {
        switch t {
        case .lcurly: stack.append(Frame(object: true)); return .more
        case .lsquare: stack.append(Frame(object: false)); return .more
        case .string:
            switch Self.string(token) {
            case let .failure(e): return .failed(e.m)
            case let .success(s): return complete(.string(s))
            }
        case .integer:
            let text = String(decoding: token, as: UTF8.self)
            if let i = Int64(text) { return complete(.int(i)) }
            if token.first != 0x2d, let u = UInt64(text) { return complete(.uint(u)) }
            return complete(.double(Double(text) ?? .infinity))
        case .float: return complete(.double(Double(String(decoding: token, as: UTF8.self)) ?? .infinity))
        case .keyword:
            switch String(decoding: token, as: UTF8.self) {
            case "true": return complete(.bool(true))
            case "false": return complete(.bool(false))
            case "null": return complete(.null)
            case let k: return .failed("invalid keyword '\(k)'")
            }
        default: return .failed("expecting value")
        }
    }

    /// A value is complete: it is the message, or goes into the container below.
    private mutating func complete(_ v: QMPValue) -> Result {
        guard let below = stack.last else { return .done(v) }
        if below.isObject {
            guard below.keys.insert(below.key).inserted else { return .failed("duplicate key") }
            below.members.append((below.key, v))
        } else {
            below.items.append(v)
        }
        below.state = .afterValue
        return .more
    }

    /// Decode a string token (quotes included) as QEMU does: its escapes (plus \'), surrogate
    /// pairs, and "modified UTF-8" (C0 80 is NUL); invalid sequences and noncharacters refused.
    static func string(_ t: [UInt8]) -> Swift.Result<String, StringError> {
        var out = String.UnicodeScalarView()
        var i = 1
        let end = t.count - 1
        func hex4(_ at: Int) -> Int? {
            guard at + 4 <= end else { return nil }
            var v = 0
            for b in t[at..<at + 4] {
                guard let d = Int(String(UnicodeScalar(b)), radix: 16) else { return nil }
                v = v << 4 | d
            }
            return v
        }
        while i < end {
            let c = t[i]
            if c == 0x5c {
                let beg = i
                i += 1
                let e = t[i]; i += 1
                switch e {
                case 0x22: out.append("\""); continue
                case 0x27: out.append("'"); continue
                case 0x5c: out.append("\\"); continue
                case 0x2f: out.append("/"); continue
                case 0x62: out.append("\u{8}"); continue
                case 0x66: out.append("\u{c}"); continue
                case 0x6e: out.append("\n"); continue
                case 0x72: out.append("\r"); continue
                case 0x74: out.append("\t"); continue
                case 0x75:
                    var cp = hex4(i) ?? -1
                    i = min(i + 4, end)
                    if cp >= 0xD800 && cp <= 0xDBFF && i + 1 < end && t[i] == 0x5c && t[i + 1] == 0x75 {
                        if let tr = hex4(i + 2), tr >= 0xDC00 && tr <= 0xDFFF {
                            cp = 0x10000 + ((cp & 0x3FF) << 10) | (tr & 0x3FF)
                            i += 6
                        } else { cp = -1 }
                    }
                    guard cp >= 0, validCodepoint(UInt32(cp)), let u = Unicode.Scalar(UInt32(cp)) else {
                        return .failure(StringError("\(String(decoding: t[beg..<i], as: UTF8.self)) is not a valid Unicode character"))
                    }
                    out.append(u)
                    continue
                default: return .failure(StringError("invalid escape sequence in string"))
                }
            }
            guard let (cp, n) = modifiedUTF8(t, i, end) else { return .failure(StringError("invalid UTF-8 sequence in string")) }
            out.append(Unicode.Scalar(cp)!)
            i += n
        }
        return .success(String(out))
    }

    struct StringError: Error { let m: String; init(_ m: String) { self.m = m } }

    static func validCodepoint(_ cp: UInt32) -> Bool {
        if cp > 0x10FFFF { return false }
        if cp & 0xFFFF_F800 == 0xD800 { return false }  // surrogate
        if cp >= 0xFDD0 && cp <= 0xFDEF { return false }  // noncharacters
        if cp & 0xFFFE == 0xFFFE { return false }
        return true
    }

    /// One code point of modified UTF-8 at `i`: (code point, length), or nil.
    static func modifiedUTF8(_ t: [UInt8], _ i: Int, _ end: Int) -> (UInt32, Int)? {
        let b0 = t[i]
        if b0 < 0x80 { return b0 == 0 ? nil : (UInt32(b0), 1) }
        let n: Int, minimum: UInt32
        var cp: UInt32
        switch b0 {
        case 0xC0...0xDF: n = 2; cp = UInt32(b0 & 0x1F); minimum = 0x80
        case 0xE0...0xEF: n = 3; cp = UInt32(b0 & 0x0F); minimum = 0x800
        case 0xF0...0xF7: n = 4; cp = UInt32(b0 & 0x07); minimum = 0x10000
        default: return nil
        }
        guard i + n <= end else { return nil }
        for k in 1..<n {
            let b = t[i + k]
            guard b & 0xC0 == 0x80 else { return nil }
            cp = cp << 6 | UInt32(b & 0x3F)
        }
        if n == 2 && cp == 0 { return (0, 2) }  // modified UTF-8's NUL
        guard cp >= minimum, validCodepoint(cp) else { return nil }
        return (cp, n)
    }
}

