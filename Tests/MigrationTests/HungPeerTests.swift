import Devices
import Glibc
import Machine
@testable import Migration
import SystemCalls
import VFIO
import VFIOUser
import XCTest

/// A thread-safe flag for tests.
final class Flag: @unchecked Sendable {
    private let m = Mutex()
    private var v = false
    var value: Bool { m.withLock { v } }
    func set(_ x: Bool = true) { m.withLock { v = x } }
}

/// A "destination" that reads and discards the stream until told to stop reading; then it
/// behaves as a SIGSTOPped process does for the socket: the kernel buffers fill, nothing is
/// read, nothing is answered, the connection stays open.
final class StallingReader: @unchecked Sendable {
    let stall = Flag(), quit = Flag()
    private var thread: OSThread?
    private let m = Mutex()
    private var bytes: UInt64 = 0
    var bytesRead: UInt64 { m.withLock { bytes } }

    init(_ listener: TCPListener, stallAtOnce: Bool = false) throws {
        if stallAtOnce { stall.set() }
        thread = try OSThread(name: "stalling-reader") { [self] in
            guard let s = try? listener.accept(timeoutMilliseconds: 20_000) else { return }
            // A fixed receive buffer (no autotuning to 32 MiB): what a stalled peer buffers is small.
            var size: Int32 = 256 << 10
            _ = setsockopt(s.fd.rawValue, SOL_SOCKET, SO_RCVBUF, &size, socklen_t(MemoryLayout<Int32>.size))
            var buf = [UInt8](repeating: 0, count: 256 << 10)
            while !quit.value {
                if stall.value { usleep(10_000); continue }
                guard (try? Poll.waitReadable(s.fd, timeoutMilliseconds: 20)) == true else { continue }
                let n = buf.withUnsafeMutableBytes { recv(s.fd.rawValue, $0.baseAddress, $0.count, 0) }
                if n <= 0 { break }
                m.withLock { bytes += UInt64(n) }
            }
            s.fd.close()
        }
    }
    func close() { quit.set(); thread?.join(); thread = nil }
}

/// Issue 13 item 11 / deliver 3: a hung or stalled destination never freezes the source VM,
/// cancel works in every phase within a second, and every wait on the peer is bounded.
extension LiveMigrationTests {
    /// run() on its own thread; the returned closure waits for it (bounded) and gives the error
    /// and the time run() returned.
    func runAsync(_ m: MigrationSource) throws -> () -> (Error?, UInt64) {
        var result: Error?, endNS: UInt64 = 0, done = false
        let cond = Condition()
        let t = try OSThread(name: "source") {
            var err: Error?
            do { try m.run() } catch { err = error }
            let now = monotonicNanoseconds()
            cond.mutex.withLock { result = err; endNS = now; done = true; cond.broadcast() }
        }
        return {
            cond.mutex.withLock {
                let deadline = monotonicNanoseconds() + 30_000_000_000
                while !done && monotonicNanoseconds() < deadline { _ = cond.wait(timeoutSeconds: 0.1) }
            }
            XCTAssertTrue(cond.mutex.withLock { done }, "run() returned within 30 s")
            if cond.mutex.withLock({ done }) { t.join() }
            return cond.mutex.withLock { (result, endNS) }
        }
    }

    /// Wait until the source has sent nothing for `quietMS` in `status` (its send is blocked).
    func waitUntilBlocked(_ m: MigrationSource, in status: MigrationStats.Status, quietMS: UInt64 = 400,
                          file: StaticString = #filePath, line: UInt = #line) {
        let deadline = monotonicNanoseconds() + 20_000_000_000
        var last = m.stats.transferredBytes, since = monotonicNanoseconds()
        while monotonicNanoseconds() < deadline {
            usleep(20_000)
            let now = m.stats.transferredBytes
            if now != last || m.stats.status != status { last = now; since = monotonicNanoseconds(); continue }
            if monotonicNanoseconds() - since >= quietMS * 1_000_000 { return }
        }
        XCTFail("the source never blocked in \(status) (status \(m.stats.status), \(m.stats.transferredBytes) bytes)", file: file, line: line)
    }

