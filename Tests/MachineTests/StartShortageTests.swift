import Machine
import SystemCalls
import XCTest

/// A start that cannot have all its threads (a vCPU, the interrupt reader) throws, stops the
/// threads it started, and leaves the VM as before: a later start runs it (a retried
/// migrate-incoming). Before the unwind, the failed start left the VM stopping for good and the
/// retry waited forever for vCPUs that had already exited.
extension MicroVMTests {
    func testAStartThatCannotHaveAllItsThreadsCanBeRetried() throws {
        for (software, refused) in [(true, "vcpu1"), (true, "irq")] + (KVMSystem.unavailableReason == nil ? [(false, "vcpu1")] : []) {
            let vm = try makeVM(software: software, vcpus: 2)
            defer { vm.stop() }
            OSThread.refuseForTesting = { $0 == refused }
            XCTAssertThrowsError(try vm.start()) { XCTAssertTrue("\($0)".contains("cannot start thread \(refused)"), "\($0)") }
            OSThread.refuseForTesting = nil
            try vm.start()
            assertRunsAndVerifies(vm, "after a start refused \(refused) ")
        }
    }
}
