import SystemCalls
import VFIO

/// The device side of migration v2 for one device: the current state, the walk along the
/// kernel's state machine one arc at a time, and the data session rules.
public final class MigrationEndpoint: @unchecked Sendable {
    public let device: MigratableDevice
    public private(set) var state: MigrationState = .running
    private let lock = Mutex()

    public init(device: MigratableDevice) { self.device = device }
    public var capabilities: MigrationCapabilities { device.migrationCapabilities }

    /// SET MIG_DEVICE_STATE: walk to `target`. On failure the state is where the walk stopped
    /// (or ERROR if the device reported itself broken), as the kernel documents.
    public func set(_ target: MigrationState) throws {
        try lock.withLock {
            guard MigrationFSM.isSupported(target, by: capabilities) else {
                throw DeviceError(.EINVAL, "migration state \(target) is not supported (device flags \(capabilities))")
            }
            while state != target {
                let next: MigrationState
                do { next = try MigrationFSM.nextState(from: state, to: target, capabilities: capabilities) }
                catch { throw DeviceError(.EINVAL, "\(error)") }
                do {
                    try device.migrationArc(from: state, to: next)
                } catch let e as MigrationArcError {
                    if case .deviceBroken = e { state = .error }
                    throw DeviceError(.EINVAL, "\(state)→\(next) failed: \(e)")
                } catch let e as DeviceError {
                    throw DeviceError(e.errno, "\(state)→\(next) failed: \(e.reason)")
                } catch {
                    throw DeviceError(.EIO, "\(state)→\(next) failed: \(error)")
                }
                state = next
            }
            if !state.isSaving { releaseSender() }
        }
    }

    /// DEVICE_RESET: the only way out of ERROR; back to RUNNING.
    public func reset() { lock.withLock { state = .running; releaseSender() } }

    /// The splice pipe lives for one saving session: a server that migrated once holds no more
    /// descriptors afterwards than before (the soak test counts them).
    private func releaseSender() { senderLock.withLock { sender = nil } }

    public func read(max: Int) throws -> [UInt8] {
        try lock.withLock {
            guard state.isSaving else { throw DeviceError(.EINVAL, "MIG_DATA_READ in state \(state) (only PRE_COPY or STOP_COPY)") }
            return try device.readMigrationData(max: max)
        }
    }

    public func read(into buffer: UnsafeMutableRawBufferPointer) throws -> Int {
        try lock.withLock {
            guard state.isSaving else { throw DeviceError(.EINVAL, "MIG_DATA_READ in state \(state) (only PRE_COPY or STOP_COPY)") }
            let n = try device.readMigrationData(into: buffer)
            guard n >= 0, n <= buffer.count else { throw DeviceError(.EIO, "device returned \(n) bytes for a \(buffer.count)-byte read") }
            return n
        }
    }

    /// MIG_DATA_READ as pieces (see `MigratableDevice.readMigrationDataPieces`); nil when the
    /// device fills a buffer instead.
    public func readPieces(scratch: UnsafeMutableRawBufferPointer) throws -> [UnsafeRawBufferPointer]? {
        try lock.withLock {
            guard state.isSaving else { throw DeviceError(.EINVAL, "MIG_DATA_READ in state \(state) (only PRE_COPY or STOP_COPY)") }
            guard let pieces = try device.readMigrationDataPieces(scratch: scratch) else { return nil }
            guard pieces.reduce(0, { $0 + $1.count }) <= scratch.count else {
                throw DeviceError(.EIO, "device returned more than the \(scratch.count) bytes asked for")
            }
            return pieces
        }
    }

    /// A whole MIG_DATA_READ reply framed by the connection (`parts`: its headers, then the
    /// pieces from `readPieces`), written to `socket`: the pieces outside `scratch` lie in the
    /// stopped device's memory, which does not change until the stream is read (STOP_COPY
    /// quiesces the device and gates its BARs), so they go to the socket by reference
    /// (`SpliceSender`: no copy into the socket); the headers and scratch are copied, since
    /// scratch is reused by the next reply. Where splicing is not available, one sendmsg.
    public func sendByReference(_ parts: [UnsafeRawBufferPointer], scratch: UnsafeRawBufferPointer, to socket: UnixSocket) throws {
        func plain(_ parts: [UnsafeRawBufferPointer]) throws { try socket.send(parts) }
        try senderLock.withLock {
            if sender == nil { sender = .some(SpliceSender()) }
            guard let sp = sender ?? nil, !sp.disabled else { return try plain(parts) }
            let lo = UInt(bitPattern: scratch.baseAddress), hi = lo + UInt(scratch.count)
            try sp.send(parts.map { p in
                let a = UInt(bitPattern: p.baseAddress)
                // Small (the headers) or scratch pieces are copied (a pipe slot per piece either way).
                return (a >= lo && a < hi) || p.count < 4096 ? .copy(p) : .reference(p)
            }, to: socket.fd.rawValue, plainSend: plain)
        }
    }

    private let senderLock = Mutex()
    /// nil: not tried yet; .some(nil): splicing is not available here.
    private var sender: SpliceSender??

    /// MIG_DATA_WRITE received by the device straight from the socket (see
    /// `MigratableDevice.writeMigrationData(count:from:)`). Refused before a byte is read when
    /// the state is wrong.
    public func write(count: Int, from read: (UnsafeMutableRawBufferPointer) throws -> Void) throws {
        try lock.withLock {
            guard state == .resuming else { throw DeviceError(.EINVAL, "MIG_DATA_WRITE in state \(state) (only RESUMING)") }
            try device.writeMigrationData(count: count, from: read)
        }
    }

    public func write(_ data: UnsafeRawBufferPointer) throws {
        try lock.withLock {
            guard state == .resuming else { throw DeviceError(.EINVAL, "MIG_DATA_WRITE in state \(state) (only RESUMING)") }
            try device.writeMigrationData(data)
        }
    }
}