    func cancelAndMeasure(_ m: MigrationSource, _ wait: () -> (Error?, UInt64), phase: String,
                          file: StaticString = #filePath, line: UInt = #line) -> Error? {
        let t0 = monotonicNanoseconds()
        XCTAssertTrue(m.cancel(), "cancel accepted", file: file, line: line)
        let (err, end) = wait()
        let ms = Double(end &- t0) / 1e6
        print("cancel during \(phase): run() returned \(String(format: "%.1f", ms)) ms after cancel()")
        // A hang detector, not a speed assertion: the engine must not wait on the peer.
        XCTAssertLessThan(ms, 3000, "cancel in \(phase) took effect", file: file, line: line)
        return err
    }

    func params(peerTimeoutMS: UInt64 = 60_000) -> MigrationParameters {
        var p = MigrationParameters()
        p.peerTimeoutMS = peerTimeoutMS
        return p
    }

    // MARK: cancel in every phase

    func testCancelWhileSendIsBlockedInPreCopyOnAListenerThatNeverReads() throws {
        try startSource()
        let reader = try StallingReader(listener, stallAtOnce: true)
        defer { reader.close() }
        let m = try connectSource(params())
        let wait = try runAsync(m)
        waitUntilBlocked(m, in: .active)
        let err = cancelAndMeasure(m, wait, phase: "pre-copy (send blocked)")
        XCTAssertTrue(m.stats.summary.contains("cancelled") && m.stats.summary.contains("runs on at the source"), m.stats.summary)
        XCTAssertTrue("\(err.map { "\($0)" } ?? "")".contains("cancelled"), "\(String(describing: err))")
        try assertSourceRunsOn(m, status: .cancelled, reasonContains: "cancelled")
    }

    func testCancelWhileSendIsBlockedInStopAndCopy() throws {
        try startSource()
        let reader = try StallingReader(listener)
        defer { reader.close() }
        var p = params()
        p.maxIterations = 1  // switch over after the first pass: the working set is dirty again
        let m = try connectSource(p)
        // The destination "hangs" (stops reading) the moment stop-and-copy begins.
        m.beforeSection = { _, _ in if m.stats.status == .device { reader.stall.set() } }
        let wait = try runAsync(m)
        waitUntilBlocked(m, in: .device)
        XCTAssertTrue(src.vm.isPaused, "blocked inside the downtime")
        let err = cancelAndMeasure(m, wait, phase: "stop-and-copy (send blocked)")
        XCTAssertTrue("\(err.map { "\($0)" } ?? "")".contains("cancelled"), "\(String(describing: err))")
        try assertSourceRunsOn(m, status: .cancelled, reasonContains: "cancelled")
    }

    func testCancelWhileDeviceStateGoesOut() throws {
        try startSource()
        let wait = try startDestination()
        let m = try connectSource(params())
        var cancelledAt: UInt64 = 0
        // Cancel from inside the stop-copy DEVICE send (device data read, section about to go).
        m.beforeSection = { t, _ in
            if t == .device && m.stats.status == .device && cancelledAt == 0 { cancelledAt = monotonicNanoseconds(); XCTAssertTrue(m.cancel()) }
        }
        XCTAssertThrowsError(try m.run()) { XCTAssertTrue("\($0)".contains("cancelled"), "\($0)") }
        XCTAssertGreaterThan(cancelledAt, 0)
        try assertSourceRunsOn(m, status: .cancelled, reasonContains: "cancelled")
        XCTAssertNotNil(wait(), "the destination fails")
        XCTAssertTrue(dst.vm.isPaused, "and does not run the guest")
    }

