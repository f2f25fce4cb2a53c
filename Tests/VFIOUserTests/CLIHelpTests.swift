import Foundation
import Glibc
import SystemCalls
import XCTest

/// Every command's `--help`, as a newcomer reads it in an 80-column terminal: the discussion's
/// paragraphs flow to the width (ArgumentParser keeps the source's line breaks, which once left
/// a short line after every long one), and nothing passes 80 columns.
final class CLIHelpTests: XCTestCase {
    static let commands = [[], ["demo"], ["vm", "run"], ["device", "serve"], ["device", "info"], ["device", "migrate"],
                           ["migrate"], ["update"], ["bench"], ["bench", "vfio-user"], ["bench", "device-state"], ["bench", "vm"],
                           ["bench", "migration"], ["bench", "update"], ["lab", "take-over"]]

    func help(_ command: [String]) throws -> String {
        let binary = ChildProcess.besideCurrentExecutable("vfio-live")
        guard FileManager.default.isExecutableFile(atPath: binary) else { throw XCTSkip("vfio-live is not built at \(binary)") }
        let p = Process()
        p.executableURL = URL(fileURLWithPath: binary)
        p.arguments = command + ["--help"]
        var env = ProcessInfo.processInfo.environment
        env["COLUMNS"] = "80"
        p.environment = env
        let pipe = Pipe()
        p.standardOutput = pipe; p.standardError = pipe
        try p.run()
        let data = pipe.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        XCTAssertEqual(p.terminationStatus, 0, "\(command)")
        return String(decoding: data, as: UTF8.self)
    }

    func testEveryDiscussionFlowsToTheWidthAndFitsIn80Columns() throws {
        for c in Self.commands {
            let text = try help(c)
            // The overview and the discussion: what comes before USAGE.
            let lines = text.split(separator: "\n", omittingEmptySubsequences: false).map(String.init).prefix { !$0.hasPrefix("USAGE:") }
            XCTAssertGreaterThan(lines.count, 1, "\(c): \(text)")
            for (a, b) in zip(lines, lines.dropFirst()) {
                XCTAssertLessThanOrEqual(a.count, 80, "\(c): a line passes 80 columns: \(a)")
                // Two lines of one paragraph: the first was broken near the width, not early
                // (ArgumentParser fills a line to 79 columns).
                guard !a.isEmpty, !b.isEmpty, a.first != " ", b.first != " ", !a.hasSuffix(":"), !b.hasPrefix("- ") else { continue }
                let nextWord = b.split(separator: " ").first.map(String.init) ?? ""
                XCTAssertGreaterThanOrEqual(a.count + 1 + nextWord.count, 80, "\(c): a paragraph line ends early:\n\(a)\n\(b)")
            }
        }
    }
}
