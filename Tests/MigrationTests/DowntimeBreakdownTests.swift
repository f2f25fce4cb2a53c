import Devices
import Glibc
import Machine
@testable import Migration
import SystemCalls
import VFIO
import VFIOUser
import XCTest

/// Issue 12, item 4: the downtime is measured phase by phase and predicted from this
/// migration's costs, and switch-over waits for the prediction to fit downtime-limit.
extension LiveMigrationTests {
    func testDowntimeBreakdownSumsToTheMeasuredDowntimeAndThePredictionIsBounded() throws {
        try startSource()
        let wait = try startDestination()
        var p = MigrationParameters()
        p.downtimeLimitMS = 2000
        let m = try connectSource(p)
        try m.run()
        XCTAssertNil(wait())
        let s = m.stats
        let b = try XCTUnwrap(s.downtimeBreakdown, "a completed migration has its breakdown")
        XCTAssertEqual(b.totalMS, s.downtimeMS, accuracy: 0.001, "the phases sum to the downtime")
        XCTAssertEqual(b.devices.count, 1, "one entry per device")
        XCTAssertTrue(b.destinationReported, "this build's destination reports its load and resume")
        for v in [b.pause, b.ramRemainder, b.vcpuState, b.destinationLoad, b.handshake, b.resume] + b.devices {
            XCTAssertGreaterThanOrEqual(v, 0)
        }
        XCTAssertGreaterThan(b.devices[0], 0, "the device's remaining state was timed")
        let e = try XCTUnwrap(s.expectedBreakdown, "the prediction is kept")
        XCTAssertTrue(e.totalMS.isFinite)
        XCTAssertGreaterThan(e.totalMS, 0, "a stop is never free")
        XCTAssertEqual(e.devices.count, 1)
        XCTAssertFalse(s.forcedSwitchover)
        XCTAssertLessThanOrEqual(Double(s.expectedDowntimeMS), Double(p.downtimeLimitMS), "it switched over because the prediction fit")
        XCTAssertEqual(Double(s.expectedDowntimeMS), e.totalMS, accuracy: 0.5, "expected-downtime is the breakdown's total")
    }

    func testSwitchoverWaitsWhileThePredictionExceedsTheLimitAndGoesWhenItIsRaised() throws {
        try startSource()
        let wait = try startDestination()
        var p = MigrationParameters()
        p.downtimeLimitMS = 0       // no stop fits: the prediction is never 0
        p.maxIterations = 100_000   // and nothing forces the switch-over
        let m = try connectSource(p)
        var failure: Error?
        let t = try OSThread(name: "source") { do { try m.run() } catch let e { failure = e } }
        let deadline = monotonicNanoseconds() + 30_000_000_000
        while m.stats.iterations < 4 && monotonicNanoseconds() < deadline && m.stats.status != .failed { usleep(10_000) }
        XCTAssertGreaterThanOrEqual(m.stats.iterations, 4, "pre-copy iterates")
        XCTAssertEqual(m.stats.status, .active, "still waiting: the prediction exceeds the limit")
        XCTAssertGreaterThan(try XCTUnwrap(m.stats.expectedBreakdown).totalMS, 0, "the prediction is there while it waits")
        let waited = m.stats.iterations
        m.setDowntimeLimit(60_000)
        t.join()
        XCTAssertNil(failure)
        XCTAssertNil(wait())
        XCTAssertEqual(m.stats.status, .completed)
        XCTAssertFalse(m.stats.forcedSwitchover, "the raised limit let it switch over, nothing forced it")
        XCTAssertGreaterThanOrEqual(m.stats.iterations, waited)
        XCTAssertEqual(m.stats.downtimeLimitMS, 60_000)
    }

    func testAnOlderDestinationsSilenceCountsTheWholeWaitsAsLoadAndResume() {
        // A destination without the times (an older build: READY's text empty, no x-resume-ns).
        var c = DowntimeClock()
        c.mark(\.pause)
        let p = c.phases(readyWaitNS: 3_000_000, ackWaitNS: 2_000_000, loadNS: nil, resumeNS: nil)
        XCTAssertEqual(p.destinationLoad, 3, accuracy: 1e-9)
        XCTAssertEqual(p.resume, 2, accuracy: 1e-9)
        XCTAssertEqual(p.handshake, 0)
        XCTAssertFalse(p.destinationReported)
        // A destination claiming more than the wait is held to the wait.
        let q = c.phases(readyWaitNS: 3_000_000, ackWaitNS: 2_000_000, loadNS: 9_000_000_000, resumeNS: 500_000)
        XCTAssertEqual(q.destinationLoad, 3, accuracy: 1e-9)
        XCTAssertEqual(q.resume, 0.5, accuracy: 1e-9)
        XCTAssertEqual(q.handshake, 1.5, accuracy: 1e-9)
        XCTAssertEqual(q.totalMS, q.pause + 5, accuracy: 1e-9, "the split never changes the sum")
    }

