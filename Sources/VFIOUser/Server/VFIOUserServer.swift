import Glibc
import SystemCalls
import VFIO

/// A vfio-user server for one device model. It plays the part the kernel and a vendor driver
/// play for an assigned device: it owns the socket, validates every message, keeps the DMA map
/// table and the dirty log, delivers interrupts, and runs the device's migration state machine.
///
/// One client at a time (the spec: one connection per device). When a client goes away its DMA
/// mappings and IRQ eventfds are dropped but the device state is kept, so a client can reconnect.
public final class VFIOUserServer: @unchecked Sendable {
    public struct Options: Sendable {
        public var maxMessageFDs: UInt64 = 8
        public var maxDataXferSize: UInt64 = Capabilities.defaultMaxDataXferSize
        public var maxDMAMaps: UInt64 = 65535
        public var offerTwinSocket = true
        public var supportWriteMultiple = true
        public var dirtyTracking: DMAMapTable.DirtyTrackingMode = .precise
        /// Also expose the migration v1 region (type 3/1) for a migratable device.
        public var exposeV1MigrationRegion = true
        /// The longest the server waits on a client: a DMA_READ/WRITE reply, a message it
        /// started sending, a reply it should read. Past it the DMA fails (ETIMEDOUT) or the
        /// connection is dropped.
        public var peerTimeoutSeconds: Double = 10
        public init() {}
    }

    public let device: VFIOUserDeviceModel
    public let options: Options
    public let dma: DMAMapTable
    public let irqs = IRQTable()
    public let migration: MigrationEndpoint?
    public let migrationV1: MigrationRegionV1?
    private let cancel: EventFD
    private let description: DeviceDescription
    /// num_regions as reported (a PCI device: at least the nine fixed vfio-pci indexes).
    private let regionCount: UInt32
    /// vfio-pci's IRQ indexes: INTx 0, MSI 1, MSI-X 2, ERR 3, REQ 4.
    public static let pciIRQIndexCount: UInt32 = 5
    /// vfio-pci's fixed regions: BAR0-5 (0-5), ROM 6, config 7, VGA 8.
    public static let pciRegionIndexCount: UInt32 = 9
    private let name: String

    /// Counters, for `device serve` status lines and tests.
    public private(set) var messagesHandled: UInt64 = 0
    public private(set) var errorsReplied: UInt64 = 0
    public private(set) var connectionsServed: UInt64 = 0
    /// Configuring commands received (a live update must send none of these).
    public private(set) var versionsNegotiated: UInt64 = 0
    public private(set) var dmaMapsReceived: UInt64 = 0
    public private(set) var resetsReceived: UInt64 = 0
    public private(set) var setIRQsReceived: UInt64 = 0

    public init(device: VFIOUserDeviceModel, name: String = "device", options: Options = Options()) throws {
        self.device = device
        self.options = options
        self.name = name
        dma = DMAMapTable(maxMappings: Int(options.maxDMAMaps))
        dma.trackingMode = options.dirtyTracking
        migration = device.migration.map { MigrationEndpoint(device: $0) }
        var d = device.deviceDescription
        if let m = migration, options.exposeV1MigrationRegion, d.region(MigrationRegionV1.regionIndex) == nil {
            let v1 = try MigrationRegionV1(endpoint: m)
            migrationV1 = v1
            d.regions.append(v1.description)
        } else {
            migrationV1 = nil
        }
        // A PCI device is laid out as the kernel's vfio-pci lays it out, because QEMU's vfio-pci
        // (and so its vfio-user-pci) expects that: five IRQ indexes (INTx, MSI, MSI-X, ERR, REQ)
        // with count 0 where the device has none (QEMU refuses fewer than three: "unexpected
        // number of irqs"), and at least the nine fixed regions (BAR0-5, ROM, config, VGA), the
        // ones the device lacks answered with size 0.
        if d.flags & DeviceInfo.flagPCI != 0 {
            for i in 0..<Self.pciIRQIndexCount where d.irq(i) == nil {
                d.irqs.append(IRQDescription(index: i, count: 0, flags: [.eventfd, .noresize]))
            }
            d.irqs.sort { $0.index < $1.index }
            regionCount = max(d.regionCount, Self.pciRegionIndexCount)
        } else {
            regionCount = d.regionCount
        }
        description = d
        cancel = try EventFD()
        device.attach(host: Host(dma: dma, irqs: irqs))
    }

    private final class Host: DeviceHost {
        let dmaTable: DMAMapTable
        let irqs: IRQTable
        init(dma: DMAMapTable, irqs: IRQTable) { dmaTable = dma; self.irqs = irqs }
        var dma: DMAAccessor { dmaTable }
        func raiseIRQ(index: UInt32, vector: UInt32) { irqs.raise(index: index, vector: vector) }
    }

    /// Ask `serve` to return (async-signal-safe through the eventfd: see `cancelFD`).
    public func stop() { try? cancel.signal() }
    /// The raw eventfd a signal handler may write to.
    public var cancelFD: Int32 { cancel.fd.rawValue }

    /// Accept and serve clients one after another until `stop()`.
    public func serve(listener: UnixListener) {
        while true {
            let sock: UnixSocket?
            do { sock = try listener.accept(cancel: cancel.fd) } catch {
                Log.error(name, "accept failed: \(error)")
                return
            }
            guard let s = sock else { return }  // cancelled
            serve(connection: s)
            if (try? Poll.waitReadable(cancel.fd, timeoutMilliseconds: 0)) == true { return }
        }
    }

    // MARK: one connection

