import Foundation
import Glibc
import SystemCalls
import XCTest

/// `bench migration`'s scale table (issue 12 item 6) as a program reads it: runs the real
/// binary at small sizes; never asserts a speed.
final class BenchScaleTests: XCTestCase {
    static var binary: String { ChildProcess.besideCurrentExecutable("vfio-live") }

    func jsonLines(_ args: [String], timeoutSeconds: Double = 300) throws -> (status: Int32, objects: [[String: Any]], raw: [String]) {
        guard access(Self.binary, X_OK) == 0 else { throw XCTSkip("vfio-live is not built at \(Self.binary)") }
        let p = Process()
        p.executableURL = URL(fileURLWithPath: Self.binary)
        p.arguments = args
        let out = Pipe()
        p.standardOutput = out
        p.standardError = FileHandle.nullDevice
        try p.run()
        let killer = DispatchWorkItem { if p.isRunning { kill(p.processIdentifier, SIGKILL) } }
        DispatchQueue.global().asyncAfter(deadline: .now() + timeoutSeconds, execute: killer)
        let data = out.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        killer.cancel()
        let lines = String(decoding: data, as: UTF8.self).split(separator: "\n").map(String.init)
        let objs = lines.compactMap { (try? JSONSerialization.jsonObject(with: Data($0.utf8))) as? [String: Any] }
        XCTAssertEqual(objs.count, lines.count, "every line is a JSON object: \(lines)")
        return (p.terminationStatus, objs, lines)
    }

    /// Each size gives throughput (end to end and bulk pass, the latter against the first
    /// size) and both VMMs' memory beyond guest RAM; a size the machine cannot hold (16 GiB:
    /// two VMs need 33 GiB) is a skipped figure with the reason, and the rest still runs.
    func testScaleFiguresPerSizeAndASizeTooLargeIsSkippedWithTheReason() throws {
        // 16 GiB is the largest guest RAM; a machine that could hold two gets no skip to check.
        let meminfo = (try? String(contentsOfFile: "/proc/meminfo", encoding: .utf8)) ?? ""
        let availKB = meminfo.split(separator: "\n").first { $0.hasPrefix("MemAvailable:") }.flatMap { $0.split(separator: " ").dropFirst().first.flatMap { UInt64($0) } } ?? 0
        let tooLarge = availKB * 1024 < 33 << 30
        let r = try jsonLines(["bench", "migration", "--memory", "128M", "--no-qemu", "--sizes", tooLarge ? "128M,256M,16G" : "128M,256M", "--json"])
        XCTAssertEqual(r.status, 0, "\(r.raw)")
        func figure(_ name: String) -> [String: Any]? { r.objects.first { $0["figure"] as? String == name } }
        // The one-stream figure beside both references: cache-hot buffers and RAM-sized ones.
        let hot = try XCTUnwrap(figure("RAM transfer (idle VM, full RAM)")?["reference_value"] as? Double, "\(r.raw)")
        let cold = try XCTUnwrap(figure("RAM transfer vs RAM-sized raw TCP")?["reference_value"] as? Double, "\(r.raw)")
        XCTAssertGreaterThan(hot, 0)
        XCTAssertGreaterThan(cold, 0)
        // Multifd likewise, beside two streams of each kind.
        let hot2 = try XCTUnwrap(figure("RAM transfer, multifd 2 channels")?["reference_value"] as? Double, "\(r.raw)")
        let cold2 = try XCTUnwrap(figure("RAM transfer, multifd 2 channels, vs RAM-sized raw TCP")?["reference_value"] as? Double, "\(r.raw)")
        XCTAssertGreaterThan(hot2, 0)
        XCTAssertGreaterThan(cold2, 0)
        for at in ["128.0 MiB", "256.0 MiB"] {
            XCTAssertNotNil(figure("RAM transfer to a VMM process, end to end, \(at)")?["value"] as? Double, "\(r.raw)")
            let bulk = try XCTUnwrap(figure("RAM transfer to a VMM process, bulk pass, \(at)"), "\(r.raw)")
            XCTAssertEqual(bulk["reference"] as? String, "the same at the first size measured")
            XCTAssertTrue(bulk["met"] is Bool)
            for side in ["source", "destination"] {
                let peak = try XCTUnwrap(figure("\(side) RSS beyond guest RAM, peak, \(at)")?["value"] as? Double, "\(r.raw)")
                // A VMM holds more than nothing and (beyond guest RAM) far less than its RAM.
                XCTAssertGreaterThan(peak, Double(1 << 20))
                XCTAssertLessThan(peak, Double(128 << 20), "\(side) at \(at)")
                let g = try XCTUnwrap(figure("\(side) RSS beyond guest RAM, growth during the migration, \(at)"))
                XCTAssertEqual(g["reference"] as? String, "dirty bitmap (1 bit per 4 KiB page)")
                XCTAssertEqual(g["reference_value"] as? Double, Double((at.hasPrefix("128") ? 128 : 256) << 20) / 4096 / 8)
                XCTAssertNotNil(figure("\(side) RSS beyond guest RAM, growth after 10% of RAM sent, \(at)")?["met"] as? Bool)
            }
        }
        guard tooLarge else { return }
        let big = try XCTUnwrap(figure("scale at 16.0 GiB"), "\(r.raw)")
        XCTAssertTrue(big["value"] is NSNull)
        XCTAssertTrue((big["skipped"] as? String)?.contains("MemAvailable") == true, "\(big)")
    }
}
