import ArgumentParser
import Glibc
import LiveUpdate
import SystemCalls
import VFIOUser

@main
struct VFIOLive: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "vfio-live",
        abstract: "Live migration and live update of VMs whose devices are assigned through VFIO.",
        discussion: HelpText.reflow("""
            vfio-live speaks vfio-user on both ends: it serves devices (the part the kernel and a
            vendor driver play for an assigned device) and drives them as a VMM does.

            Start here:
              vfio-live demo                         run the end-to-end demonstration
              vfio-live device serve --socket S      serve a dma-engine device on socket S
              vfio-live device info --socket S       inspect any vfio-user server
              vfio-live device migrate --from A --to B --precopy
                                                     move a device's state between two servers
              vfio-live bench vfio-user              measure against raw socket and memcpy
            """),
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

/// A failure at run time (a socket that is gone, a server that refuses or does not answer):
/// ArgumentParser prints it as `Error: ...` and exits 1, without the usage text that a
/// `ValidationError` (a wrong command line, exit 64) gets.
struct Failure: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}

/// Parse sizes such as 16M, 1GiB, 4096, 0x1000.
func parseSize(_ s: String) throws -> UInt64 {
    let t = s.trimmingCharacters(in: .whitespaces).lowercased()
    if t.hasPrefix("-") { throw ValidationError("'\(s)' is negative: a size is 0 or more (examples: 4096, 64K, 16M, 1G)") }
    let units: [(String, UInt64)] = [("gib", 1 << 30), ("mib", 1 << 20), ("kib", 1 << 10), ("g", 1 << 30), ("m", 1 << 20), ("k", 1 << 10), ("b", 1)]
    for (suffix, mult) in units where t.hasSuffix(suffix) {
        guard let v = UInt64(t.dropLast(suffix.count)) else { break }
        let (r, overflow) = v.multipliedReportingOverflow(by: mult)
        guard !overflow else { throw ValidationError("'\(s)' is too large a size") }
        return r
    }
    if t.hasPrefix("0x"), let v = UInt64(t.dropFirst(2), radix: 16) { return v }
    guard let v = UInt64(t) else { throw ValidationError("'\(s)' is not a size (examples: 4096, 64K, 16M, 1G)") }
    return v
}

/// A whole number for `option` in `range`; negative and malformed values get their own message
/// (ArgumentParser would take `-1` for an option and say the value is missing).
func parseInteger(_ s: String, option: String, range: ClosedRange<Int>) throws -> Int {
    guard let v = Int(s.trimmingCharacters(in: .whitespaces)) else { throw ValidationError("\(option) takes a whole number, not '\(s)'") }
    guard range.contains(v) else { throw ValidationError("\(option) must be \(range.lowerBound)...\(range.upperBound) (got \(v))") }
    return v
}

/// Seconds for `option`: a positive number up to `max`.
func parseSeconds(_ s: String, option: String, max: Double = 3600) throws -> Double {
    guard let v = Double(s.trimmingCharacters(in: .whitespaces)), v.isFinite else { throw ValidationError("\(option) takes seconds, not '\(s)'") }
    guard v > 0, v <= max else { throw ValidationError("\(option) must be more than 0 and at most \(formatSeconds(max)) s (got \(s))") }
    return v
}

/// A UNIX socket path must fit sun_path (108 bytes including the NUL): a longer one could be
/// neither bound nor connected to, so it is refused before anything starts.
func checkSocketPath(_ path: String, option: String) throws {
    let n = path.utf8.count
    guard n > 0 else { throw ValidationError("\(option) needs a path") }
    guard n < UnixSocket.maxPathBytes else {
        throw ValidationError("\(option): the socket path is \(n) bytes; a UNIX socket path holds at most \(UnixSocket.maxPathBytes - 1) (sun_path is \(UnixSocket.maxPathBytes) bytes including the NUL)")
    }
}

/// The path in a `unix:PATH` address (`cpr:unix:PATH` after dropping `cpr:`), checked; nil for other schemes.
func checkUnixURI(_ uri: String, option: String) throws {
    if uri.hasPrefix("unix:") { try checkSocketPath(String(uri.dropFirst(5)), option: option) }
}

/// `--device-timeout`: how long a vfio-user server may stay silent.
struct DeviceTimeoutOption: ParsableArguments {
    @Option(name: .customLong("device-timeout"), parsing: .unconditional,
            help: "Seconds a vfio-user server may take to accept, or to answer any request, before the command fails (a server busy with another VMM never answers).")
    var deviceTimeout = "10"

    func validate() throws { _ = try parseSeconds(deviceTimeout, option: "--device-timeout") }

    var milliseconds: Int32 { Int32(((try? parseSeconds(deviceTimeout, option: "")) ?? 10) * 1000) }
}

/// Connect to the vfio-user server at `path` and negotiate, within `timeout`; `cancel` is an
/// eventfd a SIGINT/SIGTERM handler writes. Every failure says what happened at `path`.
func connectDevice(_ path: String, timeout: DeviceTimeoutOption, cancel: Int32? = nil) throws -> VFIOUserClient {
    var o = VFIOUserClient.Options()
    o.timeoutMilliseconds = timeout.milliseconds
    o.cancel = cancel
    let s = formatSeconds(Double(o.timeoutMilliseconds) / 1000)
    do { return try VFIOUserClient(path: path, options: o) }
    catch let e as Errno where e.rawValue == ETIMEDOUT {
        throw Failure("the server at \(path) did not accept the connection within \(s) s (its backlog is full): is another VMM connected?")
    } catch let e as Errno where e.rawValue == ECANCELED {
        throw Failure("interrupted by a signal while connecting to the server at \(path)")
    } catch let e as Errno {
        throw Failure("cannot connect to the vfio-user server at \(path): \(e)")
    } catch let VFIOUserClientError.timeout(command, _) {
        throw Failure("the server at \(path) accepted but did not answer \(command) within \(s) s: is another VMM connected?")
    } catch let VFIOUserClientError.cancelled(command) {
        throw Failure("interrupted by a signal while waiting for the server at \(path) to answer \(command)")
    } catch {
        throw Failure("the vfio-user server at \(path) failed the negotiation: \(error)")
    }
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

