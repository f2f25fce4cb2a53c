import ArgumentParser
import Devices
import Glibc
import SystemCalls
import VFIO
import VFIOUser

struct DeviceCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "device",
        abstract: "Serve, inspect and migrate vfio-user devices.",
        subcommands: [Serve.self, Info.self, Migrate.self])
}

/// The eventfd a SIGINT/SIGTERM handler writes to (a signal handler can only touch globals).
nonisolated(unsafe) var signalCancelFD: Int32 = -1

func installStopSignals(_ fd: Int32) {
    signalCancelFD = fd
    let handler: @convention(c) (Int32) -> Void = { _ in
        var one: UInt64 = 1
        _ = write(signalCancelFD, &one, 8)
    }
    signal(SIGINT, handler)
    signal(SIGTERM, handler)
    signal(SIGPIPE, SIG_IGN)
}

extension DeviceCommand {
    struct Serve: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Serve a device over vfio-user until SIGINT or SIGTERM.",
            discussion: """
                The socket is created 0600 and removed on exit. One client at a time; when a client
                disconnects its DMA mappings and interrupt eventfds are dropped but the device state
                is kept, so a client can reconnect (as the vfio-user spec asks).

                Example:
                  vfio-live device serve --device dma-engine --socket /tmp/dma.sock --state-size 64M
                """)

        @Option(help: "Device model to serve (only 'dma-engine' today).")
        var device = "dma-engine"
        @Option(help: "Path of the UNIX socket to listen on.")
        var socket: String
        @Option(name: .customLong("socket-path"), help: .hidden)
        var socketPath: String?
        @Option(help: "Device-local memory of dma-engine: a power of two from 128K to 4G.")
        var stateSize = "16M"
        @Option(help: "Dirty tracking of device DMA: 'precise' (log the pages written) or 'pinned' (every mapped page reports dirty, as the seed type1 IOMMU did).")
        var dirtyTracking = "precise"
        @Flag(help: "Do not offer a twin socket (server→client DMA messages then share the main socket).")
        var noTwinSocket = false
        @OptionGroup var global: GlobalOptions

        mutating func validate() throws {
            guard device == "dma-engine" else { throw ValidationError("unknown device '\(device)': the available device is dma-engine") }
            guard DMAMapTable.DirtyTrackingMode(rawValue: dirtyTracking) != nil else {
                throw ValidationError("--dirty-tracking must be 'precise' or 'pinned'")
            }
            try checkSocketPath(socketPath ?? socket, option: "--socket")
        }

        func run() throws {
            global.apply()
            let size = try parseSize(stateSize)
            let model: DMAEngine
            do { model = try DMAEngine(stateSize: size) } catch let e as DeviceError { throw ValidationError(e.reason) }
            var o = VFIOUserServer.Options()
            o.offerTwinSocket = !noTwinSocket
            o.dirtyTracking = DMAMapTable.DirtyTrackingMode(rawValue: dirtyTracking)!
            let server = try VFIOUserServer(device: model, name: "dma-engine", options: o)
            let path = socketPath ?? socket
            let listener: UnixListener
            do { listener = try UnixListener(path: path) } catch let e as Errno {
                throw Failure("cannot listen on \(path): \(e)")
            }
            installStopSignals(server.cancelFD)
            Log.info("dma-engine", "serving on \(path) (device memory \(formatBytes(size)), dirty tracking \(dirtyTracking)); SIGINT or SIGTERM stops")
            server.serve(listener: listener)
            listener.close()
            model.shutdown()
            Log.info("dma-engine", "stopped after \(server.connectionsServed) connection(s), \(server.messagesHandled) messages, \(server.errorsReplied) refused; socket removed")
        }
    }

    struct Info: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Connect to any vfio-user server and describe the device.",
            discussion: """
                Prints the negotiated version and capabilities, every region (index, size, flags,
                mmap areas, type), every IRQ index, and the device's migration support (v2 feature
                flags, DMA logging, a v1 migration region). Works with any spec-compliant server,
                libvfio-user's included. A server that does not accept or answer within
                --device-timeout (one busy with another VMM, say) is reported as such.

                Example:
                  vfio-live device info --socket /tmp/dma.sock --json
                """)
        @Option(help: "Path of the server's UNIX socket.")
        var socket: String
        @Flag(help: "Print JSON instead of text.")
        var json = false
        @OptionGroup var timeout: DeviceTimeoutOption
        @OptionGroup var global: GlobalOptions

        func validate() throws { try checkSocketPath(socket, option: "--socket") }

        func run() throws {
            global.apply()
            let c = try connectDevice(socket, timeout: timeout)
            defer { c.close() }
            let report: DeviceReport
            do { report = try DeviceReport.collect(c) } catch { throw Failure("the server at \(socket): \(error)") }
            print(json ? report.json.description : report.text)
        }
    }
}