    func testCancelDuringSetupBeforeAnyRAM() throws {
        try startSource()
        let wait = try startDestination()
        let m = try connectSource(params())
        m.beforeSection = { t, _ in if t == .config { m.cancel() } }
        XCTAssertThrowsError(try m.run())
        try assertSourceRunsOn(m, status: .cancelled, reasonContains: "cancelled")
        XCTAssertNotNil(wait())
    }

    func testCancelWhileWaitingForTheDestinationsReadyNeverRunsTheGuestTwice() throws {
        try startSource()
        let loaded = Flag(), release = Flag()
        // The destination hangs after loading, before it says READY.
        let wait = try startDestination { d in
            d.peerTimeoutMS = 60_000
            d.afterDevicesLoaded = { loaded.set(); while !release.value { usleep(5_000) } }
        }
        let m = try connectSource(params())
        let run = try runAsync(m)
        while !loaded.value { usleep(5_000) }
        usleep(100_000)
        XCTAssertEqual(m.stats.status, .device)
        let err = cancelAndMeasure(m, run, phase: "the switch-over handshake")
        XCTAssertTrue("\(err.map { "\($0)" } ?? "")".contains("cancelled"), "\(String(describing: err))")
        release.set()
        let derr = wait()
        XCTAssertTrue("\(derr.map { "\($0)" } ?? "")".contains("GO"), "destination: \(String(describing: derr))")
        XCTAssertTrue(dst.vm.isPaused, "no GO, so the destination guest never runs")
        try assertSourceRunsOn(m, status: .cancelled, reasonContains: "cancelled")
    }

    func testCancelIsRefusedOnceMigrationCompleted() throws {
        try startSource()
        let wait = try startDestination()
        let m = try connectSource()
        try m.run()
        XCTAssertNil(wait())
        XCTAssertFalse(m.cancel(), "too late: the destination runs the guest")
        XCTAssertFalse(m.requestSwitchover())
        XCTAssertEqual(m.stats.status, .completed)
    }

    /// QEMU keeps a paused VM paused: cancel resumes only the migration's own pause, and each
    /// device goes back to the STOP it was in.
    func testCancelOfAPausedVMLeavesItPausedWithDevicesInStop() throws {
        try startSource()
        src.vm.pause()
        try src.client.setMigrationState(.stop)
        let reader = try StallingReader(listener, stallAtOnce: true)
        defer { reader.close() }
        let m = try connectSource(params())
        let wait = try runAsync(m)
        waitUntilBlocked(m, in: .active)
        _ = cancelAndMeasure(m, wait, phase: "pre-copy of a paused VM")
        XCTAssertEqual(m.stats.status, .cancelled)
        XCTAssertTrue(src.vm.isPaused, "still paused")
        XCTAssertEqual(try src.client.migrationState(), .stop)
        XCTAssertFalse(src.vm.dirtyLogging)
        let p = src.vm.pagesWritten
        usleep(200_000)
        XCTAssertEqual(src.vm.pagesWritten, p, "the guest does not run")
        try src.client.setMigrationState(.running)
        src.vm.resume()
        usleep(200_000)
        XCTAssertGreaterThan(src.vm.pagesWritten, p, "cont resumes it")
        XCTAssertTrue(src.vm.verify().ok)
    }

    // MARK: QMP stop = switch-over (QEMU's rule)

