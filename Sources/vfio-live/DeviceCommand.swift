import ArgumentParser
import Devices
import Glibc
import KernelVFIO
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
            discussion: HelpText.reflow("""
                The socket is created 0600 and removed on exit. One client at a time; when a client
                disconnects its DMA mappings and interrupt eventfds are dropped but the device state
                is kept, so a client can reconnect (as the vfio-user spec asks).

                Example:
                  vfio-live device serve --device dma-engine --socket /tmp/dma.sock --state-size 64M
                """))

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
            abstract: "Describe a VFIO device: a vfio-user server, or a kernel vfio-pci or mdev device.",
            discussion: HelpText.reflow("""
                Prints every region (index, size, flags, mmap areas, type), every IRQ index,
                and the device's migration support (v2 feature flags, DMA logging, a v1
                migration region). For a vfio-user server also the negotiated version and
                capabilities; works with any spec-compliant server, libvfio-user's
                included. A server that does not accept or answer within --device-timeout
                (one busy with another VMM, say) is reported as such.

                A kernel device is named as `vm run --device` names it, in QEMU's
                spelling; it is opened (legacy container or iommufd, as given), described
                and closed, and its IOMMU's dirty tracking is shown too. It must be bound
                to vfio-pci (a PCI device) and not held by another process.

                Examples:
                  vfio-live device info --socket /tmp/dma.sock --json
                  vfio-live device info --device vfio-pci,host=0000:00:04.0
                  vfio-live device info --device vfio-pci,sysfsdev=/sys/bus/mdev/devices/UUID,iommufd=on
                """))
        @Option(help: "Path of a vfio-user server's UNIX socket.")
        var socket: String?
        @Option(help: ArgumentHelp("The device as `vm run --device` takes it: vfio-user,socket=PATH | vfio-pci,host=DDDD:BB:DD.F | vfio-pci,sysfsdev=PATH [,iommufd=on].",
                                   valueName: "device"),
                transform: DeviceSpec.init(parsing:))
        var device: DeviceSpec?
        @Flag(help: "Print JSON instead of text.")
        var json = false
        @OptionGroup var timeout: DeviceTimeoutOption
        @OptionGroup var global: GlobalOptions

        func validate() throws {
            switch (socket, device) {
            case (nil, nil): throw ValidationError("name the device: --socket PATH (a vfio-user server) or --device vfio-pci,host=DDDD:BB:DD.F (see --help)")
            case (_?, _?): throw ValidationError("give --socket or --device, not both")
            case let (s?, nil): try checkSocketPath(s, option: "--socket")
            case let (nil, d?): if let s = d.socket { try checkSocketPath(s, option: "--device socket=") }
            }
        }

        func run() throws {
            global.apply()
            let spec = device ?? DeviceSpec(socket: socket!)
            let dev = try openDevice(spec, timeout: timeout)
            defer { (dev as? VFIOUserClient)?.close() }
            let report: DeviceReport
            do { report = try DeviceReport.collect(dev) } catch {
                throw Failure(spec.socket.map { "the server at \($0): \(error)" } ?? "--device \(spec.text): \(error)")
            }
            print(json ? report.json.description : report.text)
        }
    }
}

/// What `device info` finds out about a device, through the transport-neutral interface; a
/// vfio-user server's negotiation and a kernel device's backend besides.
struct DeviceReport {
    struct VFIOUserHeader {
        var version: (UInt16, UInt16)
        var capabilities: Capabilities
        var capabilitiesJSON: String?
        var twinSocket: Bool
    }
    var transport: String
    var name: String
    var vfioUser: VFIOUserHeader?
    /// A kernel device: how it was opened, and whether its IOMMU tracks dirty pages.
    var kernelBackend: String?
    var iommuDirtyTracking = false
    var info: VFIODeviceInfo
    var regions: [(VFIORegionInfo, Bool)]  // (info, fd offered: vfio-user only)
    var irqs: [VFIOIRQInfo]
    var migration: MigrationCapabilities?
    var dmaLogging: Bool
    var v1Region: UInt32?

    static func collect(_ d: any VFIODevice) throws -> DeviceReport {
        let info = try d.describeDevice()
        let client = d as? VFIOUserClient
        var regions: [(VFIORegionInfo, Bool)] = []
        var v1: UInt32?
        for i in 0..<min(info.regionCount, 64) {
            guard let r = try? d.describeRegion(i) else { continue }
            if r.size == 0 && !r.readable && !r.writable && !r.mappable { continue }
            if let t = r.type, t.type == 3, t.subtype == 1 { v1 = i }
            var fd = false
            if let c = client, let (_, f) = try? c.regionInfo(i) { fd = f != nil; f?.close() }
            regions.append((r, fd))
        }
        var irqs: [VFIOIRQInfo] = []
        for i in 0..<min(info.irqCount, 16) { if let q = try? d.describeIRQ(i), q.count > 0 { irqs.append(q) } }
        let mig = try? d.migrationCapabilities()
        var r = DeviceReport(transport: d.transportName, name: d.deviceName, info: info, regions: regions, irqs: irqs,
                             migration: mig ?? nil, dmaLogging: d.supportsDMALogging, v1Region: v1)
        if let c = client {
            r.vfioUser = VFIOUserHeader(version: c.serverVersion, capabilities: c.serverCapabilities, capabilitiesJSON: c.serverJSON, twinSocket: c.twinSocketActive)
        }
        if let k = d as? AssignedKernelDevice {
            r.kernelBackend = k.openedThrough
            r.iommuDirtyTracking = k.iommuDirtyTracker != nil
        }
        return r
    }