/// What `device info` finds out about a device.
struct DeviceReport {
    var version: (UInt16, UInt16)
    var capabilities: Capabilities
    var capabilitiesJSON: String?
    var twinSocket: Bool
    var info: DeviceInfo
    var regions: [(RegionInfo, Bool)]  // (info, fd offered)
    var irqs: [IRQInfo]
    var migration: MigrationCapabilities?
    var dmaLogging: Bool
    var v1Region: UInt32?

    static func collect(_ c: VFIOUserClient) throws -> DeviceReport {
        let info = try c.deviceInfo()
        var regions: [(RegionInfo, Bool)] = []
        var v1: UInt32?
        for i in 0..<min(info.regionCount, 64) {
            guard let (r, fd) = try? c.regionInfo(i) else { continue }
            fd?.close()
            if r.size == 0 && r.flags.rawValue == 0 { continue }
            if let t = r.type, t.type == 3, t.subtype == 1 { v1 = i }
            regions.append((r, fd != nil))
        }
        var irqs: [IRQInfo] = []
        for i in 0..<min(info.irqCount, 16) { if let q = try? c.irqInfo(i), q.count > 0 { irqs.append(q) } }
        let mig = try? c.migrationCapabilities()
        let logging = c.probeFeature(DeviceFeature.dmaLoggingStart, get: false)
        return DeviceReport(version: c.serverVersion, capabilities: c.serverCapabilities, capabilitiesJSON: c.serverJSON,
                            twinSocket: c.twinSocketActive, info: info, regions: regions, irqs: irqs,
                            migration: mig ?? nil, dmaLogging: logging, v1Region: v1)
    }

    static func flagNames(_ f: RegionFlags) -> String {
        var n: [String] = []
        if f.contains(.read) { n.append("read") }
        if f.contains(.write) { n.append("write") }
        if f.contains(.mmap) { n.append("mmap") }
        if f.contains(.caps) { n.append("caps") }
        return n.joined(separator: ",")
    }
    static func irqFlagNames(_ f: IRQInfoFlags) -> String {
        var n: [String] = []
        if f.contains(.eventfd) { n.append("eventfd") }
        if f.contains(.maskable) { n.append("maskable") }
        if f.contains(.automasked) { n.append("automasked") }
        if f.contains(.noresize) { n.append("noresize") }
        return n.joined(separator: ",")
    }
    static let regionNames: [UInt32: String] = [0: "BAR0", 1: "BAR1", 2: "BAR2", 3: "BAR3", 4: "BAR4", 5: "BAR5", 6: "ROM", 7: "CONFIG", 8: "VGA"]
    static let irqNames: [UInt32: String] = [0: "INTx", 1: "MSI", 2: "MSI-X", 3: "ERR", 4: "REQ"]

