import SystemCalls
import VFIOUser

/// A type-0 PCI configuration space (256 bytes) with the semantics a VMM expects: read-only
/// identification, writable command bits, BAR sizing (write all ones, read back the size mask),
/// and an MSI capability. Devices keep their registers elsewhere; this is only config space.
public final class PCIConfigSpace: @unchecked Sendable {
    public struct BAR: Sendable {
        public var index: Int
        public var size: UInt32  // power of two ≥ 16
        public var prefetchable: Bool
        public init(index: Int, size: UInt32, prefetchable: Bool = false) { self.index = index; self.size = size; self.prefetchable = prefetchable }
    }

    public static let size = 256
    public static let msiCapabilityOffset = 0x40
    public private(set) var bytes = [UInt8](repeating: 0, count: PCIConfigSpace.size)
    private let bars: [BAR]
    private let lock = Mutex()

    public init(vendor: UInt16, device: UInt16, revision: UInt8, classCode: UInt32, subsystemVendor: UInt16 = 0x1af4,
                subsystem: UInt16 = 0x1100, bars: [BAR], interruptPin: UInt8 = 1, msi: Bool = true) {
        self.bars = bars
        put16(0x00, vendor); put16(0x02, device)
        bytes[0x08] = revision
        bytes[0x09] = UInt8(classCode & 0xff); bytes[0x0a] = UInt8(classCode >> 8 & 0xff); bytes[0x0b] = UInt8(classCode >> 16 & 0xff)
        put16(0x2c, subsystemVendor); put16(0x2e, subsystem)
        bytes[0x3d] = interruptPin
        for b in bars { put32(0x10 + 4 * b.index, b.prefetchable ? 0x8 : 0) }
        if msi {
            put16(0x06, 0x0010)  // status: capabilities list
            bytes[0x34] = UInt8(Self.msiCapabilityOffset)
            bytes[Self.msiCapabilityOffset] = 0x05  // MSI
            bytes[Self.msiCapabilityOffset + 1] = 0
            put16(Self.msiCapabilityOffset + 2, 0x0080)  // 64-bit address capable, 1 vector
        }
    }

    private func put16(_ o: Int, _ v: UInt16) { bytes[o] = UInt8(v & 0xff); bytes[o + 1] = UInt8(v >> 8) }
    private func put32(_ o: Int, _ v: UInt32) { for i in 0..<4 { bytes[o + i] = UInt8(v >> (8 * UInt32(i)) & 0xff) } }
    private func get32(_ o: Int) -> UInt32 { (0..<4).reduce(UInt32(0)) { $0 | UInt32(bytes[o + $1]) << (8 * UInt32($1)) } }

    public var command: UInt16 { lock.withLock { UInt16(bytes[4]) | UInt16(bytes[5]) << 8 } }
    public var busMasterEnabled: Bool { command & 0x4 != 0 }
    public var intxDisabled: Bool { command & 0x400 != 0 }
    public var msiEnabled: Bool { lock.withLock { bytes[Self.msiCapabilityOffset + 2] & 1 != 0 } }

    public func read(offset: Int, into buffer: UnsafeMutableRawBufferPointer) {
        lock.withLock { for i in 0..<buffer.count { buffer[i] = offset + i < bytes.count ? bytes[offset + i] : 0 } }
    }

    /// Apply a write byte by byte through the write masks, then fix up BARs.
    public func write(offset: Int, from buffer: UnsafeRawBufferPointer) {
        lock.withLock {
            for i in 0..<buffer.count {
                let o = offset + i
                guard o < bytes.count else { break }
                bytes[o] = (bytes[o] & ~writeMask(o)) | (buffer[i] & writeMask(o))
            }
            for b in bars {
                let o = 0x10 + 4 * b.index
                guard offset < o + 4 && offset + buffer.count > o else { continue }
                // Sizing: the address bits below the size are hard-wired to zero.
                let v = get32(o) & ~(b.size - 1) & ~0xf
                put32(o, v | (b.prefetchable ? 0x8 : 0))
            }
        }
    }

    private func writeMask(_ o: Int) -> UInt8 {
        switch o {
        case 0x04: return 0x07  // IO, MEM, BUS MASTER
        case 0x05: return 0x04  // INTx disable
        case 0x0c: return 0xff  // cache line size
        case 0x0d: return 0xff  // latency timer
        case 0x10..<0x28:
            let idx = (o - 0x10) / 4
            return bars.contains { $0.index == idx } ? 0xff : 0
        case 0x3c: return 0xff  // interrupt line
        case Self.msiCapabilityOffset + 2: return bytes[Self.msiCapabilityOffset] == 0x05 ? 0x01 : 0  // MSI enable
        case (Self.msiCapabilityOffset + 4)..<(Self.msiCapabilityOffset + 14): return bytes[Self.msiCapabilityOffset] == 0x05 ? 0xff : 0
        default: return 0
        }
    }

    /// Raw copy for migration (the VMM's CONFIG record) and restore.
    public func snapshot() -> [UInt8] { lock.withLock { bytes } }
    public func restore(_ b: [UInt8]) {
        guard b.count == Self.size else { return }
        lock.withLock { bytes = b }
    }
}