    static func flagNames(_ r: VFIORegionInfo) -> String {
        var n: [String] = []
        if r.readable { n.append("read") }
        if r.writable { n.append("write") }
        if r.mappable { n.append("mmap") }
        if r.sparseAreas != nil || r.type != nil { n.append("caps") }
        return n.joined(separator: ",")
    }
    static func irqFlagNames(_ q: VFIOIRQInfo) -> String {
        var n: [String] = []
        if q.eventfd { n.append("eventfd") }
        if q.maskable { n.append("maskable") }
        if q.automasked { n.append("automasked") }
        if q.noresize { n.append("noresize") }
        return n.joined(separator: ",")
    }
    static let regionNames: [UInt32: String] = [0: "BAR0", 1: "BAR1", 2: "BAR2", 3: "BAR3", 4: "BAR4", 5: "BAR5", 6: "ROM", 7: "CONFIG", 8: "VGA"]
    static let irqNames: [UInt32: String] = [0: "INTx", 1: "MSI", 2: "MSI-X", 3: "ERR", 4: "REQ"]

    var text: String {
        var out = ""
        if let u = vfioUser {
            let caps = u.capabilities
            out += "vfio-user \(u.version.0).\(u.version.1)\n"
            out += "capabilities: max_msg_fds \(caps.maxMessageFDs), max_data_xfer_size \(caps.maxDataXferSize), "
            out += "max_dma_maps \(caps.maxDMAMaps), pgsizes \(hex(caps.pageSizes)), twin_socket \(u.twinSocket ? "on" : "off")"
            if let m = caps.migration { out += ", migration.pgsize \(m.pageSize)" }
            out += "\n"
        } else {
            out += "\(transport): \(name)\(kernelBackend.map { " through \($0)" } ?? "")\n"
        }
        out += "device: flags \(hex(UInt64(info.flags)))\(info.isPCI ? " (PCI" : " (")\(info.canReset ? ", reset)" : ")"), \(info.regionCount) regions, \(info.irqCount) IRQ indexes\n"
        out += "regions:\n"
        for (r, fd) in regions {
            let name = Self.regionNames[r.index] ?? "region \(r.index)"
            out += "  \(r.index) \(name): size \(hex(r.size)) (\(formatBytes(r.size))), \(Self.flagNames(r))"
            if let a = r.sparseAreas { out += ", mmap areas " + a.map { "[\(hex($0.offset)), +\(hex($0.size))]" }.joined(separator: " ") + (fd ? " (fd offered)" : "") }
            if let t = r.type { out += ", type \(t.type)/\(t.subtype)\(t.type == 3 && t.subtype == 1 ? " (migration v1)" : "")" }
            out += "\n"
        }
        out += "irqs:\n"
        for q in irqs { out += "  \(q.index) \(Self.irqNames[q.index] ?? "index \(q.index)"): \(q.count) vector(s), \(Self.irqFlagNames(q))\n" }
        out += "migration: "
        if let m = migration { out += "v2 (\(m))" } else { out += "no v2" }
        out += ", DMA logging \(dmaLogging ? "yes" : "no")"
        if kernelBackend != nil { out += ", IOMMU dirty tracking \(iommuDirtyTracking ? "yes" : "no")" }
        if let v = v1Region { out += ", v1 region at index \(v)" }
        if migration == nil && vfioUser == nil { out += "\n(a VM holding it cannot migrate: QEMU's reason, \"VFIO device doesn't support migration\")" }
        return out
    }

    var json: JSONValue {
        let regionsJSON: [JSONValue] = regions.map { r, fd in
            var o: [(String, JSONValue)] = [("index", .number(Double(r.index))), ("size", .number(Double(r.size))),
                                            ("flags", .string(Self.flagNames(r)))]
            if vfioUser != nil { o.append(("fd", .bool(fd))) }
            if let a = r.sparseAreas { o.append(("mmap_areas", .array(a.map { .object([("offset", .number(Double($0.offset))), ("size", .number(Double($0.size)))]) }))) }
            if let t = r.type { o.append(("type", .number(Double(t.type)))); o.append(("subtype", .number(Double(t.subtype)))) }
            return .object(o)
        }
        let irqsJSON: [JSONValue] = irqs.map { .object([("index", .number(Double($0.index))), ("count", .number(Double($0.count))), ("flags", .string(Self.irqFlagNames($0)))]) }
        var mig: [(String, JSONValue)] = [("v2", migration.map { .string($0.description) } ?? .null), ("dma_logging", .bool(dmaLogging))]
        mig.append(("v1_region", v1Region.map { .number(Double($0)) } ?? .null))
        if kernelBackend != nil { mig.append(("iommu_dirty_tracking", .bool(iommuDirtyTracking))) }
        var top: [(String, JSONValue)] = [("transport", .string(transport))]
        if let u = vfioUser {
            let c = u.capabilities
            var caps: [(String, JSONValue)] = [
                ("max_msg_fds", .number(Double(c.maxMessageFDs))),
                ("max_data_xfer_size", .number(Double(c.maxDataXferSize))),
                ("max_dma_maps", .number(Double(c.maxDMAMaps))),
                ("pgsizes", .number(Double(c.pageSizes))),
                ("twin_socket", .bool(u.twinSocket)),
            ]
            if let m = c.migration { caps.append(("migration", .object([("pgsize", .number(Double(m.pageSize)))]))) }
            top += [("version", .string("\(u.version.0).\(u.version.1)")), ("capabilities", .object(caps))]
        } else {
            top += [("name", .string(name)), ("backend", .string(kernelBackend ?? ""))]
        }
        top += [
            ("device", .object([("flags", .number(Double(info.flags))), ("num_regions", .number(Double(info.regionCount))), ("num_irqs", .number(Double(info.irqCount)))])),
            ("regions", .array(regionsJSON)),
            ("irqs", .array(irqsJSON)),
            ("migration", .object(mig)),
        ]
        return .object(top)
    }
}
