import Devices
import Glibc
@testable import LiveUpdate
import Machine
import Migration
import SystemCalls
import VFIO
import VFIOUser
import XCTest

/// cpr-transfer between two VMMs in this process, over a real UNIX socket pair with real
/// SCM_RIGHTS (the new VMM gets its own descriptor numbers for the same memfd, sockets and
/// eventfds), a real device server, and the guest running on KVM (or software vCPUs).
final class HandoverTests: XCTestCase {
    var server: InProcessServer!
    var client: VFIOUserClient!
    var vm: MicroVM!

    override func setUpWithError() throws {
        Log.level = .error
        server = try InProcessServer(path: InProcessServer.temporaryPath("cpr-dev"), stateSize: 1 << 20)
        client = try VFIOUserClient(path: server.path)
        var w = WorkloadConfig()
        w.workingSet = 8 << 20
        w.dirtyRate = 50_000
        w.dmaEvery = 2
        vm = try MicroVM(memorySize: 64 << 20, vcpus: 2, workload: w, devices: [client])
        try vm.start()
        vm.resume()
        usleep(100_000)
    }

    override func tearDown() {
        vm?.stop(); client?.close(); server?.stop()
        Log.level = .info
    }

    /// Run the new VMM's side on a thread; returns a function that waits for its result.
    func startTarget(_ sock: UnixSocket, fault: String? = nil) throws -> () -> (LiveUpdateTarget?, Error?) {
        var result: (LiveUpdateTarget?, Error?) = (nil, nil)
        var done = false
        let cond = Condition()
        _ = try OSThread(name: "new-vmm") {
            var r: (LiveUpdateTarget?, Error?) = (nil, nil)
            do {
                let t = try LiveUpdateTarget.accept(on: sock)
                t.beforeStep = { step in if step == fault { throw CPRError.successor("injected failure at \(step)") } }
                r.0 = t
                try t.complete(over: sock)
            } catch { r.1 = error }
            cond.mutex.withLock { result = r; done = true; cond.broadcast() }
        }
        return { cond.mutex.withLock { while !done { cond.wait() }; return result } }
    }

    func waitFor(_ what: String, seconds: Double = 10, _ cond: () -> Bool) {
        let deadline = monotonicNanoseconds() + UInt64(seconds * 1e9)
        while !cond() && monotonicNanoseconds() < deadline { usleep(2_000) }
        XCTAssertTrue(cond(), what)
    }

    /// The new VMM runs the guest: same memfd, same device connection (no VERSION, DMA_MAP,
    /// SET_IRQS or RESET reach the server), interrupts still counted, integrity verified.
    func testTransferKeepsTheDeviceAndTheGuestRunning() throws {
        let (old, new) = try UnixSocket.pair()
        let wait = try startTarget(new)
        let before = (server.server.versionsNegotiated, server.server.dmaMapsReceived, server.server.setIRQsReceived,
                      server.server.resetsReceived, server.server.connectionsServed)
        let src = LiveUpdateSource(vm: vm)
        let report = try src.transfer(over: old)
        let (target, error) = wait()
        XCTAssertNil(error)
        guard let t = target else { return XCTFail("no target") }
        defer { t.vm.stop() }
        XCTAssertTrue(client.isHandedOver, "the old VMM let go of the connection")
        XCTAssertGreaterThan(report.blackoutNS, 0)
        XCTAssertEqual(report.handedOver, ["ram/0", "dev0/0", "dev0_twin/0", "dev0_interrupt/0"])
        XCTAssertEqual(report.streamBytes, t.report.streamBytes)
        XCTAssertEqual(t.vm.memory.fd.rawValue == vm.memory.fd.rawValue, false, "a descriptor of its own")
        let w0 = t.vm.pagesWritten, d0 = t.vm.dmaRoundsOK, irq0 = t.vm.interruptsCounted[0]
        XCTAssertGreaterThanOrEqual(irq0, vm.interruptsCounted[0], "the count continues")
        waitFor("the guest writes pages in the new VMM") { t.vm.pagesWritten > w0 + 1000 }
        waitFor("the guest's DMA round trips go on in the new VMM") { t.vm.dmaRoundsOK > d0 + 2 }
        waitFor("MSIs are counted in the new VMM") { t.vm.interruptsCounted[0] > irq0 }
        let after = (server.server.versionsNegotiated, server.server.dmaMapsReceived, server.server.setIRQsReceived,
                     server.server.resetsReceived, server.server.connectionsServed)
        XCTAssertTrue(before == after, "no renegotiation, re-map, IRQ setup, reset or reconnect: \(before) → \(after)")
        let r = t.vm.verify()
        XCTAssertTrue(r.ok, "\(r)")
        XCTAssertTrue(t.vm.devices[0].client.twinSocketActive)
        XCTAssertNoThrow(try t.vm.devices[0].client.deviceInfo(), "the new VMM drives the same connection")
        XCTAssertThrowsError(try client.deviceInfo(), "the old VMM refuses to")
    }

