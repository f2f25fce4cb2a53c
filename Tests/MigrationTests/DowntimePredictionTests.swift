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

    /// Seen on a loaded machine (two busy loops on two cores): the pre-copy sections' median
    /// said 2.5 GB/s, but the stop-copy's RAM took twice its prediction, because a section's
    /// send time is how fast the socket buffer took it, not when the destination applied it.
    /// A pass to a caught-up destination, timed until its probe was answered, is what the
    /// stop-copy pays: the prediction uses that (the old model used the median and missed).
    func testACaughtUpPassTimedEndToEndPredictsTheRAMRemainderNotTheSectionMedian() {
        var m = DowntimeModel()
        // 4 MiB sections of the bulk pass as measured under load (ms).
        for ms in [7.10, 1.34, 1.41, 3.36, 2.16, 3.17, 1.22, 3.38, 1.47, 1.68] {
            m.noteRAMSection(bytes: 4 << 20, ns: UInt64(ms * 1e6))
        }
        m.noteRAM(bytes: 512 << 20, ns: 40_000_000)
        let median = m.ramRate!
        XCTAssertEqual(median, Double(4 << 20) / 1.68e-3, accuracy: 1, "the median section rate (the upper of the two middle ones)")
        for ns: UInt64 in [2_400_000, 60_000, 80_000] { m.noteRoundTrip(ns: ns) }
        // The pass after the catch-up: 20.8 MB, answered 17.5 ms after its first send.
        m.noteCaughtUpPass(bytes: 20_759_060, ns: 17_500_000)
        let rate = 20_759_060 / ((17_500_000 - 40_000) / 1e9)
        XCTAssertEqual(m.effectiveRAMRate!, rate, accuracy: 1, "end to end, the probe answer's way back (half the median round trip) taken out")
        m.harvestNS = 100_000
        let p = m.predict(dirtyPages: 5000, deviceSizes: [], vcpuStateBytes: 2048, rttNS: 0, fallbackRate: 1e6)
        XCTAssertEqual(p.ramRemainder, 0.1 + 5000 * 4096 / rate * 1000, accuracy: 1e-9)
        let old = 0.1 + 5000 * 4096 / median * 1000
        XCTAssertGreaterThan(p.ramRemainder, 1.5 * old, "the section median predicted under two thirds of it")
        XCTAssertEqual(m.inputs(catchUpNS: 0, answersProbes: true).ramRate, rate, accuracy: 1, "query-migrate shows the rate used")
        // A later, larger caught-up pass replaces it; a tiny one (fixed costs only) does not.
        m.noteCaughtUpPass(bytes: 64 << 10, ns: 5_000_000)
        XCTAssertEqual(m.effectiveRAMRate!, rate, accuracy: 1, "a 64 KiB pass says nothing about a rate")
        m.noteCaughtUpPass(bytes: 10 << 20, ns: 5_040_000)
        XCTAssertEqual(m.effectiveRAMRate!, Double(10 << 20) / 5e-3, accuracy: 1)
    }

    /// One idle probe under load answered after 2.4 to 5.4 ms (a wake-up latency), and the
    /// prediction carried twice that as handshake; the median of the last three does not.
    func testTheSwitchoverRoundTripIsTheMedianOfTheLastThreeProbes() {
        var m = DowntimeModel()
        XCTAssertNil(m.probeRoundTripNS)
        m.noteRoundTrip(ns: 5_400_000)
        XCTAssertEqual(m.probeRoundTripNS, 5_400_000, "one sample is all there is")
        m.noteRoundTrip(ns: 70_000)
        m.noteRoundTrip(ns: 80_000)
        XCTAssertEqual(m.probeRoundTripNS, 80_000)
        let p = m.predict(dirtyPages: 0, deviceSizes: [], vcpuStateBytes: 0, rttNS: 9_000_000, fallbackRate: 1e9)
        XCTAssertEqual(p.handshake, 0.16, accuracy: 1e-9, "two median round trips, not 2 x 5.4 ms")
        for ns: UInt64 in [1_000_000, 2_000_000, 3_000_000] { m.noteRoundTrip(ns: ns) }
        XCTAssertEqual(m.probeRoundTripNS, 2_000_000, "only the last three count")
        XCTAssertEqual(m.inputs(catchUpNS: 0, answersProbes: true).roundTripMS!, 2, accuracy: 1e-9)
    }

    /// Under two busy loops the vCPUs took 2.4 to 6.6 ms to park against a predicted 0.2 ms:
    /// a vCPU thread exits KVM_RUN only when it runs, and it waits for a CPU. The pause is
    /// predicted from the vCPU threads' own scheduling in this migration (/proc schedstat):
    /// per thread, half its mean wait for the share of time it waited, a whole one for the
    /// share it slept (the kick wakes it).
    func testThePauseCountsTheVCPUThreadsRunQueueWaits() throws {
        typealias S = DowntimeModel.SchedStat
        var m = DowntimeModel()
        let a: [Int32: S] = [10: S(runNS: 0, waitNS: 0, slices: 0), 11: S(runNS: 0, waitNS: 5_000_000, slices: 4)]
        let b: [Int32: S] = [10: S(runNS: 50_000_000, waitNS: 50_000_000, slices: 10),   // never slept, waited half the time, 5 ms a slice
                             11: S(runNS: 1_000_000, waitNS: 7_000_000, slices: 24),       // asleep 97%, woke 20 times, 0.1 ms wait each
                             12: S(runNS: 0, waitNS: 90_000_000, slices: 1)]               // not there at the start: unknown
        m.noteVCPUScheduling(from: a, to: b, ns: 100_000_000)
        XCTAssertEqual(Double(m.vcpuQueueNS), 0.5 * 5e6 / 2 + (0.02 * 0.1e6 / 2 + 0.97 * 0.1e6), accuracy: 1)
        let p = m.predict(dirtyPages: 0, deviceSizes: [], vcpuStateBytes: 0, rttNS: 0, fallbackRate: 1e9)
        XCTAssertEqual(p.pause, 0.2 + Double(m.vcpuQueueNS) / 1e6, accuracy: 1e-9)
        XCTAssertGreaterThan(p.pause, 1.3, "the old model said 0.2 ms whatever the load")
        // A quiet machine: no waits, the kick alone.
        m.noteVCPUScheduling(from: a, to: a, ns: 100_000_000)
        XCTAssertEqual(m.predict(dirtyPages: 0, deviceSizes: [], vcpuStateBytes: 0, rttNS: 0, fallbackRate: 1e9).pause, 0.2, accuracy: 1e-9)
    }

    /// The vCPU threads are found by name (vcpuN) in /proc/self/task: a thread of that name
    /// is listed with its schedstat, a thread whose name only starts alike is not.
    func testTheVCPUThreadsSchedulingIsReadFromProc() throws {
        let quit = Flag()
        let named = try OSThread(name: "vcpu97") { while !quit.value { usleep(1000) } }
        let other = try OSThread(name: "vcpu9x") { while !quit.value { usleep(1000) } }
        defer { quit.set(); named.join(); other.join() }
        var found: [Int32: DowntimeModel.SchedStat] = [:]
        let deadline = monotonicNanoseconds() + 5_000_000_000  // the threads name themselves as they start
        while found.isEmpty && monotonicNanoseconds() < deadline { usleep(1000); found = DowntimeModel.threadSchedStats(prefix: "vcpu9") }
        XCTAssertEqual(found.count, 1, "vcpu97 only (\(found))")
        XCTAssertGreaterThan(found.values.first?.slices ?? 0, 0, "it ran")
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
    /// waited for before the stop; what the VM dirtied meanwhile then goes in one more pass to
    /// the caught-up destination, timed end to end (its probe's answer), and the stop comes
    /// after it. The switch-over round trip is timed with idle probes, and query-migrate's
    /// inputs carry all of it.
    func testTheStopWaitsForTheDestinationToCatchUpAndThenAPassToItIsTimedEndToEnd() throws {
        try startSource()
        var backlogSeen: UInt64 = 0
        let wait = try startDestination { d in d.beforeProbeAnswerForTesting = { n in if n == 2 { usleep(500_000) } } }
        var p = MigrationParameters()
        p.downtimeLimitMS = 2000
        let m = try connectSource(p)
        m.afterSectionForTesting = { _, _ in backlogSeen = max(backlogSeen, UInt64(m.stats.downtimeInputs.backlogMS)) }
        try m.run()
        XCTAssertNil(wait())
        let i = m.stats.downtimeInputs
        XCTAssertTrue(i.destinationAnswersProbes)
        XCTAssertTrue(i.caughtUpAtStop, "the stop came after the destination applied everything sent before it")
        // Lower bounds from the destination's own 500 ms sleep (the wait began just after the
        // probe went out, a harvest later).
        XCTAssertGreaterThanOrEqual(i.catchUpMS, 300, "it waited for the late answer (the VM ran meanwhile)")
        XCTAssertGreaterThanOrEqual(backlogSeen, 500, "the late answer's delay was the destination's backlog")
        XCTAssertLessThan(i.backlogMS, 500, "the last pass went to a caught-up destination (\(i))")
        XCTAssertGreaterThanOrEqual(m.stats.iterations, 2, "the pages dirtied during the 500 ms wait went in a pass of their own, before the stop")
        XCTAssertNotNil(i.roundTripMS, "idle probes timed the switch-over's round trip")
        let e = try XCTUnwrap(m.stats.expectedBreakdown)
        XCTAssertLessThan(e.handshake, 500, "the last prediction came after the catch-up: no backlog left in it (\(i), \(e), \(m.stats.iterations) iterations)")
        XCTAssertGreaterThan(i.ramRate, 0)
        XCTAssertFalse(m.stats.forcedSwitchover)
    }

    /// A destination further behind than the wait's bound (2 s) is not switched to: one more
    /// pass, and the stop comes once it has caught up.
    func testSwitchoverWaitsWhileTheDestinationIsBehind() throws {
        try startSource()
        let wait = try startDestination { d in d.beforeProbeAnswerForTesting = { n in if n == 2 { usleep(2_500_000) } } }
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
        try startSource()
        let wait = try startDestination { d in d.answersProbes = false }
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