    func testStopDuringPreCopyStartsStopAndCopyNowAsInQEMU() throws {
        try startSource()
        var destRan: Bool?
        let wait = try startDestination { d in d.beforeResume = { destRan = d.sourceWasRunning } }
        var p = MigrationParameters()
        p.maxBandwidth = 20 << 20  // the first pass alone would take seconds
        let m = try connectSource(p)
        var requested = false
        m.beforeSection = { [self] t, id in
            if t == .ram && id > 6 && !requested {
                requested = true
                // What the VMM's `stop` does during a migration: its own pause, then the request.
                src.vm.pause()
                XCTAssertTrue(m.requestSwitchover())
            }
        }
        try m.run()
        XCTAssertNil(wait())
        XCTAssertEqual(m.stats.status, .completed)
        XCTAssertEqual(m.stats.iterations, 0, "no pre-copy pass was completed: the switch-over came at once")
        XCTAssertEqual(destRan, false, "the source was stopped, so the destination stays paused (QEMU)")
        XCTAssertTrue(dst.vm.isPaused)
        XCTAssertEqual(try dst.client.migrationState(), .stop)
        XCTAssertTrue(dst.vm.verify().ok, "every page arrived")
        // `cont` on the destination.
        try dst.client.setMigrationState(.running)
        dst.vm.resume()
        let at = dst.vm.pagesWritten
        usleep(300_000)
        XCTAssertGreaterThan(dst.vm.pagesWritten, at)
        XCTAssertTrue(dst.vm.verify().ok)
        src.vm.resume()  // the test's own pause
    }

    /// A stop, then a failure: the guest stays stopped (QEMU restarts only a VM that ran).
    func testStopThenFailureLeavesTheGuestStoppedWithDevicesInStop() throws {
        try startSource()
        let wait = try startDestination()
        let m = try connectSource()
        var requested = false
        m.beforeSection = { [self] t, _ in
            if t == .ram && !requested { requested = true; src.vm.pause(); m.requestSwitchover() }
            if t == .vcpus { throw MigrationError.channel("injected") }
        }
        XCTAssertThrowsError(try m.run())
        XCTAssertEqual(m.stats.status, .failed)
        XCTAssertTrue(m.stats.summary.contains("stays paused at the source"), m.stats.summary)
        XCTAssertTrue(src.vm.isPaused)
        XCTAssertEqual(try src.client.migrationState(), .stop)
        XCTAssertFalse(src.vm.dirtyLogging)
        _ = wait()
        try src.client.setMigrationState(.running)
        src.vm.resume()
        let at = src.vm.pagesWritten
        usleep(200_000)
        XCTAssertGreaterThan(src.vm.pagesWritten, at)
        XCTAssertTrue(src.vm.verify().ok)
    }

    // MARK: peer timeout

    func testDestinationThatNeverReadsTimesOutInPreCopy() throws {
        try startSource()
        let reader = try StallingReader(listener, stallAtOnce: true)
        defer { reader.close() }
        let m = try connectSource(params(peerTimeoutMS: 500))
        let t0 = monotonicNanoseconds()
        XCTAssertThrowsError(try m.run()) { XCTAssertTrue("\($0)".contains("destination stopped reading for 500 ms during pre-copy"), "\($0)") }
        XCTAssertLessThan(monotonicNanoseconds() - t0, 20_000_000_000)
        try assertSourceRunsOn(m, status: .failed, reasonContains: "stopped reading for 500 ms")
    }

    func testDestinationHangingInStopAndCopyTimesOutAndTheSourceResumes() throws {
        try startSource()
        let reader = try StallingReader(listener)
        defer { reader.close() }
        var p = params(peerTimeoutMS: 500)
        p.maxIterations = 1
        let m = try connectSource(p)
        m.beforeSection = { _, _ in if m.stats.status == .device { reader.stall.set() } }
        XCTAssertThrowsError(try m.run()) { XCTAssertTrue("\($0)".contains("destination stopped reading for 500 ms during stop-and-copy"), "\($0)") }
        try assertSourceRunsOn(m, status: .failed, reasonContains: "during stop-and-copy")
    }

    func testDestinationNotAnsweringAtSwitchOverTimesOut() throws {
        try startSource()
        let release = Flag()
        let wait = try startDestination { d in d.afterDevicesLoaded = { while !release.value { usleep(5_000) } } }
        let m = try connectSource(params(peerTimeoutMS: 500))
        XCTAssertThrowsError(try m.run()) { XCTAssertTrue("\($0)".contains("did not answer for 500 ms during the switch-over handshake"), "\($0)") }
        release.set()
        XCTAssertNotNil(wait())
        XCTAssertTrue(dst.vm.isPaused, "the destination never got GO")
        try assertSourceRunsOn(m, status: .failed, reasonContains: "switch-over handshake")
    }

