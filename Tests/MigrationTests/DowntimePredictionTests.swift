import Glibc
import Machine
@testable import Migration
import SystemCalls
import VFIO
import XCTest

/// Issue 12, item 4: the prediction is made of costs measured in this migration, and the
/// stop waits for the destination to have applied what was sent before it (probes).
final class DowntimeModelTests: XCTestCase {
    /// Given inputs, the phases are exactly what they are made of (no clock involved).
    func testThePredictionIsBuiltFromTheMeasuredInputs() {
        var m = DowntimeModel()
        for r in [1e9, 3e9, 2e9] { m.noteRAMSection(bytes: 4 << 20, ns: UInt64(Double(4 << 20) / r * 1e9)) }
        m.noteRAM(bytes: 100 << 20, ns: 1_000_000_000)  // the pass's aggregate: 0.1 GB/s, not used
        XCTAssertEqual(m.ramRate!, 2e9, accuracy: 1e3, "the median section rate")
        m.harvestNS = 1_000_000
        m.noteDevice(0, bytes: 1 << 20, ns: 1_000_000)       // 1 MiB per ms
        m.noteRoundTrip(0, ns: 100_000)                       // 0.1 ms per message to the device
        m.noteBacklog(ns: 7_000_000)
        m.noteRoundTrip(ns: 300_000)                          // an idle probe: 0.3 ms
        let p = m.predict(dirtyPages: 1000, deviceSizes: [2 << 20], vcpuStateBytes: 2048, rttNS: 9_000_000, fallbackRate: 1e6, backlogNS: 7_000_000)
        XCTAssertEqual(p.ramRemainder, 1 + 1000 * 4096 / 2e9 * 1000, accuracy: 1e-9, "harvest, then the dirty pages at the section rate")
        XCTAssertEqual(p.devices.count, 1)
        XCTAssertEqual(p.devices[0], 2 + 2 * 0.1, accuracy: 1e-9, "2 MiB at 1 MiB/ms, and two round trips")
        XCTAssertEqual(p.handshake, 2 * 0.3 + 7, accuracy: 1e-9, "two idle round trips (not the kernel's 9 ms TCP estimate) and the backlog")
        XCTAssertEqual(p.pause, 0.2 + 0.1, accuracy: 1e-9)
        XCTAssertEqual(p.totalMS, p.pause + p.ramRemainder + p.devices[0] + p.vcpuState + p.destinationLoad + p.handshake + p.resume, accuracy: 1e-9)
        // Caught up: no backlog left inside the stop.
        let caughtUp = m.predict(dirtyPages: 1000, deviceSizes: [2 << 20], vcpuStateBytes: 2048, rttNS: 9_000_000, fallbackRate: 1e6, backlogNS: 0)
        XCTAssertEqual(p.totalMS - caughtUp.totalMS, 7, accuracy: 1e-9)
    }

    /// Before an idle probe was timed, the kernel's round trip stands in; with too few timed
    /// sections the pass's own rate does.
    func testWithoutProbesOrSectionsTheFallbacksAreUsed() {
        var m = DowntimeModel()
        m.noteRAMSection(bytes: 4 << 20, ns: 1_000_000)
        m.noteRAM(bytes: 1 << 30, ns: 1_000_000_000)
        XCTAssertEqual(m.ramRate!, Double(1 << 30), accuracy: 1, "two sections are not enough for a median: the pass's rate")
        m.noteRAM(bytes: 1 << 30, ns: 2_000_000_000)
        XCTAssertEqual(m.ramRate!, Double(1 << 29), accuracy: 1, "the sections of the last pass were forgotten")
        let p = m.predict(dirtyPages: 0, deviceSizes: [], vcpuStateBytes: 0, rttNS: 2_000_000, fallbackRate: 1e9)
        XCTAssertEqual(p.handshake, 4, accuracy: 1e-9, "two TCP round trips")
        XCTAssertEqual(p.ramRemainder, 0, accuracy: 1e-9)
    }

