import Devices
import Glibc
@testable import LiveUpdate
import Machine
import SystemCalls
import VFIOUser
import XCTest

/// A successor that cannot have a thread (its device connection's twin reader, a vCPU) fails
/// the update before the commit, and the old VMM keeps the VM and its device connection: the
/// successor's failed adoption closes only its own descriptors, never shuts the shared sockets
/// down (before, a failed adoption's deinit did, and the server dropped the old VMM's mappings).
extension HandoverTests {
    private func assertTheOldVMMKeepsTheVM(_ wait: () -> (LiveUpdateTarget?, Error?), _ refused: String,
                                           file: StaticString = #filePath, line: UInt = #line) {
        let (target, error) = wait()
        XCTAssertNil(target, "the successor never had the VM", file: file, line: line)
        XCTAssertTrue("\(error.map { "\($0)" } ?? "no error")".contains("cannot start thread \(refused)"), "\(String(describing: error))", file: file, line: line)
        XCTAssertFalse(client.isHandedOver, "the old VMM took the connection back", file: file, line: line)
        XCTAssertNoThrow(try client.deviceInfo(), "the connection works: it was not shut down", file: file, line: line)
        let w0 = vm.pagesWritten, d0 = vm.dmaRoundsOK
        waitFor("the guest writes pages in the old VMM") { vm.pagesWritten > w0 + 1000 }
        waitFor("and its DMA goes on (the server kept the mappings)") { vm.dmaRoundsOK > d0 + 2 }
        let r = vm.verify()
        XCTAssertTrue(r.ok, "\(r)", file: file, line: line)
    }

    func testASuccessorWithoutATwinReaderThreadGivesTheVMBack() throws {
        try refusedSuccessor("vfu-twin")
    }

    func testASuccessorWithoutVCPUThreadsGivesTheVMBack() throws {
        try refusedSuccessor("vcpu1")
    }

    private func refusedSuccessor(_ name: String) throws {
        let (old, new) = try UnixSocket.pair()
        // Only the successor's threads: its own `new-vmm` thread starts first.
        OSThread.refuseForTesting = { $0 == name }
        defer { OSThread.refuseForTesting = nil }
        let wait = try startTarget(new)
        let src = LiveUpdateSource(vm: vm)
        XCTAssertThrowsError(try src.transfer(over: old))
        OSThread.refuseForTesting = nil
        assertTheOldVMMKeepsTheVM(wait, name)
    }
}