    /// A DMA job in flight when the update starts completes into guest RAM during the handoff,
    /// and the guest sees its completion in the new VMM.
    func testDMAInFlightCompletesAcrossTheHandoff() throws {
        try client.write64(0, DMAEngine.Reg.dmaStepDelay, 60_000)  // 60 ms before each step
        let (old, new) = try UnixSocket.pair()
        let wait = try startTarget(new)
        let src = LiveUpdateSource(vm: vm)
        var inFlightAtPause = false, completedAtPause: UInt64 = 0, roundsAtPause: UInt64 = 0
        src.beforeStep = { [self] step in
            if step == "pause" {
                // Start the blackout while a job is in flight.
                let deadline = monotonicNanoseconds() + 5_000_000_000
                while !server.device.dmaJobInFlight && monotonicNanoseconds() < deadline { usleep(500) }
            }
            if step == "send-stream" {
                inFlightAtPause = server.device.dmaJobInFlight
                completedAtPause = server.device.dmaJobsCompleted
                roundsAtPause = vm.dmaRoundsOK
            }
        }
        _ = try src.transfer(over: old)
        let (target, error) = wait()
        XCTAssertNil(error)
        guard let t = target else { return XCTFail("no target") }
        defer { t.vm.stop() }
        XCTAssertTrue(inFlightAtPause, "a DMA job was in flight when the vCPUs stopped")
        waitFor("the in-flight job completed") { server.device.dmaJobsCompleted > completedAtPause }
        waitFor("the guest saw it complete and went on", seconds: 20) { t.vm.dmaRoundsOK > roundsAtPause + 1 }
        let r = t.vm.verify()
        XCTAssertTrue(r.ok, "\(r)")
        XCTAssertEqual(r.dmaErrors, 0)
    }

    /// The old VMM takes the VM back when the update fails at any step before the commit:
    /// its own faults, or the new VMM's failure or death.
    func testRollbackAtEveryStep() throws {
        let steps: [(String, String?, String?)] = [
            ("old VMM fails after sending the state", "pause", nil),
            ("old VMM fails with the vCPUs paused", "send-stream", nil),
            ("old VMM fails before the commit", "commit", nil),
            ("new VMM fails before READY", nil, "ready"),
            ("new VMM fails loading the stream", nil, "load"),
            ("new VMM fails before the commit", nil, "commit"),
        ]
        for (what, oldFault, newFault) in steps {
            let (old, new) = try UnixSocket.pair()
            let wait = try startTarget(new, fault: newFault)
            let src = LiveUpdateSource(vm: vm)
            src.beforeStep = { step in if step == oldFault { throw CPRError.channel("injected failure at \(step)") } }
            XCTAssertThrowsError(try src.transfer(over: old), what)
            let (target, _) = wait()
            target?.vm.stop()
            XCTAssertFalse(client.isHandedOver, "\(what): the old VMM has the connection back")
            XCTAssertNoThrow(try client.deviceInfo(), "\(what): and uses it")
            XCTAssertEqual(try client.migrationState(), .running, "\(what): the device was never stopped")
            let w0 = vm.pagesWritten, d0 = vm.dmaRoundsOK, i0 = vm.interruptsCounted[0]
            waitFor("\(what): the guest runs on in the old VMM") { vm.pagesWritten > w0 + 500 && vm.dmaRoundsOK > d0 && vm.interruptsCounted[0] > i0 }
            let r = vm.verify()
            XCTAssertTrue(r.ok, "\(what): \(r)")
            old.close(); new.close()
        }
        XCTAssertEqual(server.server.connectionsServed, 1, "one connection all along")
    }

    /// The new VMM waits for GO only so long; when it gives up (ERROR) just as the old VMM
    /// sends GO, the old one reads ERROR instead of DONE and takes the VM back: the new one
    /// never ran the guest, so nothing is lost and nothing runs twice.
    func testASuccessorThatGaveUpWaitingForGOGivesTheVMBack() throws {
        let (old, new) = try UnixSocket.pair()
        var result: Error?
        var target: LiveUpdateTarget?
        let done = Condition()
        var finished = false
        _ = try OSThread(name: "new-vmm") {
            do {
                let t = try LiveUpdateTarget.accept(on: new)
                t.goTimeoutMilliseconds = 200
                target = t
                try t.complete(over: new)
            } catch { result = error }
            done.mutex.withLock { finished = true; done.broadcast() }
        }
        let src = LiveUpdateSource(vm: vm)
        src.beforeStep = { step in if step == "commit" { usleep(600_000) } }  // GO comes late
        XCTAssertThrowsError(try src.transfer(over: old)) { e in
            XCTAssertTrue("\(e)".contains("gave the VM back after the commit"), "\(e)")
        }
        done.mutex.withLock { while !finished { done.wait() } }
        XCTAssertTrue("\(String(describing: result))".contains("no answer within 200 ms"), "\(String(describing: result))")
        target?.vm.stop()
        XCTAssertFalse(client.isHandedOver, "the old VMM has the connection back")
        XCTAssertEqual(try client.migrationState(), .running)
        let w0 = vm.pagesWritten
        waitFor("the guest runs on in the old VMM") { vm.pagesWritten > w0 + 500 }
        XCTAssertTrue(vm.verify().ok)
        old.close(); new.close()
    }

    /// A device that opts out blocks the update before anything is touched.
    func testBlockersAreCheckedFirst() throws {
        let (old, new) = try UnixSocket.pair()
        let src = LiveUpdateSource(vm: vm)
        src.optOut = [0: "cpr=off"]
        XCTAssertThrowsError(try src.transfer(over: old)) { e in
            XCTAssertTrue("\(e)".contains("device 0 opts out of live update"), "\(e)")
        }
        var one: [UInt8] = [0]
        old.shutdown(write: true, read: false)
        XCTAssertThrowsError(try one.withUnsafeMutableBytes { try new.receiveExactly(into: $0, maxFDs: 0) }, "nothing was sent")
        XCTAssertFalse(client.isHandedOver)
        XCTAssertTrue(vm.verify().ok)
    }
}