    func testInputsCarryWhatThePredictionWasMadeOf() {
        var m = DowntimeModel()
        m.noteRAM(bytes: 1 << 30, ns: 1_000_000_000)
        m.harvestNS = 2_500_000
        m.noteBacklog(ns: 4_000_000)
        m.noteRoundTrip(ns: 250_000)
        m.noteDevice(0, bytes: 1 << 20, ns: 1_000_000)
        m.noteRoundTrip(0, ns: 50_000)
        let i = m.inputs(catchUpNS: 6_000_000, answersProbes: true)
        XCTAssertEqual(i.ramRate, Double(1 << 30), accuracy: 1)
        XCTAssertEqual(i.harvestMS, 2.5, accuracy: 1e-9)
        XCTAssertEqual(i.backlogMS, 4, accuracy: 1e-9)
        XCTAssertEqual(i.roundTripMS!, 0.25, accuracy: 1e-9)
        XCTAssertEqual(i.catchUpMS, 6, accuracy: 1e-9)
        XCTAssertEqual(i.deviceRates.count, 1)
        XCTAssertEqual(i.deviceRoundTripMS, [0.05])
        XCTAssertTrue(i.destinationAnswersProbes)
    }
}

/// The probe on the wire: a keep-alive SYNC whose pass has bit 63 (MigrationStream's SYNC).
final class ProbeStreamTests: XCTestCase {
    final class MemorySource: ByteSource {
        var bytes: [UInt8], at = 0
        init(_ b: [UInt8]) { bytes = b }
        func readExactly(_ buffer: UnsafeMutableRawBufferPointer) throws {
            guard at + buffer.count <= bytes.count else { throw Errno.ECONNRESET }
            bytes.withUnsafeBytes { buffer.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[at..<(at + buffer.count)])) }
            at += buffer.count
        }
    }

    /// The probe is applied in stream order: after the RAM before it, before what follows.
    /// A keep-alive without bit 63 (what multifd sends on a silent main channel) is no probe.
    func testAProbeComesAfterEverythingBeforeItAndAPlainKeepAliveIsNone() throws {
        // Header, CONFIG and one RAM page of 1s (ZeroCopyStreamTests' builder, its END cut off).
        let head = Array(ZeroCopyStreamTests.stream(runs: [(0, 1, false)], checked: false).dropLast(16 + 16 + 8))
        var e = MigrationStreamEncoder(flags: 0)
        e.section(.sync, MigrationStream.probePayload(41))
        var keepAlive = BEWriter(); keepAlive.u64(41); keepAlive.u32(2); keepAlive.u32(0)
        e.section(.sync, keepAlive.bytes)
        e.section(.end, MigrationStream.endPayload(pagesSent: 1, sourceRunning: true))
        let sink = Sink()
        try MigrationStreamDecoder(source: MemorySource(head + e.bytes.dropFirst(MigrationStream.headerSize)), sink: sink).run()
        XCTAssertEqual(sink.events, ["config", "ram", "probe 41", "end"])
        XCTAssertEqual(sink.ram[4095], 1)
    }

    /// An older destination's sink (no `probe` of its own) takes a probe as the keep-alive it
    /// is: the stream goes on.
    func testASinkWithoutProbesIgnoresThem() throws {
        final class OldSink: MigrationSink {
            var ended = false
            func config(ramSize: UInt64, vcpus: UInt32, devices: UInt32) throws {}
            func ramDestination(gpa: UInt64, pages: UInt32) throws -> UnsafeMutableRawBufferPointer { throw Errno.EINVAL }
            func ramZero(gpa: UInt64, pages: UInt32) throws {}
            func deviceSetup(device: UInt32) throws {}
            func deviceData(device: UInt32, _ data: UnsafeRawBufferPointer) throws {}
            func deviceConfig(device: UInt32, _ data: ArraySlice<UInt8>) throws {}
            func deviceInitialDataSent(device: UInt32) throws {}
            func vcpus(_ states: [VCPUStateBytes]) throws {}
            func end(pagesSent: UInt64) throws { ended = true }
        }
        var e = MigrationStreamEncoder(flags: 0)
        e.section(.config, MigrationStream.configPayload(ramSize: 4 * 4096, vcpus: 0, devices: 0))
        e.section(.sync, MigrationStream.probePayload(1))
        e.section(.end, MigrationStream.endPayload(pagesSent: 0, sourceRunning: true))
        let sink = OldSink()
        try MigrationStreamDecoder(source: MemorySource(e.bytes), sink: sink).run()
        XCTAssertTrue(sink.ended)
    }

    /// Review D6: the main stream and a multifd channel check a section header the same way
    /// (one readSectionHeader): an unknown type names its offset, an oversized length its type.
    func testTheMainStreamAndAChannelRefuseTheSameBadHeadersAlike() throws {
        func header(_ type: UInt8, length: UInt64) -> [UInt8] {
            var w = BEWriter(); w.append([type, 0, 0, 0]); w.u32(9); w.u64(length); return w.bytes
        }
        var config = MigrationStreamEncoder(flags: 0)
        config.section(.config, MigrationStream.configPayload(ramSize: 4 * 4096, vcpus: 0, devices: 0))
        let prefix = config.bytes
        for (bad, expected) in [(header(99, length: 0), StreamError.unknownSection(99, offset: UInt64(prefix.count))),
                                (header(MigrationStream.SectionType.ram.rawValue, length: MigrationStream.maxSectionLength + 1),
                                 StreamError.sectionTooLarge(.ram, MigrationStream.maxSectionLength + 1))] {
            XCTAssertThrowsError(try MigrationStreamDecoder(source: MemorySource(prefix + bad), sink: Sink()).run()) {
                XCTAssertEqual($0 as? StreamError, expected, "main stream")
            }
            let channel = MigrationStreamDecoder(channel: MemorySource(bad), sink: Sink(), ramSize: 4 * 4096, devices: 0, flags: 0)
            XCTAssertThrowsError(try channel.runChannel()) {
                var e = expected
                if case .unknownSection(let t, _) = expected { e = .unknownSection(t, offset: 0) }  // a channel's own offsets
                XCTAssertEqual($0 as? StreamError, e, "multifd channel")
            }
        }
    }
}

