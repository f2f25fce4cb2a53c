import SystemCalls
import VFIO

/// One region a device exposes (BARs, ROM, config space, device-specific regions).
public struct RegionDescription {
    public var index: UInt32
    public var size: UInt64
    public var flags: RegionFlags
    /// Backing the client may mmap (sent with GET_REGION_INFO), with the mappable areas.
    public var mmapFD: FileDescriptor?
    public var sparseAreas: [SparseMMapArea]?
    /// TYPE capability (type, subtype), e.g. the v1 migration region (3, 1).
    public var type: (UInt32, UInt32)?

    public init(index: UInt32, size: UInt64, flags: RegionFlags, mmapFD: FileDescriptor? = nil,
                sparseAreas: [SparseMMapArea]? = nil, type: (UInt32, UInt32)? = nil) {
        self.index = index; self.size = size; self.flags = flags; self.mmapFD = mmapFD
        self.sparseAreas = sparseAreas; self.type = type
    }
}

public struct IRQDescription {
    public var index: UInt32
    public var count: UInt32
    public var flags: IRQInfoFlags
    public init(index: UInt32, count: UInt32, flags: IRQInfoFlags = [.eventfd]) {
        self.index = index; self.count = count; self.flags = flags
    }
}

/// What a device model looks like to the framework: its layout and its behaviour.
public struct DeviceDescription {
    public var flags: UInt32
    public var regions: [RegionDescription]
    public var irqs: [IRQDescription]
    public init(flags: UInt32, regions: [RegionDescription], irqs: [IRQDescription]) {
        self.flags = flags; self.regions = regions; self.irqs = irqs
    }
    public var regionCount: UInt32 { (regions.map(\.index).max() ?? 0) + (regions.isEmpty ? 0 : 1) }
    public var irqCount: UInt32 { (irqs.map(\.index).max() ?? 0) + (irqs.isEmpty ? 0 : 1) }
    public func region(_ i: UInt32) -> RegionDescription? { regions.first { $0.index == i } }
    public func irq(_ i: UInt32) -> IRQDescription? { irqs.first { $0.index == i } }
}

/// The services the framework gives a device: bounds-checked DMA into client memory and
/// interrupt delivery. A device never touches client memory any other way.
public protocol DeviceHost: AnyObject {
    var dma: DMAAccessor { get }
    /// Signal interrupt `vector` of IRQ index `index` (no-op if the client set no eventfd).
    func raiseIRQ(index: UInt32, vector: UInt32)
}

/// A device model served over vfio-user. Region accesses arrive on the connection thread;
/// devices that do DMA do it on their own worker threads through `DeviceHost.dma`.
public protocol VFIOUserDeviceModel: AnyObject {
    var deviceDescription: DeviceDescription { get }
    func attach(host: DeviceHost)
    func regionRead(index: UInt32, offset: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws
    func regionWrite(index: UInt32, offset: UInt64, from buffer: UnsafeRawBufferPointer) throws
    func reset() throws
    /// The client went away: the device keeps its state (the spec's reconnect rule).
    func connectionLost()
    /// The device's migration support, if any.
    var migration: MigratableDevice? { get }
}

extension VFIOUserDeviceModel {
    public func connectionLost() {}
    public var migration: MigratableDevice? { nil }
}

/// The device side of VFIO migration v2. The framework walks the state machine and calls
/// `migrationArc` once per single arc (as a kernel driver's `migration_set_state` does).
public protocol MigratableDevice: AnyObject {
    var migrationCapabilities: MigrationCapabilities { get }
    /// Perform one arc. On error the framework leaves the state at `from` (or ERROR if the
    /// device says so by throwing `MigrationArcError.deviceBroken`).
    func migrationArc(from: MigrationState, to: MigrationState) throws
    /// Next bytes of the saving stream, at most `max`. Fewer than `max` (possibly 0) means the
    /// data currently available is exhausted (PRE_COPY) or the stream has ended (STOP_COPY).
    func readMigrationData(max: Int) throws -> [UInt8]
    /// The same, into `buffer` (at most `buffer.count` bytes); returns the count. The server's
    /// MIG_DATA_READ reply is sent from that buffer, so a device that fills it in place moves
    /// its state with a single copy. The default goes through `readMigrationData(max:)`.
    func readMigrationData(into buffer: UnsafeMutableRawBufferPointer) throws -> Int
    /// The same bytes as `readMigrationData(into:)`, as pieces to send in one sendmsg: parts of
    /// `scratch` and, where the device's state is stable (stopped), its memory itself, so the
    /// data is not copied before the socket does. The pieces stay valid until the next call
    /// into the device. nil: not offered now (the server uses `readMigrationData(into:)`).
    func readMigrationDataPieces(scratch: UnsafeMutableRawBufferPointer) throws -> [UnsafeRawBufferPointer]?
    /// Consume bytes of the resuming stream (any segmentation).
    func writeMigrationData(_ data: UnsafeRawBufferPointer) throws
    /// Consume the next `count` bytes of the resuming stream, which `read` receives (each call
    /// fills the whole buffer it is given, or throws: the connection is lost) into buffers of
    /// the device's choosing. The server's MIG_DATA_WRITE hot path: a device that points `read`
    /// at the state's final place saves the copy out of a message buffer. A device that
    /// refuses the data throws `DeviceError` (the server drains what it did not read). The
    /// default receives into a buffer and calls `writeMigrationData(_:)`.
    func writeMigrationData(count: Int, from read: (UnsafeMutableRawBufferPointer) throws -> Void) throws
    /// Estimated STOP_COPY bytes (MIG_DATA_SIZE).
    func stopCopySize() -> UInt64
    /// PRE_COPY estimates (initial bytes still unread, dirty bytes known).
    func preCopyInfo() -> (initialBytes: UInt64, dirtyBytes: UInt64)
}

extension MigratableDevice {
    public func readMigrationDataPieces(scratch: UnsafeMutableRawBufferPointer) throws -> [UnsafeRawBufferPointer]? { nil }

    public func writeMigrationData(count: Int, from read: (UnsafeMutableRawBufferPointer) throws -> Void) throws {
        guard count > 0 else { return try writeMigrationData(UnsafeRawBufferPointer(start: nil, count: 0)) }
        let b = UnsafeMutableRawBufferPointer.allocate(byteCount: count, alignment: 64)
        defer { b.deallocate() }
        try read(b)
        try writeMigrationData(UnsafeRawBufferPointer(b))
    }

    public func readMigrationData(into buffer: UnsafeMutableRawBufferPointer) throws -> Int {
        let data = try readMigrationData(max: buffer.count)
        guard data.count <= buffer.count else { throw DeviceError(.EIO, "device returned \(data.count) bytes for a \(buffer.count)-byte read") }
        data.withUnsafeBytes { buffer.copyMemory(from: $0) }
        return data.count
    }
}

public enum MigrationArcError: Error, CustomStringConvertible {
    /// The arc failed and the device state is now undefined: move to ERROR.
    case deviceBroken(String)
    /// The arc was refused; the device is unchanged.
    case refused(String)
    public var description: String {
        switch self {
        case let .deviceBroken(s): return "device broken: \(s)"
        case let .refused(s): return s
        }
    }
}

/// A refusal with the errno to reply with and the reason to log.
public struct DeviceError: Error, CustomStringConvertible {
    public var errno: Errno
    public var reason: String
    public init(_ errno: Errno, _ reason: String) { self.errno = errno; self.reason = reason }
    public var description: String { "\(reason) (\(errno.name))" }
}
