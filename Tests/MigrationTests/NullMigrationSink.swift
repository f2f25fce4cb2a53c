import Glibc
@testable import Migration
import SystemCalls

/// A migration sink that takes every section and keeps only what a test looks at: RAM in a
/// scratch buffer (`ram`: `size` bytes of `fill`), the order of what came (`events`), the zero
/// pages, the END and the source's run state. `liveUpdate`, `multifd` and `sync` keep the
/// protocol's defaults (refused, as a plain destination does).
final class NullMigrationSink: MigrationSink {
    let ram: UnsafeMutableRawBufferPointer
    var events: [String] = []
    var zeroed = 0, ended = false
    var running: Bool?

    /// calloc: a large scratch buffer costs only the pages the stream writes.
    init(size: Int = 64 << 20, fill: UInt8 = 0) {
        ram = UnsafeMutableRawBufferPointer(start: calloc(size, 1), count: size)
        if fill != 0 { ram.initializeMemory(as: UInt8.self, repeating: fill) }
    }
    deinit { free(ram.baseAddress) }

    func config(ramSize: UInt64, vcpus: UInt32, devices: UInt32) throws { events.append("config") }
    func ramDestination(gpa: UInt64, pages: UInt32) throws -> UnsafeMutableRawBufferPointer {
        let (length, over) = UInt64(pages).multipliedReportingOverflow(by: 4096)
        guard !over, gpa <= UInt64(ram.count), length <= UInt64(ram.count) - gpa else { throw Errno.EINVAL }
        events.append("ram")
        return UnsafeMutableRawBufferPointer(rebasing: ram[Int(gpa)..<Int(gpa + length)])
    }
    func ramZero(gpa: UInt64, pages: UInt32) throws { zeroed += Int(pages); events.append("zero") }
    func deviceSetup(device: UInt32) throws {}
    func deviceData(device: UInt32, _ data: UnsafeRawBufferPointer) throws {}
    func deviceConfig(device: UInt32, _ data: ArraySlice<UInt8>) throws {}
    func deviceInitialDataSent(device: UInt32) throws {}
    func vcpus(_ states: [VCPUStateBytes]) throws {}
    func end(pagesSent: UInt64) throws { ended = true; events.append("end") }
    func sourceRunState(running: Bool) throws { self.running = running }
    func probe(_ number: UInt64) throws { events.append("probe \(number)") }
}

/// The names the tests knew it by (the hostile destination's ears; the probe tests' sink).
typealias DiscardingSink = NullMigrationSink
extension ProbeStreamTests { typealias Sink = NullMigrationSink }
