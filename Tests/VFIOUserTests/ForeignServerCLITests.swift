import Foundation
import Glibc
import SystemCalls
import XCTest

/// `vfio-live vm run --device vfio-user,socket=PATH` with a server the project did not write
/// (Tests/Fixtures/foreign_vfio_user_server.py): today's failure was `server refused
/// DEVICE_SET_IRQS: EINVAL`, as the VMM assumed the dma-engine's MSI on index 1.
final class ForeignServerCLITests: XCTestCase {
    func testVMRunAttachesAForeignServer() throws {
        let binary = ChildProcess.besideCurrentExecutable("vfio-live")
        guard FileManager.default.isExecutableFile(atPath: binary) else { throw XCTSkip("vfio-live is not built at \(binary)") }
        let tests = ((#filePath as NSString).deletingLastPathComponent as NSString).deletingLastPathComponent
        let script = (tests as NSString).appendingPathComponent("Fixtures/foreign_vfio_user_server.py")
        let path = "/tmp/vfio-live-foreign-cli-\(getpid()).sock"
        unlink(path)
        let server = try ChildProcess.spawn("/usr/bin/env", ["env", "python3", script, path, "--irq", "msix"])
        defer { kill(server, SIGTERM); _ = ChildProcess.wait(server); unlink(path) }
        let deadline = monotonicNanoseconds() + 10_000_000_000
        while access(path, F_OK) != 0 {
            if ChildProcess.exitStatus(server) != nil { throw XCTSkip("the foreign server exited: is python3 installed?") }
            guard monotonicNanoseconds() < deadline else { return XCTFail("the foreign server did not come up") }
            usleep(10_000)
        }
        let p = Process()
        p.executableURL = URL(fileURLWithPath: binary)
        p.arguments = ["vm", "run", "--memory", "32M", "--device", "vfio-user,socket=\(path)", "--workload", "working-set=4M",
                       "--duration", "1"]
        let pipe = Pipe()
        p.standardOutput = pipe
        p.standardError = pipe
        try p.run()
        let out = String(decoding: pipe.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        p.waitUntilExit()
        XCTAssertEqual(p.terminationStatus, 0, out)
        XCTAssertTrue(out.contains("interrupt MSI-X"), out)
        XCTAssertTrue(out.contains("PCI 1b36:5"), out)
        XCTAssertFalse(out.contains("INTEGRITY VIOLATION"), out)
    }
}
