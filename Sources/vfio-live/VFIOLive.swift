import ArgumentParser
import LiveUpdate
import SystemCalls

@main
struct VFIOLive: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "vfio-live",
        abstract: "Live migration and live update of VMs whose devices are assigned through VFIO.",
        discussion: """
            vfio-live speaks vfio-user on both ends: it serves devices (the part the kernel and a
            vendor driver play for an assigned device) and drives them as a VMM does.

            Start here:
              vfio-live demo                         run the end-to-end demonstration
              vfio-live device serve --socket S      serve a dma-engine device on socket S
              vfio-live device info --socket S       inspect any vfio-user server
              vfio-live device migrate --from A --to B --precopy
                                                     move a device's state between two servers
              vfio-live bench vfio-user              measure against raw socket and memcpy
            """,
        subcommands: [DeviceCommand.self, VMCommand.self, MigrateCommand.self, UpdateCommand.self, BenchCommand.self, DemoCommand.self, LabCommand.self])

    /// A VMM about to exec or spawn this binary for a live update asks it first (--cpr-probe).
    static func main() {
        CPRProbe.answerIfAsked()
        Self.main(nil)
    }
}

struct GlobalOptions: ParsableArguments {
    @Flag(name: .shortAndLong, help: "Log debug detail (every negotiation, every refusal).")
    var verbose = false
    @Flag(name: .shortAndLong, help: "Log only warnings and errors.")
    var quiet = false

    func apply() {
        Log.level = verbose ? .debug : (quiet ? .warning : .info)
    }
}

/// Parse sizes such as 16M, 1GiB, 4096, 0x1000.
func parseSize(_ s: String) throws -> UInt64 {
    let t = s.trimmingCharacters(in: .whitespaces).lowercased()
    let units: [(String, UInt64)] = [("gib", 1 << 30), ("mib", 1 << 20), ("kib", 1 << 10), ("g", 1 << 30), ("m", 1 << 20), ("k", 1 << 10), ("b", 1)]
    for (suffix, mult) in units where t.hasSuffix(suffix) {
        guard let v = UInt64(t.dropLast(suffix.count)) else { break }
        return v * mult
    }
    if t.hasPrefix("0x"), let v = UInt64(t.dropFirst(2), radix: 16) { return v }
    guard let v = UInt64(t) else { throw ValidationError("'\(s)' is not a size (examples: 4096, 64K, 16M, 1G)") }
    return v
}

extension String {
    func trimmingCharacters(in set: Set<Character>) -> String {
        var s = Substring(self)
        while let f = s.first, set.contains(f) { s = s.dropFirst() }
        while let l = s.last, set.contains(l) { s = s.dropLast() }
        return String(s)
    }
}
extension Set where Element == Character { static var whitespaces: Set<Character> { [" ", "\t", "\n"] } }

func formatBytes(_ n: UInt64) -> String {
    if n >= 1 << 30 { return String(format1(Double(n) / Double(1 << 30))) + " GiB" }
    if n >= 1 << 20 { return String(format1(Double(n) / Double(1 << 20))) + " MiB" }
    if n >= 1 << 10 { return String(format1(Double(n) / Double(1 << 10))) + " KiB" }
    return "\(n) B"
}

func format1(_ d: Double) -> String { formatFixed(d, 1) }