    /// The destination side: a source that goes silent mid-stream is a clear failure within the
    /// bound, and the destination's device is reset out of RESUMING.
    func testSourceGoingSilentMidStreamFailsTheDestinationWithinTheBound() throws {
        try dst.vm.start()
        var destError: Error?
        let d = Flag()
        let t = try OSThread { [self] in
            do {
                guard let s = try listener.accept(timeoutMilliseconds: 20_000) else { return }
                let dest = try MigrationDestination(vm: dst.vm, from: s)
                dest.peerTimeoutMS = 400
                try dest.run()
            } catch { destError = error }
            d.set()
        }
        let s = try TCPSocket.connect(host: "127.0.0.1", port: listener.port)
        var e = MigrationStreamEncoder(flags: 0)
        e.section(.config, MigrationStream.configPayload(ramSize: dst.vm.memory.size, vcpus: dst.vm.vcpuCount, devices: 1))
        try s.send(e.bytes)
        try s.send(Array(MigrationStream.sectionHeader(.ram, id: 2, length: 4 + 16 + 4096)))  // then nothing
        let t0 = monotonicNanoseconds()
        t.join()
        XCTAssertLessThan(monotonicNanoseconds() - t0, 10_000_000_000)
        XCTAssertEqual(destError as? StreamError, .peerSilent(ms: 400), "\(String(describing: destError))")
        XCTAssertEqual(try dst.client.migrationState(), .running, "reset out of RESUMING")
        s.fd.close()
    }

    // MARK: a refused source does not disturb the destination (issue 13)

    func testRefusedSourceLeavesTheDestinationWaitingAndANextAttemptSucceeds() throws {
        try startSource()
        XCTAssertThrowsError(try MigrationSource.checkBlockers(vm: src.vm, parameters: MigrationParameters(), policies: [.off]))
        XCTAssertNoThrow(try MigrationSource.checkBlockers(vm: src.vm, parameters: MigrationParameters(), policies: [.auto]))
        var first: Error?, started = true
        let t = try OSThread { [self] in
            do {
                guard let s = try listener.accept(timeoutMilliseconds: 20_000) else { return }
                let d = try MigrationDestination(vm: dst.vm, from: s)
                defer { started = d.streamStarted }
                try d.run()
            } catch { first = error }
        }
        // A VMM that connected first and then found a blocker closes without a byte.
        let sock = try TCPSocket.connect(host: "127.0.0.1", port: listener.port)
        XCTAssertThrowsError(try MigrationSource(vm: src.vm, to: sock, parameters: MigrationParameters(), policies: [.off]))
        sock.fd.close()
        t.join()
        guard case .closedBeforeStream? = first as? MigrationError else { return XCTFail("\(String(describing: first))") }
        XCTAssertFalse(started)
        XCTAssertEqual(try dst.client.migrationState(), .running, "the destination's device untouched")
        // The destination waits again, and the next attempt migrates.
        let wait = try startDestination()
        try connectSource().run()
        XCTAssertNil(wait())
        XCTAssertTrue(dst.vm.verify().ok)
    }
}