/// Real migrations: the source waits before the stop until the destination caught up.
extension LiveMigrationTests {
    /// A destination that is behind (its answer to the end of the first pass comes late) is
    /// waited for before the stop, and the wait is measured as its backlog; the switch-over
    /// round trip is timed with an idle probe, and query-migrate's inputs carry both.
    func testTheStopWaitsForTheDestinationToCatchUpAndItsBacklogIsMeasured() throws {
        startSource()
        let wait = startDestination { d in d.beforeProbeAnswerForTesting = { n in if n == 2 { usleep(500_000) } } }
        var p = MigrationParameters()
        p.downtimeLimitMS = 2000
        let m = try connectSource(p)
        try m.run()
        XCTAssertNil(wait())
        let i = m.stats.downtimeInputs
        XCTAssertTrue(i.destinationAnswersProbes)
        XCTAssertTrue(i.caughtUpAtStop, "the stop came after the destination applied everything sent before it")
        // Lower bounds from the destination's own 500 ms sleep (the wait began just after the
        // probe went out, a harvest later).
        XCTAssertGreaterThanOrEqual(i.catchUpMS, 300, "it waited for the late answer (the VM ran meanwhile)")
        XCTAssertGreaterThanOrEqual(i.backlogMS, 500, "the late answer's delay is the destination's backlog")
        XCTAssertNotNil(i.roundTripMS, "an idle probe timed the switch-over's round trip")
        let e = try XCTUnwrap(m.stats.expectedBreakdown)
        XCTAssertLessThan(e.handshake, i.backlogMS, "the last prediction came after the catch-up: no backlog left in it (\(i), \(e), \(m.stats.iterations) iterations)")
        XCTAssertGreaterThan(i.ramRate, 0)
    }

    /// A destination further behind than the wait's bound (2 s) is not switched to: one more
    /// pass, and the stop comes once it has caught up.
    func testSwitchoverWaitsWhileTheDestinationIsBehind() throws {
        startSource()
        let wait = startDestination { d in d.beforeProbeAnswerForTesting = { n in if n == 2 { usleep(2_500_000) } } }
        var p = MigrationParameters()
        p.downtimeLimitMS = 2000
        let m = try connectSource(p)
        try m.run()
        XCTAssertNil(wait())
        XCTAssertGreaterThanOrEqual(m.stats.iterations, 2, "the first pass fit the limit, but the destination had not caught up")
        XCTAssertTrue(m.stats.downtimeInputs.caughtUpAtStop)
        XCTAssertFalse(m.stats.forcedSwitchover)
    }

    /// An older destination answers no probe: the source switches over as before, knowing
    /// only that it does not know the backlog.
    func testAnOlderDestinationWithoutProbesStillMigrates() throws {
        startSource()
        let wait = startDestination { d in d.answersProbes = false }
        let m = try connectSource()
        try m.run()
        XCTAssertNil(wait())
        XCTAssertEqual(m.stats.status, .completed)
        XCTAssertFalse(m.stats.downtimeInputs.destinationAnswersProbes)
        XCTAssertFalse(m.stats.downtimeInputs.caughtUpAtStop)
        XCTAssertNil(m.stats.downtimeInputs.roundTripMS)
        let b = try XCTUnwrap(m.stats.downtimeBreakdown)
        XCTAssertEqual(b.totalMS, m.stats.downtimeMS, accuracy: 0.001, "the phases sum to the downtime")
    }
}