    var text: String {
        var out = "vfio-user \(version.0).\(version.1)\n"
        out += "capabilities: max_msg_fds \(capabilities.maxMessageFDs), max_data_xfer_size \(capabilities.maxDataXferSize), "
        out += "max_dma_maps \(capabilities.maxDMAMaps), pgsizes \(hex(capabilities.pageSizes)), twin_socket \(twinSocket ? "on" : "off")"
        if let m = capabilities.migration { out += ", migration.pgsize \(m.pageSize)" }
        out += "\n"
        out += "device: flags \(hex(UInt64(info.flags)))\(info.flags & DeviceInfo.flagPCI != 0 ? " (PCI" : " (")\(info.flags & DeviceInfo.flagReset != 0 ? ", reset)" : ")"), \(info.regionCount) regions, \(info.irqCount) IRQ indexes\n"
        out += "regions:\n"
        for (r, fd) in regions {
            let name = Self.regionNames[r.index] ?? "region \(r.index)"
            out += "  \(r.index) \(name): size \(hex(r.size)) (\(formatBytes(r.size))), \(Self.flagNames(r.flags))"
            if let a = r.sparseAreas { out += ", mmap areas " + a.map { "[\(hex($0.offset)), +\(hex($0.size))]" }.joined(separator: " ") + (fd ? " (fd offered)" : "") }
            if let t = r.type { out += ", type \(t.type)/\(t.subtype)\(t.type == 3 && t.subtype == 1 ? " (migration v1)" : "")" }
            out += "\n"
        }
        out += "irqs:\n"
        for q in irqs { out += "  \(q.index) \(Self.irqNames[q.index] ?? "index \(q.index)"): \(q.count) vector(s), \(Self.irqFlagNames(q.flags))\n" }
        out += "migration: "
        if let m = migration { out += "v2 (\(m))" } else { out += "no v2" }
        out += ", DMA logging \(dmaLogging ? "yes" : "no")"
        if let v = v1Region { out += ", v1 region at index \(v)" }
        return out
    }

    var json: JSONValue {
        var caps: [(String, JSONValue)] = [
            ("max_msg_fds", .number(Double(capabilities.maxMessageFDs))),
            ("max_data_xfer_size", .number(Double(capabilities.maxDataXferSize))),
            ("max_dma_maps", .number(Double(capabilities.maxDMAMaps))),
            ("pgsizes", .number(Double(capabilities.pageSizes))),
            ("twin_socket", .bool(twinSocket)),
        ]
        if let m = capabilities.migration { caps.append(("migration", .object([("pgsize", .number(Double(m.pageSize)))]))) }
        let regionsJSON: [JSONValue] = regions.map { r, fd in
            var o: [(String, JSONValue)] = [("index", .number(Double(r.index))), ("size", .number(Double(r.size))),
                                            ("flags", .string(Self.flagNames(r.flags))), ("fd", .bool(fd))]
            if let a = r.sparseAreas { o.append(("mmap_areas", .array(a.map { .object([("offset", .number(Double($0.offset))), ("size", .number(Double($0.size)))]) }))) }
            if let t = r.type { o.append(("type", .number(Double(t.type)))); o.append(("subtype", .number(Double(t.subtype)))) }
            return .object(o)
        }
        let irqsJSON: [JSONValue] = irqs.map { .object([("index", .number(Double($0.index))), ("count", .number(Double($0.count))), ("flags", .string(Self.irqFlagNames($0.flags)))]) }
        var mig: [(String, JSONValue)] = [("v2", migration.map { .string($0.description) } ?? .null), ("dma_logging", .bool(dmaLogging))]
        mig.append(("v1_region", v1Region.map { .number(Double($0)) } ?? .null))
        return .object([
            ("version", .string("\(version.0).\(version.1)")),
            ("capabilities", .object(caps)),
            ("device", .object([("flags", .number(Double(info.flags))), ("num_regions", .number(Double(info.regionCount))), ("num_irqs", .number(Double(info.irqCount)))])),
            ("regions", .array(regionsJSON)),
            ("irqs", .array(irqsJSON)),
            ("migration", .object(mig)),
        ])
    }
}
