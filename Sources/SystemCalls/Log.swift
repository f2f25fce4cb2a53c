import Glibc

/// `0x…` for addresses, sizes and checksums in messages.
public func hex(_ v: UInt64) -> String { "0x" + String(v, radix: 16) }

/// One-line logging to stderr, with a level and a component. Kept dependency-free so every
/// layer can log; the CLI sets the level from --verbose/--quiet.
public enum Log {
    public enum Level: Int, Comparable, Sendable {
        case debug = 0, info, warning, error
        public static func < (a: Level, b: Level) -> Bool { a.rawValue < b.rawValue }
        var tag: String { ["debug", "info", "warning", "error"][rawValue] }
    }
    nonisolated(unsafe) public static var level: Level = .info
    nonisolated(unsafe) public static var sink: ((String) -> Void)? = nil
    private static let lock = Mutex()

    public static func write(_ l: Level, _ component: String, _ message: @autoclosure () -> String) {
        guard l >= level else { return }
        let line = "\(l.tag): \(component): \(message())"
        lock.withLock {
            if let s = sink { s(line) } else { fputs(line + "\n", stderr) }
        }
    }
    public static func debug(_ c: String, _ m: @autoclosure () -> String) { write(.debug, c, m()) }
    public static func info(_ c: String, _ m: @autoclosure () -> String) { write(.info, c, m()) }
    public static func warning(_ c: String, _ m: @autoclosure () -> String) { write(.warning, c, m()) }
    public static func error(_ c: String, _ m: @autoclosure () -> String) { write(.error, c, m()) }
}

/// 10 → "10", 0.5 → "0.5": seconds as an operator typed them.
public func formatSeconds(_ s: Double) -> String { s == s.rounded() ? String(Int(s)) : String(s) }

/// `d` with exactly `places` decimals, for reports (no Foundation).
public func formatFixed(_ d: Double, _ places: Int) -> String {
    if places == 0 { return String(Int(d.rounded())) }
    var p = 1.0
    for _ in 0..<places { p *= 10 }
    let r = (d * p).rounded() / p
    var s = String(r)
    if let dot = s.firstIndex(of: ".") {
        let decimals = s.distance(from: dot, to: s.endIndex) - 1
        if decimals < places { s += String(repeating: "0", count: places - decimals) }
        else if decimals > places { s = String(s[..<s.index(dot, offsetBy: places + 1)]) }
    } else if places > 0 { s += "." + String(repeating: "0", count: places) }
    return s
}
