import Foundation
import Glibc
import SystemCalls
import XCTest

/// `vfio-live bench ... --json`: one JSON object per line per figure, for programs (issue 12
/// item 7), and QEMU 11.1's figures beside ours when scripts/qemu11.sh finds it (issue 14).
/// Runs the real binary; never asserts a speed.
final class BenchJSONTests: XCTestCase {
    static var binary: String { ChildProcess.besideCurrentExecutable("vfio-live") }

    /// Run `vfio-live ARGS`, bounded; stdout's lines.
    func run(_ args: [String], environment: [String: String] = [:], timeoutSeconds: Double = 300) throws -> (status: Int32, lines: [String]) {
        guard access(Self.binary, X_OK) == 0 else { throw XCTSkip("vfio-live is not built at \(Self.binary)") }
        let p = Process()
        p.executableURL = URL(fileURLWithPath: Self.binary)
        p.arguments = args
        p.environment = ProcessInfo.processInfo.environment.merging(environment) { $1 }
        let out = Pipe()
        p.standardOutput = out
        p.standardError = FileHandle.nullDevice
        try p.run()
        let killer = DispatchWorkItem { if p.isRunning { kill(p.processIdentifier, SIGKILL) } }
        DispatchQueue.global().asyncAfter(deadline: .now() + timeoutSeconds, execute: killer)
        let data = out.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        killer.cancel()
        return (p.terminationStatus, String(decoding: data, as: UTF8.self).split(separator: "\n").map(String.init))
    }

    func objects(_ lines: [String], file: StaticString = #filePath, line: UInt = #line) -> [[String: Any]] {
        lines.compactMap { l in
            guard let o = (try? JSONSerialization.jsonObject(with: Data(l.utf8))) as? [String: Any] else {
                XCTFail("not a JSON object: \(l)", file: file, line: line)
                return nil
            }
            return o
        }
    }

    /// Every line an object with bench, figure, value (a number, or null when skipped with a
    /// reason) and unit; reference, reference_value and ratio together; met a Bool beside target.
    func checkShape(_ objs: [[String: Any]], bench: String, file: StaticString = #filePath, line: UInt = #line) {
        XCTAssertFalse(objs.isEmpty, "no figures", file: file, line: line)
        for o in objs {
            XCTAssertEqual(o["bench"] as? String, bench, "\(o)", file: file, line: line)
            XCTAssertNotNil(o["figure"] as? String, "\(o)", file: file, line: line)
            if o["skipped"] != nil {
                XCTAssertTrue(o["value"] is NSNull, "a skipped figure has no value: \(o)", file: file, line: line)
                continue
            }
            XCTAssertNotNil(o["value"] as? Double, "\(o)", file: file, line: line)
            XCTAssertNotNil(o["unit"] as? String, "\(o)", file: file, line: line)
            let hasRef = o["reference"] != nil
            XCTAssertEqual(o["reference_value"] != nil, hasRef, "\(o)", file: file, line: line)
            XCTAssertEqual(o["ratio"] != nil, hasRef, "\(o)", file: file, line: line)
            if let v = o["value"] as? Double, let rv = o["reference_value"] as? Double, rv != 0, let r = o["ratio"] as? Double {
                XCTAssertEqual(r, v / rv, accuracy: abs(v / rv) * 1e-9, "ratio is value / reference_value: \(o)", file: file, line: line)
            }
            if o["met"] != nil {
                XCTAssertTrue(o["met"] is Bool, "\(o)", file: file, line: line)
                XCTAssertNotNil(o["target"] as? String, "met comes with its target: \(o)", file: file, line: line)
            }
        }
    }

    func testDeviceStateAndVFIOUserBenchesPrintOneJSONObjectPerFigure() throws {
        let ds = try run(["bench", "device-state", "--state-size", "1M", "--json"])
        XCTAssertEqual(ds.status, 0)
        let d = objects(ds.lines)
        checkShape(d, bench: "device-state")
        XCTAssertEqual(d.first?["figure"] as? String, "device-state transfer")
        XCTAssertEqual(d.first?["reference"] as? String, "raw AF_UNIX stream", "issue 12: device state is measured against the socket")
        let vu = try run(["bench", "vfio-user", "--iterations", "200", "--dma-size", "1M", "--json"])
        XCTAssertEqual(vu.status, 0)
        let v = objects(vu.lines)
        checkShape(v, bench: "vfio-user")
        XCTAssertEqual(v.count, 5, "p50, p99, DMA both ways, and the CPU time stolen: \(vu.lines)")
        for (name, o) in [("device-state", d), ("vfio-user", v)] {
            // Last: how much of the run the hypervisor took (the figures swing with it).
            XCTAssertEqual(o.last?["figure"] as? String, "CPU time stolen by the hypervisor during this bench", name)
            XCTAssertEqual(o.last?["unit"] as? String, "%", name)
            let pct = o.last?["value"] as? Double ?? -1
            XCTAssertTrue(pct >= 0 && pct <= 100, "\(name): \(pct)")
        }
    }

    /// Without QEMU 11.1 the peer's figures are there, skipped, with the reason; the rest still runs.
    func testUpdateBenchWithoutQEMUSaysWhy() throws {
        let r = try run(["bench", "update", "--sizes", "64M", "--repeat", "1", "--json"], environment: ["VFIO_LIVE_QEMU11": "/nonexistent/qemu11.sh"])
        XCTAssertEqual(r.status, 0, "\(r.lines)")
        let o = objects(r.lines)
        checkShape(o, bench: "update")
        let skipped = o.first { ($0["figure"] as? String)?.hasPrefix("QEMU 11.1") == true }
        XCTAssertNotNil(skipped?["skipped"] as? String, "the QEMU figures say why they are missing: \(r.lines)")
        XCTAssertNotNil(o.first { $0["figure"] as? String == "cpr-transfer blackout, 64.0 MiB" }?["value"] as? Double)
    }

    /// With QEMU 11.1: its cpr-transfer and cpr-exec blackouts, each from the old QEMU's stop
    /// to the new one's run in vm_state_notify traces, beside ours with the ratio.
    func testUpdateBenchPutsQEMUsBlackoutsBesideOurs() throws {
        let wrapper = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("scripts/qemu11.sh").path
        let check = Process()
        check.executableURL = URL(fileURLWithPath: "/bin/bash")
        check.arguments = [wrapper, "--check"]
        check.standardOutput = FileHandle.nullDevice
        try check.run(); check.waitUntilExit()
        guard check.terminationStatus == 0 else { throw XCTSkip("QEMU 11.1 is not installed (bash scripts/qemu11.sh --install)") }
        let r = try run(["bench", "update", "--sizes", "64M", "--repeat", "1", "--json"], environment: ["VFIO_LIVE_QEMU11": wrapper])
        XCTAssertEqual(r.status, 0, "\(r.lines)")
        let o = objects(r.lines)
        checkShape(o, bench: "update")
        for mode in ["cpr-transfer", "cpr-exec"] {
            let q = o.first { $0["figure"] as? String == "QEMU 11.1 \(mode) blackout, 64.0 MiB" }
            XCTAssertNil(q?["skipped"], "\(q ?? [:])")
            XCTAssertGreaterThan(q?["value"] as? Double ?? 0, 0, "\(mode): \(r.lines)")
            XCTAssertEqual(q?["reference"] as? String, "vfio-live \(mode) blackout")
        }
    }
}