    private final class Session {
        let conn: VFIOUserConnection
        var client = Capabilities()
        var negotiated = false
        var twin: VFIOUserConnection?
        /// Read by the stop watcher too, hence the lock.
        var outbound: OutboundDMA? {
            get { lock.withLock { _outbound } }
            set { lock.withLock { _outbound = newValue } }
        }
        private var _outbound: OutboundDMA?
        private let lock = Mutex()
        /// Set by a handler whose error ends the connection (an unsupported major version:
        /// the spec says the connection is then closed).
        var closeAfterReply = false
        /// MIG_DATA_READ replies are filled by the device and sent from here (kept for the
        /// session: a fresh 1 MiB buffer per reply would cost a page-fault pass each time).
        private var migrationBuffer: UnsafeMutableRawBufferPointer?
        func migrationBuffer(_ n: Int) -> UnsafeMutableRawBufferPointer {
            if let b = migrationBuffer, b.count >= n { return UnsafeMutableRawBufferPointer(rebasing: b[0..<n]) }
            migrationBuffer?.deallocate()
            let b = UnsafeMutableRawBufferPointer.allocate(byteCount: max(n, 1), alignment: 64)
            migrationBuffer = b
            return UnsafeMutableRawBufferPointer(rebasing: b[0..<n])
        }
        init(conn: VFIOUserConnection) { self.conn = conn }
        deinit { migrationBuffer?.deallocate() }
    }

    /// Commands whose handler can wait on the device's DMA worker (a STOP arc, a reset) or on
    /// the DMA table's write lock, which a worker holds while its DMA_READ/WRITE message is
    /// out. They run on a helper thread so that the connection thread goes on reading: it hands
    /// the client's DMA replies over (without a twin socket, nobody else can) and watches
    /// `stop()`. The spec forbids stalling command processing on the other channel.
    static func mayWaitOnDevice(_ h: MessageHeader) -> Bool {
        switch h.knownCommand {
        case .dmaMap?, .dmaUnmap?, .deviceReset?, .deviceFeature?, .dirtyPages?: return true
        default: return false
        }
    }
    /// Commands read ahead while one runs on the helper thread (a client waits for its replies;
    /// beyond this the socket is not read until the helper is done).
    static let maxQueuedCommands = 64

    /// Serve one client until it disconnects (or `stop()`), then apply the reconnect rule.
    public func serve(connection socket: UnixSocket) {
        connectionsServed += 1
        Self.setTimeouts(socket, seconds: options.peerTimeoutSeconds)
        socket.setSendBuffer()  // MIG_DATA_READ replies of 1 MiB flow without waiting on each one
        let conn = VFIOUserConnection(socket: socket, maxReceiveFDs: Int(options.maxMessageFDs),
                                      maxMessageSize: Int(options.maxDataXferSize) + 64 * 1024)
        let session = Session(conn: conn)
        let done: EventFD
        do { done = try EventFD() } catch {
            Log.error(name, "cannot serve a client: eventfd: \(error)")
            conn.close()
            return
        }
        var helper: OSThread? = nil
        var queue: [Message] = []
        // stop() (a signal handler writing the eventfd) must also end a read or write blocked
        // mid-message on the client: this watcher shuts the socket down and fails in-flight DMA.
        let watcherDone = try? EventFD()
        let watcher: OSThread?
        do {
            watcher = try watcherDone.map { wd in
                try OSThread(name: "vfu-stop-watch") { [cancel] in
                    if let w = try? Poll.waitAnyReadable([cancel.fd.rawValue, wd.fd.rawValue], timeoutMilliseconds: -1), w == 0 {
                        session.outbound?.abort()
                        socket.shutdown()
                    }
                }
            }
        } catch {
            // Without the watcher a stop could not end a blocked read: refuse the client.
            Log.error(name, "cannot serve a client: \(error)")
            conn.close()
            return
        }
        Log.info(name, "client connected")
        defer {
            try? watcherDone?.signal()
            watcher?.join()
            // Fail in-flight DMA first: then a helper waiting on the device returns promptly.
            session.outbound?.abort()
            helper?.join()
            for m in queue { m.closeFDs() }
            session.outbound?.close()
            session.twin?.close()
            conn.close()
            dma.messageChannel = nil
            dma.unmapAll()
            dma.stopLogging()
            irqs.clear()
            device.connectionLost()
            Log.info(name, "client disconnected: DMA mappings and IRQ eventfds dropped, device state kept")
        }
        while true {
            while helper == nil, !queue.isEmpty, !session.closeAfterReply {
                let m = queue.removeFirst()
                if Self.mayWaitOnDevice(m.header) {
                    do {
                        helper = try OSThread(name: "vfu-command") { [self] in
                            handle(m, session)
                            try? done.signal()
                        }
                    } catch {
                        // Not run here instead: it could wait on a DMA reply that only this
                        // thread can hand over (10 s, then the device job fails). Refused with
                        // the cause; the client may retry.
                        refuse(session, m.header, .EAGAIN, "\(error); nothing runs it beside the socket reader")
                        m.closeFDs()
                    }
                } else {
                    handle(m, session)
                }
            }
            if session.closeAfterReply && helper == nil { return }
            var watch = [cancel.fd.rawValue, done.fd.rawValue]
            if queue.count < Self.maxQueuedCommands && !session.closeAfterReply { watch.append(socket.fd.rawValue) }
            let which: Int?
            do { which = try Poll.waitAnyReadable(watch, timeoutMilliseconds: -1) } catch { return }
            switch which {
            case 1?:
                _ = try? done.consume()
                helper?.join()
                helper = nil
                continue
            case 2?:
                break
            default:
                return  // stop()
            }
            let msg: Message
            do {
                let (h, got) = try conn.receiveHeader()
                if queue.isEmpty, helper == nil, session.negotiated, h.isCommand,
                   h.knownCommand == .migDataWrite, got.fds.isEmpty, !got.truncated {
                    guard let m = try receiveMigDataWrite(h, got, session) else { messagesHandled &+= 1; continue }
                    msg = m
                } else {
                    msg = try conn.receiveBody(h, got)
                }
            } catch let f as FramingError {
                refuse(session, f.header, f.errno, f.reason)
                continue
            } catch {
                if let e = error as? Errno, e != .ECONNRESET { Log.warning(name, "connection lost: \(e)") }
                return
            }
            if msg.header.isReply {
                // A reply to one of our DMA_READ/WRITE commands on the main socket; one that
                // matches no awaited request is dropped with its fds.
                if let out = session.outbound, !out.isTwin { out.deliver(msg) } else {
                    msg.closeFDs()
                    Log.warning(name, "unexpected reply (id \(msg.header.messageID)) dropped")
                }
                continue
            }
            messagesHandled &+= 1
            queue.append(msg)
        }
    }