    /// The stop-copy's last RAM sends only filled the socket buffer: the destination applied
    /// it well into the READY wait (the stop-copy probe's answer says when). That part of the
    /// wait is RAM remainder; the handshake keeps the rest, and the sum does not change. The
    /// old split put 0.5 to 2 ms of RAM into the handshake.
    func testTheRAMStillBeingAppliedInTheReadyWaitCountsAsRAMRemainder() {
        var c = DowntimeClock()
        c.mark(\.pause)
        c.mark(\.ramRemainder)
        let before = c.phases(readyWaitNS: 3_000_000, ackWaitNS: 1_000_000, loadNS: 500_000, resumeNS: 400_000)
        let p = c.phases(readyWaitNS: 3_000_000, ackWaitNS: 1_000_000, loadNS: 500_000, resumeNS: 400_000, ramDrainNS: 2_000_000)
        XCTAssertEqual(p.ramRemainder - before.ramRemainder, 2, accuracy: 1e-9)
        XCTAssertEqual(p.handshake, (3 - 0.5 - 2) + (1 - 0.4), accuracy: 1e-9)
        XCTAssertEqual(p.destinationLoad, 0.5, accuracy: 1e-9)
        XCTAssertEqual(p.totalMS, before.totalMS, accuracy: 1e-9, "the split never changes the sum")
        // Never more than the wait left after the destination's own load.
        let q = c.phases(readyWaitNS: 3_000_000, ackWaitNS: 1_000_000, loadNS: 500_000, resumeNS: 400_000, ramDrainNS: 9_000_000)
        XCTAssertEqual(q.ramRemainder - before.ramRemainder, 2.5, accuracy: 1e-9)
        XCTAssertEqual(q.handshake, 0.6, accuracy: 1e-9)
        XCTAssertEqual(q.totalMS, before.totalMS, accuracy: 1e-9)
    }

    /// In a real migration (one channel) a probe goes right after the stop-copy's RAM, before
    /// the device state and vCPUs, and the destination answers it; the phases still sum to
    /// the downtime with the RAM still being applied moved out of the handshake.
    func testAProbeFollowsTheStopCopysRAMAndThePhasesStillSumToTheDowntime() throws {
        try startSource()
        let answered = Mutex()
        var probes: [UInt64] = []
        let wait = try startDestination { d in d.beforeProbeAnswerForTesting = { n in answered.withLock { probes.append(n) } } }
        var p = MigrationParameters()
        p.downtimeLimitMS = 2000
        let m = try connectSource(p)
        var types: [MigrationStream.SectionType] = []
        var syncsInTheStop = 0
        m.beforeSection = { [src] t, _ in
            types.append(t)
            if t == .sync && src!.vm.isPaused { syncsInTheStop += 1 }
        }
        try m.run()
        XCTAssertNil(wait())
        let b = try XCTUnwrap(m.stats.downtimeBreakdown)
        XCTAssertEqual(b.totalMS, m.stats.downtimeMS, accuracy: 0.001, "the phases sum to the downtime")
        var k = try XCTUnwrap(types.lastIndex(of: .vcpus)) - 1
        while k > 0 && types[k] == .device { k -= 1 }
        XCTAssertEqual(types[k], .sync, "a probe between the stop-copy's RAM and the device state (\(types.suffix(8)))")
        XCTAssertEqual(syncsInTheStop, 1, "one probe, sent with the VM paused (the stop-copy)")
        let n = answered.withLock { probes }
        XCTAssertEqual(n.count, types.filter { $0 == .sync }.count, "one channel: every SYNC is a probe, and each was answered")
    }

    func testTheDestinationsTimesAreReadOnlyAsUnsignedIntegers() {
        XCTAssertEqual(DestinationTimes.value("x-load-ns", in: DestinationTimes.readyText(loadNS: 1234)), 1234)
        XCTAssertEqual(DestinationTimes.value("x-resume-ns", in: "{\"pages\":3,\"x-resume-ns\": 77}"), 77)
        XCTAssertNil(DestinationTimes.value("x-load-ns", in: ""), "an older destination's empty READY")
        XCTAssertNil(DestinationTimes.value("x-load-ns", in: "{\"x-load-ns\":-5}"))
        XCTAssertNil(DestinationTimes.value("x-load-ns", in: "{\"x-load-ns\":\"5\"}"))
        XCTAssertNil(DestinationTimes.value("x-load-ns", in: "{\"x-load-ns\":99999999999999999999999}"), "past 2^64-1: no value, not its first 19 digits")
    }
}