/// Issue 13: "a paused source VM resumes on the destination; QEMU keeps it paused". The run
/// state travels in END (stream version 2) and the destination exposes it.
extension LiveMigrationTests {
    func testPausedSourceStaysPausedOnTheDestinationAsInQEMU() throws {
        try startSource()
        // What the VMM's `stop` does: pause the vCPUs, devices to STOP.
        src.vm.pause()
        try src.client.setMigrationState(.stop)
        var dest: MigrationDestination?
        let wait = try startDestination { d in dest = d }
        let m = try connectSource()
        try m.run()
        XCTAssertNil(wait())
        XCTAssertEqual(dest?.sourceWasRunning, false)
        XCTAssertEqual(dest?.resumed, false)
        XCTAssertTrue(dst.vm.isPaused)
        XCTAssertEqual(try dst.client.migrationState(), .stop, "devices wait in STOP for cont")
        let p = dst.vm.pagesWritten
        usleep(200_000)
        XCTAssertEqual(dst.vm.pagesWritten, p, "the guest does not run at the destination")
        XCTAssertTrue(dst.vm.verify().ok)
        // cont
        try dst.client.setMigrationState(.running)
        dst.vm.resume()
        usleep(300_000)
        XCTAssertGreaterThan(dst.vm.pagesWritten, p)
        XCTAssertTrue(dst.vm.verify().ok)
        src.vm.resume()
    }

    func testRunningSourceResumesOnTheDestinationAndAutostartOffKeepsItPaused() throws {
        try startSource()
        var dest: MigrationDestination?
        let wait = try startDestination { d in dest = d; d.autostart = false }
        try connectSource().run()
        XCTAssertNil(wait())
        XCTAssertEqual(dest?.sourceWasRunning, true, "the source ran at switch-over")
        XCTAssertEqual(dest?.resumed, false, "autostart off (QEMU's -S)")
        XCTAssertTrue(dst.vm.isPaused)
        XCTAssertEqual(try dst.client.migrationState(), .stop)
    }

    /// A version-1 END (8 bytes) still decodes, without a run state; unknown flags are refused.
    func testEndSectionRunStateDecoding() throws {
        final class Bytes: ByteSource {
            var b: [UInt8], at = 0
            init(_ b: [UInt8]) { self.b = b }
            func readExactly(_ buffer: UnsafeMutableRawBufferPointer) throws {
                guard at + buffer.count <= b.count else { throw Errno.ECONNRESET }
                b.withUnsafeBytes { buffer.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[at..<(at + buffer.count)])) }
                at += buffer.count
            }
        }
        func decode(_ end: [UInt8]) throws -> NullMigrationSink {
            var e = MigrationStreamEncoder(flags: 0)
            e.section(.config, MigrationStream.configPayload(ramSize: 1 << 20, vcpus: 1, devices: 0))
            e.section(.end, end)
            let s = NullMigrationSink(size: 1 << 20)
            try MigrationStreamDecoder(source: Bytes(e.bytes), sink: s).run()
            return s
        }
        var v1 = BEWriter(); v1.u64(0)
        let old = try decode(v1.bytes)
        XCTAssertTrue(old.ended); XCTAssertNil(old.running)
        XCTAssertEqual(try decode(MigrationStream.endPayload(pagesSent: 0, sourceRunning: false)).running, false)
        XCTAssertEqual(try decode(MigrationStream.endPayload(pagesSent: 0, sourceRunning: true)).running, true)
        var bad = BEWriter(); bad.u64(0); bad.u32(6); bad.u32(0)
        XCTAssertThrowsError(try decode(bad.bytes)) { XCTAssertTrue("\($0)".contains("run-state flags"), "\($0)") }
    }
}

/// Issue 13: "two migrations clone the VM". The engine claims the VM in the same locked step
/// as its check, so a second concurrent migration is refused before it touches anything.
extension LiveMigrationTests {
    func testASecondConcurrentMigrationOfTheSameVMIsRefused() throws {
        try startSource()
        let wait = try startDestination()
        let first = try connectSource()
        XCTAssertTrue(MigrationSource.inProgress(src.vm))
        XCTAssertThrowsError(try MigrationSource(vm: src.vm, to: UnixSocket.pair().0, parameters: MigrationParameters(), policies: [.auto])) {
            XCTAssertTrue("\($0)".contains("already in progress"), "\($0)")
        }
        // Many at once: exactly none gets through while the first holds the VM.
        let won = Flag()
        let threads = try (0..<4).map { _ in
            try OSThread { [self] in
                if let s = try? UnixSocket.pair().0,
                   (try? MigrationSource(vm: src.vm, to: s, parameters: MigrationParameters(), policies: [.auto])) != nil { won.set() }
            }
        }
        threads.forEach { $0.join() }
        XCTAssertFalse(won.value)
        try first.run()
        XCTAssertNil(wait())
        XCTAssertFalse(MigrationSource.inProgress(src.vm), "released when the migration ended")
        XCTAssertThrowsError(try first.run(), "a source runs once")
    }
}