    /// Bound every blocking read and write on a client's socket: a client stalled mid-message
    /// or not reading its replies loses its connection instead of holding the server.
    static func setTimeouts(_ socket: UnixSocket, seconds: Double) {
        var tv = timeval(tv_sec: Int(seconds), tv_usec: Int((seconds - Double(Int(seconds))) * 1e6))
        let n = socket.fd.rawValue
        _ = setsockopt(n, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        _ = setsockopt(n, SOL_SOCKET, SO_SNDTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
    }

    private func refuse(_ s: Session, _ h: MessageHeader, _ errno: Errno, _ reason: String) {
        errorsReplied &+= 1
        let cmd = h.knownCommand?.description ?? "command \(h.command)"
        Log.warning(name, "\(cmd) (id \(h.messageID)) refused: \(reason) [\(errno.name)]")
        guard h.wantsReply else { return }
        try? s.conn.sendError(to: h, errno: errno)
    }

    private func handle(_ msg: Message, _ s: Session) {
        let h = msg.header
        var fds = msg.fds
        defer { for f in fds { f.close() } }  // whatever a handler did not take is closed
        do {
            let limits = VFIOUserRequest.Limits(maxDataXferSize: options.maxDataXferSize, maxFDs: Int(options.maxMessageFDs))
            let req = try VFIOUserRequest.decode(header: h, payload: msg.payload[...], fdCount: fds.count, limits: limits)
            if case .version = req {} else if !s.negotiated {
                throw DeviceError(.EINVAL, "VERSION must be the first message")
            }
            if case let .migDataRead(_, size) = req {
                try replyMigrationData(h, size: size, s)
                return
            }
            let (payload, replyFDs): ([UInt8], [Int32]) = try dispatch(req, s, &fds)
            // A reply is never longer than the buffer the request's argsz describes (handlers
            // check before acting; this is the net under them).
            if let argsz = req.replyBufferSize, payload.count > Int(argsz) {
                throw DeviceError(.EINVAL, "reply of \(payload.count) bytes exceeds the request's argsz \(argsz)")
            }
            if h.wantsReply { try s.conn.sendReply(to: h, payload: payload, fds: replyFDs) }
        } catch let e as DeviceError {
            refuse(s, h, e.errno, e.reason)
        } catch let e as VFIOUserRequest.DecodeError {
            refuse(s, h, e.errno, e.reason)
        } catch let e as Errno {
            refuse(s, h, e, "\(e)")
        } catch let e as WireError {
            refuse(s, h, e.errno, e.description)  // truncated handler data: EINVAL, not EIO
        } catch {
            refuse(s, h, .EIO, "\(error)")
        }
    }

    private func regionDescription(_ index: UInt32) throws -> RegionDescription {
        guard let r = description.region(index) else {
            throw DeviceError(.EINVAL, "region index \(index) does not exist (device has \(regionCount))")
        }
        return r
    }

    private func checkAccess(_ r: RegionDescription, offset: UInt64, count: UInt32, write: Bool) throws {
        guard r.flags.contains(write ? .write : .read) else {
            throw DeviceError(.EINVAL, "region \(r.index) is not \(write ? "writable" : "readable")")
        }
        guard offset <= r.size, UInt64(count) <= r.size - offset else {
            throw DeviceError(.EINVAL, "access [0x\(String(offset, radix: 16)), +\(count)) lies outside region \(r.index) of size 0x\(String(r.size, radix: 16))")
        }
    }

    /// Returns the reply payload and the fds to send with it.
    private func dispatch(_ req: VFIOUserRequest, _ s: Session, _ fds: inout [FileDescriptor]) throws -> ([UInt8], [Int32]) {
        switch req {
        case let .version(v):
            guard !s.negotiated else { throw DeviceError(.EINVAL, "VERSION sent twice") }
            guard v.major == 0 else {
                s.closeAfterReply = true  // the spec: a major mismatch closes the connection
                throw DeviceError(.ENOTSUP, "unsupported major version \(v.major) (this server speaks 0); closing the connection")
            }
            if let m = v.capabilities.migration, m.pageSize != 4096 {
                throw DeviceError(.EINVAL, "migration.pgsize \(m.pageSize) unsupported (only 4096)")
            }
            s.client = v.capabilities
            var mine = Capabilities()
            mine.maxMessageFDs = options.maxMessageFDs
            mine.maxDataXferSize = options.maxDataXferSize
            mine.maxDMAMaps = options.maxDMAMaps
            mine.pageSizes = 4096
            // Only the numeric capabilities the client proposed are answered (a subset of its).
            mine.emitOnly = v.capabilities.present.intersection(["max_msg_fds", "max_data_xfer_size", "max_dma_maps", "pgsizes"])
            var replyFDs: [Int32] = []
            // Reply capabilities are a subset of what the client offered.
            if v.capabilities.twinSocket?.supported == true, options.offerTwinSocket, v.capabilities.maxMessageFDs > 0 {
                let (ours, theirs) = try UnixSocket.pair()
                Self.setTimeouts(ours, seconds: options.peerTimeoutSeconds)
                let twin = VFIOUserConnection(socket: ours, maxReceiveFDs: 0,
                                              maxMessageSize: Int(min(s.client.maxDataXferSize, 64 << 20)) + 4096)
                s.twin = twin
                s.outbound = OutboundDMA(conn: twin, isTwin: true, maxChunk: Int(min(s.client.maxDataXferSize, options.maxDataXferSize)),
                                         timeoutSeconds: options.peerTimeoutSeconds)
                fds.append(theirs.fd)  // closed after the reply is sent (the kernel holds its copy)
                replyFDs.append(theirs.fd.rawValue)
                mine.twinSocket = .init(supported: true, fdIndex: 0)
            } else {
                if v.capabilities.twinSocket != nil { mine.twinSocket = .init(supported: false) }
                s.outbound = OutboundDMA(conn: s.conn, isTwin: false, maxChunk: Int(min(s.client.maxDataXferSize, options.maxDataXferSize)),
                                         timeoutSeconds: options.peerTimeoutSeconds)
            }
            if v.capabilities.writeMultiple != nil { mine.writeMultiple = options.supportWriteMultiple }
            if v.capabilities.migration != nil { mine.migration = .init(pageSize: 4096) }
            dma.messageChannel = s.outbound
            s.negotiated = true
            let reply = VersionPayload(major: 0, minor: min(v.minor, 2), capabilities: mine)
            versionsNegotiated &+= 1
            Log.debug(name, "negotiated: client \(v.rawJSON ?? "{}")")
            return (reply.encode(), replyFDs)

        case let .dmaMap(m):
            dmaMapsReceived &+= 1
            let fd = fds.isEmpty ? nil : fds.removeFirst()
            try dma.map(m, fd: fd)
            return ([], [])

        case let .dmaUnmap(u):
            if u.flags.contains(.unmapAll) {
                dma.unmapAll()
                return (u.encode(), [])
            }
            guard let b = u.bitmap else {
                try dma.unmapRange(address: u.address, size: u.size)
                return (u.encode(), [])
            }
            guard b.pageSize >= 4096, b.pageSize & (b.pageSize - 1) == 0 else {
                throw DeviceError(.EINVAL, "DMA_UNMAP bitmap page size \(b.pageSize) is not a power of two ≥ 4096")
            }
            let need = Self.bitmapBytes(length: u.size, pageSize: b.pageSize)
            guard b.size >= need else { throw DeviceError(.EINVAL, "DMA_UNMAP bitmap size \(b.size) < \(need) bytes needed") }
            guard UInt64(u.argsz) >= 40 + need else {
                throw DeviceError(.EINVAL, "DMA_UNMAP argsz \(u.argsz) too small for a \(need)-byte bitmap (need \(40 + need))")
            }
            guard dma.isLogging || dma.trackingMode == .pinnedPages else {
                throw DeviceError(.EINVAL, "DMA_UNMAP with GET_DIRTY_BITMAP while dirty logging is off")
            }
            let words = try dma.unmap(address: u.address, size: u.size, dirtyPageSize: b.pageSize) ?? []
            var echo = u
            echo.argsz = UInt32(40 + need)  // ≤ u.argsz, checked above
            echo.bitmap = .init(pageSize: b.pageSize, size: need)
            return (echo.encode() + words.littleEndianBytes, [])

        case .deviceGetInfo:
            var info = DeviceInfo(flags: description.flags, regionCount: regionCount, irqCount: description.irqCount)
            info.argsz = 16
            return (info.encode(), [])

        case let .deviceGetRegionInfo(argsz, index):
            // An index below the count that the device does not implement (an unused BAR) is
            // reported as the kernel does: size 0, no flags.
            guard index >= regionCount || description.region(index) != nil else {
                return (RegionInfo(flags: [], index: index, size: 0).encodeReply(requestArgsz: argsz).bytes, [])
            }
            let r = try regionDescription(index)
            var flags = r.flags
            if r.mmapFD == nil { flags.remove(.mmap) }
            let areas = r.mmapFD != nil ? (r.sparseAreas ?? [SparseMMapArea(offset: 0, size: r.size)]) : nil
            let info = RegionInfo(flags: flags, index: index, size: r.size, offset: 0, sparseAreas: areas, type: r.type)
            let (bytes, withCaps) = info.encodeReply(requestArgsz: argsz)
            if withCaps, let fd = r.mmapFD, s.client.maxMessageFDs > 0 { return (bytes, [fd.rawValue]) }
            return (bytes, [])

        case let .deviceGetRegionIOFDs(q):
            _ = try regionDescription(q.index)
            // No ioeventfds are registered by our devices: an empty list.
            var w = WireWriter(); w.u32(16); w.u32(0); w.u32(q.index); w.u32(0)
            return (w.bytes, [])

        case let .deviceGetIRQInfo(q):
            guard let d = description.irq(q.index) else {
                throw DeviceError(.EINVAL, "IRQ index \(q.index) does not exist (device has \(description.irqCount))")
            }
            return (IRQInfo(flags: d.flags, index: d.index, count: d.count).encode(), [])

        case let .deviceSetIRQs(q):
            setIRQsReceived &+= 1
            guard let d = description.irq(q.index) else {
                throw DeviceError(.EINVAL, "IRQ index \(q.index) does not exist (device has \(description.irqCount))")
            }
            let taken = fds; fds = []
            try irqs.apply(q, description: d, fds: taken)
            return ([], [])

        case let .regionRead(a):
            let r = try regionDescription(a.region)
            try checkAccess(r, offset: a.offset, count: a.count, write: false)
            var out = WireWriter(capacity: 16 + Int(a.count))
            out.u64(a.offset); out.u32(a.region); out.u32(a.count)
            var data = [UInt8](repeating: 0, count: Int(a.count))
            if a.count > 0 {
                try data.withUnsafeMutableBytes { buf in
                    if a.region == MigrationRegionV1.regionIndex, let v1 = migrationV1 { try v1.read(offset: a.offset, into: buf) }
                    else { try device.regionRead(index: a.region, offset: a.offset, into: buf) }
                }
            }
            out.append(data)
            return (out.bytes, [])

        case let .regionWrite(a):
            let r = try regionDescription(a.region)
            try checkAccess(r, offset: a.offset, count: a.count, write: true)
            try gateBARWrite(region: a.region)
            if a.count > 0 {
                try a.data.withUnsafeBytes { buf in
                    if a.region == MigrationRegionV1.regionIndex, let v1 = migrationV1 { try v1.write(offset: a.offset, from: buf) }
                    else { try device.regionWrite(index: a.region, offset: a.offset, from: buf) }
                }
            }
            return (RegionAccess(offset: a.offset, region: a.region, count: a.count).encode(), [])

        case let .regionWriteMulti(m):
            guard options.supportWriteMultiple else { throw DeviceError(.ENOSYS, "REGION_WRITE_MULTI not negotiated") }
            for e in m.entries {
                let r = try regionDescription(e.region)
                try checkAccess(r, offset: e.offset, count: e.count, write: true)
                try gateBARWrite(region: e.region)
            }
            for e in m.entries where e.count > 0 {
                try e.data.withUnsafeBytes { try device.regionWrite(index: e.region, offset: e.offset, from: $0) }
            }
            var w = WireWriter(); w.u64(UInt64(m.entries.count))
            return (w.bytes, [])

        case .deviceReset:
            resetsReceived &+= 1
            try device.reset()
            migration?.reset()
            return ([], [])

        case let .dirtyPages(d):
            // The migration-v1-era command, kept for seed-series clients: it drives the same
            // log as DMA_LOGGING.
            switch d.flags {
            case DirtyPagesRequest.start: try dma.startLogging(pageSize: 4096); return (d.encode(), [])
            case DirtyPagesRequest.stop: dma.stopLogging(); return (d.encode(), [])
            case DirtyPagesRequest.getBitmap:
                guard let r = d.range else { throw DeviceError(.EINVAL, "DIRTY_PAGES GET_BITMAP without a range") }
                guard r.pageSize >= 4096, r.pageSize & (r.pageSize - 1) == 0, r.size > 0 else {
                    throw DeviceError(.EINVAL, "DIRTY_PAGES GET_BITMAP page size \(r.pageSize) / size \(r.size) invalid")
                }
                let need = Self.bitmapBytes(length: r.size, pageSize: r.pageSize)
                guard need <= options.maxDataXferSize else {
                    throw DeviceError(.E2BIG, "DIRTY_PAGES bitmap of \(need) bytes exceeds max_data_xfer_size \(options.maxDataXferSize): ask for a smaller range")
                }
                guard r.bitmapSize >= need, UInt64(d.argsz) >= 48 + need else {
                    throw DeviceError(.EINVAL, "DIRTY_PAGES bitmap of \(r.bitmapSize) bytes (argsz \(d.argsz)) too small: \(need) needed")
                }
                let words = try dma.report(iova: r.iova, length: r.size, pageSize: r.pageSize)
                var echo = d; echo.argsz = UInt32(48 + need)
                echo.range = (r.iova, r.size, r.pageSize, need)
                return (echo.encode() + words.littleEndianBytes, [])
            default:
                throw DeviceError(.EINVAL, "DIRTY_PAGES needs exactly one of START, STOP, GET_BITMAP (flags 0x\(String(d.flags, radix: 16)))")
            }

        case let .deviceFeature(f):
            return (try feature(f), [])

        case .migDataRead:
            preconditionFailure("MIG_DATA_READ is answered by replyMigrationData")

        case let .migDataWrite(m):
            guard let mig = migration else { throw DeviceError(.EINVAL, "device does not support migration") }
            try m.data.withUnsafeBytes { try mig.write($0) }
            return ([], [])
        }
    }

    /// MIG_DATA_READ: the device fills the session's buffer in place and the reply's 8-byte
    /// header and that buffer go out in one sendmsg (this is the device-state hot path: one copy
    /// of the data in user space, the device's own). Capped at the client's max_data_xfer_size.
    private func replyMigrationData(_ h: MessageHeader, size: UInt32, _ s: Session) throws {
        guard let mig = migration else { throw DeviceError(.EINVAL, "device does not support migration") }
        let buffer = s.migrationBuffer(Int(min(UInt64(size), s.client.maxDataXferSize)))
        // A stopped device's memory goes to the socket as it is (gathered); otherwise the device
        // builds the data in the buffer.
        let pieces: [UnsafeRawBufferPointer]
        var gathered = false
        if let p = try mig.readPieces(scratch: buffer) { pieces = p; gathered = true } else {
            pieces = [UnsafeRawBufferPointer(rebasing: buffer[0..<(try mig.read(into: buffer))])]
        }
        guard h.wantsReply else { return }
        let n = pieces.reduce(0) { $0 + $1.count }
        var w = WireWriter(capacity: 8)
        w.u32(UInt32(8 + n)); w.u32(UInt32(n))
        let head = w.bytes
        try head.withUnsafeBytes { hp in
            guard gathered else {
                return try s.conn.send(id: h.messageID, command: h.command, flags: MessageHeader.typeReply, payload: [hp] + pieces)
            }
            // Gathered: the device memory in it goes to the socket by reference.
            try s.conn.send(id: h.messageID, command: h.command, flags: MessageHeader.typeReply, payload: [hp] + pieces) {
                try mig.sendByReference($0, scratch: UnsafeRawBufferPointer(buffer), to: s.conn.socket)
            }
        }
    }

    /// MIG_DATA_WRITE, the device-state hot path on a destination: the 8-byte head is read and
    /// checked, then the device receives the data from the socket into its own buffers (for
    /// dma-engine, device memory): no message buffer, no copy out of it. Returns nil when the
    /// message was handled (and answered), or the whole message for the general path when it is
    /// not a well-formed MIG_DATA_WRITE (that path refuses it with the precise reason).
    private func receiveMigDataWrite(_ h: MessageHeader, _ got: ReceivedFDs, _ s: Session) throws -> Message? {
        let conn = s.conn
        guard h.messageSize >= UInt32(MessageHeader.size) else { return try conn.receiveBody(h, got) }
        let payload = Int(h.messageSize) - MessageHeader.size
        guard payload >= 8, payload <= conn.maxMessageSize - MessageHeader.size else {
            return try conn.receiveBody(h, got)
        }
        var head = [UInt8](repeating: 0, count: 8)
        _ = try head.withUnsafeMutableBytes { try conn.socket.receiveExactly(into: $0, maxFDs: 0) }
        let argsz = UInt32(head[0]) | UInt32(head[1]) << 8 | UInt32(head[2]) << 16 | UInt32(head[3]) << 24
        let size = Int(UInt32(head[4]) | UInt32(head[5]) << 8 | UInt32(head[6]) << 16 | UInt32(head[7]) << 24)
        guard let mig = migration, payload - 8 == size, UInt64(size) <= options.maxDataXferSize, UInt64(argsz) >= 8 + UInt64(size) else {
            // Not the hot path's shape: the general decoder says what is wrong with it.
            var rest = [UInt8](repeating: 0, count: payload - 8)
            if !rest.isEmpty { _ = try rest.withUnsafeMutableBytes { try conn.socket.receiveExactly(into: $0, maxFDs: 0) } }
            return Message(header: h, payload: head + rest, fds: [])
        }
        var consumed = 0
        do {
            try mig.write(count: size) { b in
                let got = try conn.socket.receiveExactly(into: b, maxFDs: 0)
                for f in got.fds { f.close() }
                consumed += b.count
            }
        } catch let e as DeviceError {
            // Refused (wrong state, corrupt data): the rest of the message is read and dropped,
            // so the stream stays in step.
            if size > consumed { try conn.drain(size - consumed) }
            refuse(s, h, e.errno, e.reason)
            return nil
        }
        if h.wantsReply { try conn.sendReply(to: h) }
        return nil
    }

    /// A device in STOP_COPY or RESUMING must not be touched through its BARs (the kernel's rule:
    /// it would corrupt the stream); config space stays accessible.
    private func gateBARWrite(region: UInt32) throws {
        guard let st = migration?.state, st == .stopCopy || st == .resuming else { return }
        guard region != 7, region != MigrationRegionV1.regionIndex else { return }
        throw DeviceError(.EINVAL, "REGION_WRITE to region \(region) refused in migration state \(st)")
    }

    /// Bytes of a bitmap with one bit per `pageSize` page of `length` bytes, rounded up to u64
    /// words; never overflows (pageSize ≥ 1).
    static func bitmapBytes(length: UInt64, pageSize: UInt64) -> UInt64 {
        let pages = length / pageSize + (length % pageSize == 0 ? 0 : 1)
        return (pages / 64 + (pages % 64 == 0 ? 0 : 1)) * 8
    }

    private func feature(_ f: DeviceFeature) throws -> [UInt8] {
        func probeOrCheck(get: Bool, set: Bool) throws -> Bool {
            if f.isGet && !get { throw DeviceError(.EINVAL, "feature \(f.feature) does not support GET") }
            if f.isSet && !set { throw DeviceError(.EINVAL, "feature \(f.feature) does not support SET") }
            if f.isProbe { return true }
            guard f.isGet || f.isSet else { throw DeviceError(.EINVAL, "DEVICE_FEATURE needs GET, SET or PROBE") }
            return false
        }
        var data = WireReader(f.data, context: "DEVICE_FEATURE data")
        func reply(_ payload: [UInt8]) -> [UInt8] {
            var w = WireWriter(); w.u32(UInt32(8 + payload.count)); w.u32(f.flags); w.append(payload); return w.bytes
        }
        switch f.feature {
        case DeviceFeature.migration:
            guard let mig = migration else { throw DeviceError(.ENOTTY, "device does not support migration") }
            if try probeOrCheck(get: true, set: false) { return f.encode() }
            var w = WireWriter(); w.u64(mig.capabilities.rawValue)
            return reply(w.bytes)
        case DeviceFeature.migDeviceState:
            guard let mig = migration else { throw DeviceError(.ENOTTY, "device does not support migration") }
            if try probeOrCheck(get: true, set: true) { return f.encode() }
            if f.isSet {
                // struct vfio_device_feature_mig_state is 8 bytes: a shorter one is refused
                // before the state moves.
                guard f.data.count >= 8 else { throw DeviceError(.EINVAL, "DEVICE_FEATURE MIG_DEVICE_STATE SET data of \(f.data.count) bytes < 8") }
                let raw = try data.u32()
                guard let target = MigrationState(rawValue: raw) else { throw DeviceError(.EINVAL, "unknown migration state \(raw)") }
                try mig.set(target)
            }
            var w = WireWriter(); w.u32(mig.state.rawValue); w.i32(-1)
            return reply(w.bytes)
        case DeviceFeature.migDataSize:
            guard let mig = migration else { throw DeviceError(.ENOTTY, "device does not support migration") }
            if try probeOrCheck(get: true, set: false) { return f.encode() }
            var w = WireWriter(); w.u64(mig.device.stopCopySize())
            return reply(w.bytes)
        case DeviceFeature.dmaLoggingStart:
            if try probeOrCheck(get: false, set: true) { return f.encode() }
            let hint = try data.u64(), n = try data.u32(); _ = try data.u32()
            guard n <= 1024 else { throw DeviceError(.E2BIG, "DMA_LOGGING_START with \(n) ranges (at most 1024)") }
            // page_size is a hint: the device chooses and returns it (the kernel uAPI). We take a
            // power of two from 4 KiB to 1 GiB as given, anything else becomes 4 KiB; a log
            // already running keeps its size.
            let chosen = dma.loggingPageSize
                ?? ((hint >= 4096 && hint <= 1 << 30 && hint & (hint - 1) == 0) ? hint : 4096)
            // num_ranges 0 means "log everything" (the uAPI); with ranges we validate them, and
            // log everything anyway (a superset is allowed).
            var ranges: [(UInt64, UInt64)] = []
            for _ in 0..<n {
                let iova = try data.u64(), len = try data.u64()
                guard iova % chosen == 0, len % chosen == 0, len > 0 else {
                    throw DeviceError(.EINVAL, "DMA_LOGGING_START range [0x\(String(iova, radix: 16)), +0x\(String(len, radix: 16))) not aligned to page size \(chosen)")
                }
                guard len - 1 <= UInt64.max - iova else { throw DeviceError(.EOVERFLOW, "DMA_LOGGING_START range wraps") }
                ranges.append((iova, len))
            }
            ranges.sort { $0.0 < $1.0 }
            for i in ranges.indices.dropFirst() where ranges[i - 1].1 - 1 >= ranges[i].0 - ranges[i - 1].0 {
                throw DeviceError(.EINVAL, "DMA_LOGGING_START ranges overlap")
            }
            try dma.startLogging(pageSize: chosen)
            var w = WireWriter(capacity: f.data.count + 8)
            w.u32(f.argsz); w.u32(f.flags); w.u64(chosen); w.append(f.data.dropFirst(8))
            return w.bytes
        case DeviceFeature.dmaLoggingStop:
            if try probeOrCheck(get: false, set: true) { return f.encode() }
            dma.stopLogging()
            return f.encode()
        case DeviceFeature.dmaLoggingReport:
            if try probeOrCheck(get: true, set: false) { return f.encode() }
            let iova = try data.u64(), length = try data.u64(), pageSize = try data.u64()
            guard pageSize >= 4096, pageSize & (pageSize - 1) == 0, length > 0 else {
                throw DeviceError(.EINVAL, "DMA_LOGGING_REPORT page size \(pageSize) / length \(length) invalid")
            }
            guard length - 1 <= UInt64.max - iova else { throw DeviceError(.EINVAL, "DMA_LOGGING_REPORT range wraps around") }
            guard dma.isLogging else { throw DeviceError(.EINVAL, "DMA_LOGGING_REPORT before DMA_LOGGING_START") }
            // Sized only after validation, and bounded: a bitmap larger than a message may carry
            // is refused (the client asks per smaller range).
            let need = Self.bitmapBytes(length: length, pageSize: pageSize)
            guard need <= options.maxDataXferSize else {
                throw DeviceError(.E2BIG, "DMA_LOGGING_REPORT bitmap of \(need) bytes exceeds max_data_xfer_size \(options.maxDataXferSize): ask for a smaller range")
            }
            let full = 8 + 24 + Int(need)
            var w = WireWriter(capacity: 32)
            w.u32(UInt32(full)); w.u32(f.flags); w.u64(iova); w.u64(length); w.u64(pageSize)
            // Too small a buffer: say how much is needed and clear nothing (the spec's argsz rule).
            guard Int(f.argsz) >= full else { return w.bytes }
            w.append(try dma.report(iova: iova, length: length, pageSize: pageSize).littleEndianBytes)
            return w.bytes
        default:
            throw DeviceError(.ENOTTY, "feature \(f.feature) is not supported")
        }
    }
}

/// Server→client DMA_READ / DMA_WRITE for mappings without an fd. On the twin socket the caller
/// reads its own reply; on the main socket the connection thread hands replies over, and only
/// replies to a request still awaited are kept (others are dropped with their fds).
///
/// Every wait on the client is bounded by `timeout`: a DMA the client does not answer fails
/// with ETIMEDOUT, and `abort()` (disconnect, SIGTERM) fails the in-flight ones at once. The
/// device then finishes its job with that errno, so nothing that waits on the device (a STOP
/// arc, a reset, an unmap) waits on the client for longer than that.
final class OutboundDMA: DMAMessageChannel, @unchecked Sendable {
    let conn: VFIOUserConnection
    let isTwin: Bool
    let maxChunk: Int
    let timeoutSeconds: Double
    private let callLock = Mutex()
    private let replies = Condition()
    private var awaiting: Set<UInt16> = []
    private var pending: [UInt16: Message] = [:]
    private var closed = false
    /// The twin stream may be out of step after a timeout or abort: no further use.
    private var broken = false
    private let abortFD: EventFD?
    /// Replies dropped because no request awaited them (issue 13 item 12).
    private(set) var unmatchedReplies: UInt64 = 0

    init(conn: VFIOUserConnection, isTwin: Bool, maxChunk: Int, timeoutSeconds: Double) {
        self.conn = conn; self.isTwin = isTwin; self.maxChunk = max(1, maxChunk)  // the peer's max_data_xfer_size, even below 4096
        self.timeoutSeconds = timeoutSeconds
        abortFD = isTwin ? try? EventFD() : nil
    }

    /// A reply read by the connection thread (main socket). Kept only if a call awaits it.
    func deliver(_ m: Message) {
        let kept: Bool = replies.mutex.withLock {
            guard awaiting.contains(m.header.messageID), pending[m.header.messageID] == nil else { return false }
            pending[m.header.messageID] = m
            replies.broadcast()
            return true
        }
        if !kept {
            m.closeFDs()
            unmatchedReplies &+= 1
            Log.warning("vfio-user", "reply (id \(m.header.messageID), command \(m.header.command)) matches no DMA request: dropped")
        }
    }

    /// Fail every in-flight and later call (disconnect, cancel).
    func abort() {
        replies.mutex.withLock { closed = true; broken = true; replies.broadcast() }
        try? abortFD?.signal()
        if isTwin { conn.socket.shutdown() }  // wakes a receive or send blocked on it
    }

    func close() {
        abort()
        replies.mutex.withLock { for (_, m) in pending { m.closeFDs() }; pending = [:] }
    }

    private func call(_ cmd: VFIOUserCommand, _ payload: [UnsafeRawBufferPointer]) throws -> Message {
        try callLock.withLock {
            let id = conn.allocateID()
            try replies.mutex.withLock {
                if closed || broken { throw DeviceError(.ECONNRESET, "\(cmd): the client connection is gone or its DMA channel failed") }
                awaiting.insert(id)
            }
            defer { replies.mutex.withLock { awaiting.remove(id); pending.removeValue(forKey: id)?.closeFDs() } }
            let deadline = monotonicNanoseconds() + UInt64(timeoutSeconds * 1e9)
            do {
                try conn.send(id: id, command: cmd.rawValue, flags: MessageHeader.typeCommand, payload: payload)
            } catch {
                if isTwin { replies.mutex.withLock { broken = true } }
                throw DeviceError(.ETIMEDOUT, "\(cmd): sending to the client failed (\(error)): it does not read")
            }
            let reply: Message
            if isTwin {
                let left = deadline > monotonicNanoseconds() ? Int32(min((deadline - monotonicNanoseconds()) / 1_000_000, 1 << 30)) : 0
                let which = try? Poll.waitAnyReadable([conn.socket.fd.rawValue] + (abortFD.map { [$0.fd.rawValue] } ?? []), timeoutMilliseconds: max(left, 1))
                guard which == 0 else {
                    replies.mutex.withLock { broken = true }
                    conn.socket.shutdown()
                    if which == nil { throw DeviceError(.ETIMEDOUT, "\(cmd): the client did not answer on the twin socket within \(timeoutSeconds) s") }
                    throw DeviceError(Errno(Glibc.ECANCELED), "\(cmd): cancelled (the server is stopping or the client went away)")
                }
                do { reply = try conn.receive() } catch {
                    replies.mutex.withLock { broken = true }
                    throw DeviceError(.ECONNRESET, "\(cmd): reading the reply on the twin socket failed: \(error)")
                }
            } else {
                reply = try replies.mutex.withLock {
                    while pending[id] == nil {
                        if closed { throw DeviceError(.ECONNRESET, "\(cmd): the client connection is gone") }
                        let now = monotonicNanoseconds()
                        guard now < deadline else { throw DeviceError(.ETIMEDOUT, "\(cmd): the client did not answer within \(timeoutSeconds) s") }
                        _ = replies.wait(timeoutSeconds: min(Double(deadline - now) / 1e9, 0.5))
                    }
                    return pending.removeValue(forKey: id)!
                }
            }
            reply.closeFDs()
            guard reply.header.isReply, reply.header.messageID == id, reply.header.command == cmd.rawValue else {
                if isTwin { replies.mutex.withLock { broken = true } }
                throw DeviceError(.EPROTO, "\(cmd): reply does not match the request")
            }
            if reply.header.isError {
                throw DeviceError(Errno(Int32(reply.header.errorNumber == 0 ? UInt32(EINVAL) : reply.header.errorNumber)), "\(cmd) failed at the client")
            }
            return reply
        }
    }

    func dmaRead(address: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws {
        var done = 0
        while done < buffer.count {
            let n = min(maxChunk, buffer.count - done)
            let req = DMAAccess(address: address + UInt64(done), count: UInt64(n)).encode()
            let reply = try req.withUnsafeBytes { try call(.dmaRead, [$0]) }
            let a = try DMAAccess(decoding: reply.payload[...], context: "DMA_READ reply")
            guard a.address == address + UInt64(done), a.count == UInt64(n), a.data.count >= n else {
                throw DeviceError(.EPROTO, "DMA_READ reply carries \(a.data.count) bytes for a \(n)-byte read")
            }
            a.data.prefix(n).withUnsafeBytes { src in
                UnsafeMutableRawBufferPointer(rebasing: buffer[done..<done + n]).copyMemory(from: src)
            }
            done += n
        }
    }

    func dmaWrite(address: UInt64, from buffer: UnsafeRawBufferPointer) throws {
        var done = 0
        while done < buffer.count {
            let n = min(maxChunk, buffer.count - done)
            var w = WireWriter(capacity: 16); w.u64(address + UInt64(done)); w.u64(UInt64(n))
            let head = w.bytes
            _ = try head.withUnsafeBytes { h in try call(.dmaWrite, [h, UnsafeRawBufferPointer(rebasing: buffer[done..<done + n])]) }
            done += n
        }
    }
}

extension VFIOUserRequest {
    /// The reply buffer the request's argsz describes, for commands whose reply is bounded by it.
    var replyBufferSize: UInt32? {
        switch self {
        case let .dmaUnmap(u): return u.argsz
        case let .deviceGetInfo(i): return i.argsz
        case let .deviceGetRegionInfo(argsz, _): return argsz
        case let .deviceGetRegionIOFDs(q): return q.argsz
        case let .deviceGetIRQInfo(q): return q.argsz
        case let .dirtyPages(d): return d.argsz
        case let .deviceFeature(f): return f.argsz
        default: return nil
        }
    }
}
