import Glibc
import XCTest
@testable import Devices
import SystemCalls
import VFIO
@testable import VFIOUser

/// A real vfio-user server on a real UNIX socket, serving a dma-engine from a background thread.
typealias RunningServer = InProcessServer

extension InProcessServer {
    convenience init(stateSize: UInt64 = 1 << 20, options: VFIOUserServer.Options = .init(), name: String = "test") throws {
        try self.init(path: temporarySocketPath(name), stateSize: stateSize, options: options, name: name)
    }
}

func temporarySocketPath(_ tag: String) -> String {
    "/tmp/vfio-live-test-\(getpid())-\(tag)-\(UInt32.random(in: 0...UInt32.max)).sock"
}

/// Guest RAM for tests: a memfd mapped shared, as the VMM's RAM is.
final class GuestRAM {
    let fd: FileDescriptor
    let map: MappedRegion
    let size: UInt64
    init(size: UInt64) throws {
        self.size = size
        fd = try MemFD.create(name: "test-guest-ram", size: size)
        map = try MappedRegion(fd: fd, length: Int(size))
    }
    func fill(offset: Int, count: Int, seed: UInt8) {
        for i in 0..<count { map.base.storeBytes(of: UInt8(truncatingIfNeeded: i &* 31 &+ Int(seed)), toByteOffset: offset + i, as: UInt8.self) }
    }
    func bytes(offset: Int, count: Int) -> [UInt8] {
        Array(UnsafeRawBufferPointer(start: map.base + offset, count: count))
    }
}

func openFDCount() -> Int { openFileDescriptorCount() }

/// Program a dma-engine job through BAR0 and wait for it.
func runJob(_ c: VFIOUserClient, source: UInt64, destination: UInt64, count: UInt64, toRAM: Bool,
            irq: EventFD? = nil, file: StaticString = #filePath, line: UInt = #line) throws {
    try c.write64(0, DMAEngine.Reg.dmaSource, source)
    try c.write64(0, DMAEngine.Reg.dmaDestination, destination)
    try c.write64(0, DMAEngine.Reg.dmaCount, count)
    let before = try c.read64(0, DMAEngine.Reg.jobsCompleted)
    var cmd = DMAEngine.dmaCommandStart | DMAEngine.dmaCommandIRQ
    if toRAM { cmd |= DMAEngine.dmaCommandToRAM }
    try c.write64(0, DMAEngine.Reg.dmaCommand, cmd)
    if let irq {
        XCTAssertGreaterThan(try irq.wait(timeoutMilliseconds: 10_000), 0, "no interrupt for the DMA job", file: file, line: line)
    }
    let deadline = monotonicNanoseconds() + 10_000_000_000
    while try c.read64(0, DMAEngine.Reg.jobsCompleted) == before {
        guard monotonicNanoseconds() < deadline else { XCTFail("DMA job did not complete", file: file, line: line); return }
        usleep(200)
    }
    try c.write32(0, DMAEngine.Reg.irqAck, DMAEngine.irqDMA)
}
