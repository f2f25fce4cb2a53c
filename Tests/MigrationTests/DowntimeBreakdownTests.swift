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
        startSource()
        let wait = startDestination()
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
        startSource()
        let wait = startDestination()
        var p = MigrationParameters()
        p.downtimeLimitMS = 0       // no stop fits: the prediction is never 0
        p.maxIterations = 100_000   // and nothing forces the switch-over
        let m = try connectSource(p)
        var failure: Error?
        let t = OSThread(name: "source") { do { try m.run() } catch let e { failure = e } }
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

    func testTheDestinationsTimesAreReadOnlyAsUnsignedIntegers() {
        XCTAssertEqual(DestinationTimes.value("x-load-ns", in: DestinationTimes.readyText(loadNS: 1234)), 1234)
        XCTAssertEqual(DestinationTimes.value("x-resume-ns", in: "{\"pages\":3,\"x-resume-ns\": 77}"), 77)
        XCTAssertNil(DestinationTimes.value("x-load-ns", in: ""), "an older destination's empty READY")
        XCTAssertNil(DestinationTimes.value("x-load-ns", in: "{\"x-load-ns\":-5}"))
        XCTAssertNil(DestinationTimes.value("x-load-ns", in: "{\"x-load-ns\":\"5\"}"))
        XCTAssertNil(DestinationTimes.value("x-load-ns", in: "{\"x-load-ns\":99999999999999999999999}"), "past 2^64-1: no value, not its first 19 digits")
    }
}