extension LiveMigrationTests {
    /// The destination's wait for GO is bounded too: a source that goes silent after END
    /// fails the destination (which never runs the guest and says ERR), and the source, on
    /// reading that ERR instead of READY... takes the VM back.
    func testSourceSilentBeforeGOFailsTheDestinationAndTheSourceKeepsTheVM() throws {
        try startSource()
        let wait = try startDestination { d in d.peerTimeoutMS = 300 }
        let m = try connectSource(params())
        m.afterSectionForTesting = { t, _ in if t == .end { usleep(1_000_000) } }
        XCTAssertThrowsError(try m.run())
        let e = wait()
        XCTAssertTrue("\(e.map { "\($0)" } ?? "")".contains("did not say GO within 300 ms"), "destination: \(String(describing: e))")
        XCTAssertTrue(dst.vm.isPaused, "no GO: the guest does not run there")
        XCTAssertEqual(try dst.client.migrationState(), .running, "reset out of its loaded state")
        try assertSourceRunsOn(m, status: .failed, reasonContains: "GO")
    }

    /// After a failed incoming migration (here a corrupt section mid-stream) the same
    /// destination VM can take a new attempt: the next stream rewrites every page and state.
    func testDestinationTakesANewAttemptAfterAFailedOne() throws {
        try startSource()
        var wait = try startDestination()
        let bad = try connectSource(Self.checkedPayload)
        bad.beforeSection = { t, id in if t == .ram && id == 6 { bad.corruptNextSectionForTesting = true } }
        XCTAssertThrowsError(try bad.run())
        XCTAssertNotNil(wait())
        wait = try startDestination()
        let good = try connectSource()
        try good.run()
        XCTAssertNil(wait())
        usleep(200_000)
        let r = dst.vm.verify()
        XCTAssertTrue(r.ok, r.description)
    }
}

extension LiveMigrationTests {
    /// After GO the destination owns the VM: if it then goes silent, the source must not
    /// resume (two running copies); it stays paused and says so. Cancel is refused then.
    func testDestinationSilentAfterGOLeavesTheSourcePausedNeverTwoCopies() throws {
        try startSource()
        let inResume = Flag(), release = Flag()
        var source: MigrationSource?
        var cancelAfterGO: Bool?
        let wait = try startDestination { d in
            d.beforeResume = {
                cancelAfterGO = source?.cancel()
                inResume.set()
                while !release.value { usleep(5_000) }
            }
        }
        let m = try connectSource(params(peerTimeoutMS: 500))
        source = m
        XCTAssertThrowsError(try m.run()) { XCTAssertTrue("\($0)".contains("outcome unknown"), "\($0)") }
        XCTAssertTrue(inResume.value)
        XCTAssertEqual(cancelAfterGO, false, "too late to cancel once GO went out")
        XCTAssertEqual(m.stats.status, .failed)
        XCTAssertTrue(m.vmLeftPaused)
        XCTAssertTrue(m.stats.summary.contains("destination may run it"), m.stats.summary)
        XCTAssertTrue(src.vm.isPaused, "the source does not resume")
        let p = src.vm.pagesWritten
        release.set()
        XCTAssertNil(wait(), "the destination went on and runs the guest")
        usleep(200_000)
        XCTAssertEqual(src.vm.pagesWritten, p, "still exactly one running copy")
        XCTAssertGreaterThan(dst.vm.pagesWritten, p)
        XCTAssertTrue(dst.vm.verify().ok)
    }
}
