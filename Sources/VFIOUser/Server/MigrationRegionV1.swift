import Glibc
import SystemCalls
import VFIO

/// The migration v1 region (type 3, subtype 1), laid out as `struct vfio_device_migration_info`
/// followed by a data section, implemented on top of the same `MigrationEndpoint` as v2.
///
///   device_state  RUNNING 001, PRE_COPY 011, STOP_COPY 010, STOP 000, RESUMING 100
///   pending_bytes 0 exactly when no data is available (PRE_COPY: for now; STOP_COPY: the end)
///   data_offset   reading it stages the next chunk in the data section (save side)
///   data_size     save: size of the staged chunk; resume: writing it consumes that many bytes
///
/// The data section is backed by a memfd and offered for mmap (sparse area), as the seed allowed.
public final class MigrationRegionV1: @unchecked Sendable {
    public static let regionIndex: UInt32 = 9
    public static let dataOffset: UInt64 = 4096
    public let dataSectionSize: Int
    let endpoint: MigrationEndpoint
    let dataFD: FileDescriptor
    let data: MappedRegion
    private var stagedSize = 0
    private var staged = false
    private var handedOut = false
    private let lock = Mutex()

    public init(endpoint: MigrationEndpoint, dataSectionSize: Int = 1 << 20) throws {
        self.endpoint = endpoint
        self.dataSectionSize = dataSectionSize
        // The memfd mirrors the region's layout, so a client mmaps it at the region offset of
        // the data section, as the sparse area says.
        dataFD = try MemFD.create(name: "vfio-migration-v1", size: Self.dataOffset + UInt64(dataSectionSize))
        data = try MappedRegion(fd: dataFD, offset: Self.dataOffset, length: dataSectionSize)
    }

    public var size: UInt64 { Self.dataOffset + UInt64(dataSectionSize) }

    public var description: RegionDescription {
        RegionDescription(index: Self.regionIndex, size: size, flags: [.read, .write, .mmap], mmapFD: dataFD,
                          sparseAreas: [SparseMMapArea(offset: Self.dataOffset, size: UInt64(dataSectionSize))], type: (3, 1))
    }

    private var v1State: UInt32 { MigrationV1State(v2: endpoint.state)?.rawValue ?? MigrationV1State.error.rawValue }

    /// Stage the next chunk if none is staged (or the previous one was handed out).
    private func stage() throws {
        if staged && !handedOut { return }
        staged = false; handedOut = false; stagedSize = 0
        guard endpoint.state.isSaving else { return }
        let bytes = try endpoint.read(max: dataSectionSize)
        _ = bytes.withUnsafeBytes { memcpy(data.base, $0.baseAddress!, $0.count) }
        stagedSize = bytes.count
        staged = true
    }

    public func read(offset: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws {
        try lock.withLock {
            if offset >= Self.dataOffset {
                let o = Int(offset - Self.dataOffset)
                guard o + buffer.count <= dataSectionSize else { throw DeviceError(.EINVAL, "v1 data section access out of range") }
                memcpy(buffer.baseAddress!, data.base + o, buffer.count)
                return
            }
            // Fields must be accessed at their native width and alignment.
            var v: UInt64
            switch (offset, buffer.count) {
            case (0, 4): v = UInt64(v1State)
            case (4, 4): v = 0
            case (8, 8):
                try stage()
                v = staged && stagedSize > 0 ? UInt64(stagedSize) + (endpoint.state == .preCopy ? endpoint.device.preCopyInfo().dirtyBytes : 0) : 0
            case (16, 8):
                try stage()
                v = Self.dataOffset
            case (24, 8):
                v = UInt64(stagedSize)
                handedOut = true
            default: throw DeviceError(.EINVAL, "v1 migration region: access at \(offset) of \(buffer.count) bytes is not a field")
            }
            for i in 0..<buffer.count { buffer[i] = UInt8(truncatingIfNeeded: v >> (8 * UInt64(i))) }
        }
    }

    public func write(offset: UInt64, from buffer: UnsafeRawBufferPointer) throws {
        try lock.withLock {
            if offset >= Self.dataOffset {
                let o = Int(offset - Self.dataOffset)
                guard o + buffer.count <= dataSectionSize else { throw DeviceError(.EINVAL, "v1 data section access out of range") }
                memcpy(data.base + o, buffer.baseAddress!, buffer.count)
                return
            }
            var v: UInt64 = 0
            for i in 0..<buffer.count { v |= UInt64(buffer[i]) << (8 * UInt64(i)) }
            switch (offset, buffer.count) {
            case (0, 4):
                let bits = MigrationV1State(rawValue: UInt32(v) & MigrationV1State.mask)
                guard bits.isValid, !bits.isError, let target = bits.v2 else {
                    throw DeviceError(.EINVAL, "v1 device_state \(bits) is not a valid target")
                }
                staged = false; handedOut = false; stagedSize = 0
                try endpoint.set(target)
            case (24, 8):
                guard endpoint.state == .resuming else { throw DeviceError(.EINVAL, "v1 data_size written outside RESUMING") }
                guard v <= UInt64(dataSectionSize) else { throw DeviceError(.EINVAL, "v1 data_size \(v) exceeds the data section") }
                try endpoint.write(UnsafeRawBufferPointer(start: data.base, count: Int(v)))
            case (4, 4): break  // reserved: writes ignored
            default: throw DeviceError(.EINVAL, "v1 migration region: write at \(offset) of \(buffer.count) bytes is not a writable field")
            }
        }
    }
}
