import ArgumentParser
import Glibc
import SystemCalls
import VFIO
import VFIOUser

extension DeviceCommand {
    struct Migrate: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Move a running device's state from one vfio-user server to another.",
            discussion: HelpText.reflow("""
                The destination goes RUNNING→STOP→RESUMING; with --precopy the source enters
                PRE_COPY and its data is copied in rounds while it keeps running; then the source
                goes to STOP_COPY, the rest is copied, the destination loads it (RESUMING→STOP,
                where the device validates the image) and runs, and the source stops.
                If anything fails, the source device is returned to RUNNING with its state intact
                and the destination is reset. SIGINT (Ctrl-C) or SIGTERM does the same at the next
                chunk of state, and the command exits 1. Works with any server implementing
                migration v2; --protocol v1 uses the seed's migration region instead.

                Example:
                  vfio-live device migrate --from /tmp/a.sock --to /tmp/b.sock --precopy
                """))
        @Option(help: "Socket of the server whose device state is moved.")
        var from: String
        @Option(help: "Socket of the server that receives it (same device model and size).")
        var to: String
        @Flag(help: "Copy state in pre-copy rounds while the source device runs.")
        var precopy = false
        @Option(help: "Migration protocol: v2 (VFIO_DEVICE_FEATURE) or v1 (migration region). Default: v2 if offered.")
        var `protocol`: String?
        @Option(help: "Most pre-copy rounds before stop-copy.")
        var maxRounds = 8
        @OptionGroup var timeout: DeviceTimeoutOption
        @OptionGroup var global: GlobalOptions

        mutating func validate() throws {
            if let p = `protocol`, MigrationProtocol(rawValue: p) == nil { throw ValidationError("--protocol must be v1 or v2") }
            try checkSocketPath(from, option: "--from")
            try checkSocketPath(to, option: "--to")
        }

        func run() throws {
            global.apply()
            let proto = `protocol`.flatMap(MigrationProtocol.init(rawValue:))
            func connect(_ path: String, _ role: String) throws -> VFIOUserClient {
                do { return try connectDevice(path, timeout: timeout) } catch {
                    throw Failure("cannot connect to the \(role) server: \(error)")
                }
            }
            let a = try connect(from, "source"), b = try connect(to, "destination")
            defer { a.close(); b.close() }
            let src: DeviceMigration, dst: DeviceMigration
            do { src = try DeviceMigration(device: a, prefer: proto) } catch { throw Failure("source: \(error)") }
            do { dst = try DeviceMigration(device: b, prefer: proto) } catch { throw Failure("destination: \(error)") }
            var o = DeviceStateTransfer.Options()
            o.preCopy = precopy
            o.maxPreCopyRounds = maxRounds
            let t = DeviceStateTransfer(source: src, destination: dst, options: o)
            t.afterPreCopyRound = { round, bytes in print("pre-copy round \(round): \(formatBytes(bytes))"); fflush(stdout) }
            // A signal stops the transfer between two chunks, through its own rollback: the
            // source back to RUNNING, the destination reset (killing the process mid-way would
            // leave the source in PRE_COPY or STOP_COPY).
            let stop = try EventFD(nonBlocking: true)
            installStopSignals(stop.fd.rawValue)
            let delay = getenv("VFIO_LIVE_TEST_CHUNK_DELAY_MS").flatMap { UInt32(String(cString: $0)) } ?? 0
            func checkSignal() throws {
                if (try? Poll.waitReadable(stop.fd, timeoutMilliseconds: 0)) == true { throw Failure("interrupted by a signal") }
            }
            t.beforeDestinationWrite = { _ in
                if delay > 0 { usleep(delay * 1000) }  // tests only: a transfer slow enough to interrupt
                try checkSignal()
            }
            t.beforeStopCopy = checkSignal
            let r: DeviceTransferReport
            do { r = try t.run() } catch { throw Failure("\(error)") }
            print("protocol:          migration \(r.protocolUsed) (source flags \(src.capabilities))")
            print("source path:       \(r.sourcePath.map(\.description).joined(separator: " → "))")
            print("destination path:  \(r.destinationPath.map(\.description).joined(separator: " → "))")
            print("pre-copy:          \(r.preCopyRounds) round(s), \(formatBytes(r.preCopyBytes))")
            print("stop-copy:         \(formatBytes(r.stopCopyBytes)) in \(formatFixed(Double(r.stopCopyNanoseconds) / 1e6, 2)) ms")
            print("total:             \(formatBytes(r.totalBytes)) in \(formatFixed(Double(r.totalNanoseconds) / 1e6, 2)) ms")
        }
    }
}
