import Glibc
import SystemCalls

/// QEMU's `edu` PCI device (vendor 1234, device 11e8; QEMU docs/specs/edu.rst) driven through
/// kernel VFIO: the lab's real device behind a real IOMMU. Its DMA engine copies between an
/// IOVA and its 4 KiB internal buffer at device address 0x40000; its DMA mask is 28 bits.
public final class Edu: @unchecked Sendable {
    public static let vendor: UInt16 = 0x1234, device: UInt16 = 0x11e8
    public static let buffer: UInt64 = 0x40000, bufferSize = 4096
    public static let dmaLimit: UInt64 = 1 << 28
    enum Reg { static let irqRaise: UInt64 = 0x60, irqAck: UInt64 = 0x64; static let id: UInt64 = 0x00, liveness: UInt64 = 0x04, src: UInt64 = 0x80, dst: UInt64 = 0x88, count: UInt64 = 0x90, cmd: UInt64 = 0x98 }

    public let device: KernelDevice
    public let bar0: KernelDevice.RegionInfo

    public init(_ device: KernelDevice) throws {
        self.device = device
        bar0 = try device.regionInfo(0).0
        let id = try device.read(bar0, Reg.id, as: UInt32.self)
        guard id & 0xff == 0xed else { throw KernelVFIOError.invalid("\(device.name) is not an edu device (id register \(hex(UInt64(id))))") }
        try device.enableBusMaster()
    }

    /// The liveness register answers the bitwise inverse of what was written.
    public func isAlive() throws -> Bool {
        try device.write(bar0, Reg.liveness, UInt32(0x1234_5678))
        return try device.read(bar0, Reg.liveness, as: UInt32.self) == ~UInt32(0x1234_5678)
    }

    /// Raise an interrupt with these status bits (MSI when enabled, else INTx); `acknowledge` clears them.
    public func raiseInterrupt(_ bits: UInt32 = 1) throws { try device.write(bar0, Reg.irqRaise, bits) }
    public func acknowledgeInterrupt(_ bits: UInt32 = 1) throws { try device.write(bar0, Reg.irqAck, bits) }

    /// Copy `count` bytes between guest RAM at `iova` and the edu buffer (at `offset` in it),
    /// and wait for the engine to finish.
    public func dma(iova: UInt64, bufferOffset: UInt64 = 0, count: UInt64, toRAM: Bool, timeoutSeconds: Double = 10) throws {
        // QEMU 7.2's edu rejects (with a hardware error that stops the machine) a transfer
        // reaching the last byte of its buffer: stay below it.
        guard count < UInt64(Self.bufferSize) - bufferOffset, iova + count <= Self.dmaLimit else {
            throw KernelVFIOError.invalid("edu DMA of \(count) bytes at IOVA \(hex(iova)) is outside its buffer or its 28-bit DMA mask")
        }
        try device.write(bar0, toRAM ? Reg.src : Reg.dst, Self.buffer + bufferOffset)
        try device.write(bar0, toRAM ? Reg.dst : Reg.src, iova)
        try device.write(bar0, Reg.count, count)
        try device.write(bar0, Reg.cmd, UInt64(1 | (toRAM ? 2 : 0)))
        let deadline = monotonicNanoseconds() + UInt64(timeoutSeconds * 1e9)
        while try device.read(bar0, Reg.cmd, as: UInt64.self) & 1 != 0 {
            guard monotonicNanoseconds() < deadline else { throw KernelVFIOError.invalid("edu DMA did not complete in \(timeoutSeconds) s") }
            usleep(100)
        }
    }
}
