import Foundation
import Glibc
import SystemCalls
import VFIOUser
import XCTest

/// The same QMP input, byte for byte, to QEMU 11.1 (`-machine none`) and to `vfio-live vm run
/// --qmp` (real processes, real sockets): error classes and descriptions must be QEMU's. QEMU is
/// the reference for every case; the few deliberate differences are listed in `deliberate` with
/// what vfio-live answers instead, and checked as such.
final class QMPConformanceTests: XCTestCase {
    static var binary: String { ChildProcess.besideCurrentExecutable("vfio-live") }
    static var repo: String { URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent().path }
    static let defaultRoot = "/var/lib/vfio-live/qemu-11.1"

    var processes: [Process] = []
    var tag = ""

    override func setUp() { tag = "\(getpid())-\(UInt32.random(in: 0...UInt32.max))" }

    override func tearDown() {
        for p in processes where p.isRunning { p.terminate(); p.waitUntilExit() }
    }

    /// QEMU 11.1's command line: scripts/qemu11.sh if this tree has it, else the install root.
    static func qemu() throws -> (String, [String]) {
        let script = repo + "/scripts/qemu11.sh"
        if FileManager.default.isExecutableFile(atPath: script) || FileManager.default.fileExists(atPath: script) {
            let p = Process()
            p.executableURL = URL(fileURLWithPath: "/bin/bash")
            p.arguments = [script, "--check"]
            let pipe = Pipe()
            p.standardOutput = pipe; p.standardError = pipe
            try p.run(); p.waitUntilExit()
            guard p.terminationStatus == 0 else {
                let why = String(decoding: pipe.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
                throw XCTSkip("QEMU 11.1 is not available: \(why.trimmingCharacters(in: .whitespacesAndNewlines))")
            }
            return ("/bin/bash", [script])
        }
        let r = ProcessInfo.processInfo.environment["VFIO_LIVE_QEMU11_ROOT"] ?? defaultRoot
        guard FileManager.default.isExecutableFile(atPath: r + "/usr/bin/qemu-system-x86_64") else {
            throw XCTSkip("QEMU 11.1 is not installed at \(r) (and this tree has no scripts/qemu11.sh to install it)")
        }
        return (r + "/lib64/ld-linux-x86-64.so.2", ["--library-path", "\(r)/lib/x86_64-linux-gnu:\(r)/usr/lib/x86_64-linux-gnu",
                                                   r + "/usr/bin/qemu-system-x86_64", "-L", r + "/usr/share/qemu", "-L", r + "/usr/share/seabios"])
    }

    func start(_ exe: String, _ args: [String], log: String) throws {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: exe)
        p.arguments = args
        _ = FileManager.default.createFile(atPath: log, contents: nil)
        let h = FileHandle(forWritingAtPath: log)!
        p.standardOutput = h; p.standardError = h
        try p.run()
        processes.append(p)
    }

    static func waitForSocket(_ path: String) {
        let deadline = monotonicNanoseconds() + 20_000_000_000
        while monotonicNanoseconds() < deadline {
            if let s = try? UnixSocket.connect(path: path) { s.close(); return }
            usleep(20_000)
        }
    }

    /// A raw QMP connection: bytes in, the replies that come back (events left out).
    final class Raw {
        let s: UnixSocket
        var buf: [UInt8] = []
        init(_ path: String) throws { s = try UnixSocket.connect(path: path) }
        deinit { s.close() }
        func send(_ b: [UInt8]) throws { try s.send(b) }
        /// Messages until the peer has been quiet for `quietMS` after the first one, or
        /// `firstMS` passed with none.
        func collect(firstMS: Int32 = 400, quietMS: Int32 = 120) -> [String] {
            var out: [String] = []
            var wait = firstMS
            while true {
                guard let r = try? Poll.waitAnyReadable([s.fd.rawValue], timeoutMilliseconds: wait), r == 0 else { break }
                var chunk = [UInt8](repeating: 0, count: 1 << 16)
                let n = (try? chunk.withUnsafeMutableBytes { try s.fd.read(into: $0) }) ?? 0
                if n <= 0 { out.append("<closed>"); break }
                buf += chunk[0..<n]
                while let nl = buf.firstIndex(of: 10) {
                    let line = Array(buf[..<nl]); buf.removeFirst(nl + 1)
                    if let m = Raw.normalize(line) { out.append(m) }
                }
                wait = quietMS
            }
            return out
        }
        static func normalize(_ line: [UInt8]) -> String? {
            guard let m = try? JSONValue.parse(line[...], maxDepth: 64) else { return "unparsable: \(String(decoding: line, as: UTF8.self))" }
            if m["event"] != nil || m["QMP"] != nil { return nil }
            let id = m["id"].map { " id=\($0)" } ?? ""
            if m["return"] != nil { return "return\(id)" }
            guard case let .string(c)? = m["error"]?["class"], case let .string(d)? = m["error"]?["desc"] else { return "odd: \(m)" }
            return "\(c): \(d)\(id)"
        }
    }

    struct Case {
        var name: String
        var negotiate = true
        /// How long to wait for QEMU's first answer (it lexes a few MB in seconds).
        var firstMS: Int32 = 400
        var inputs: [String]
    }

    static let cases: [Case] = {
        let qs = #"{"execute":"query-status"}"#
        func msp(_ a: String) -> String { #"{"execute":"migrate-set-parameters","arguments":\#(a),"id":1}"# + "\n" }
        func msc(_ a: String) -> String { #"{"execute":"migrate-set-capabilities","arguments":\#(a),"id":"c"}"# + "\n" }
        return [
            Case(name: "before qmp_capabilities", negotiate: false, inputs: [
                #"{"execute":"query-status","id":1}"# + "\n", #"{"execute":"stop","arguments":{"x":1}}"# + "\n", "hello\n", "[1]\n",
                #"{"foo":1}"# + "\n", #"{"execute":1}"# + "\n", #"{"execute":"qmp_capabilities","arguments":{"enable":["x"]}}"# + "\n",
                #"{"execute":"qmp_capabilities","arguments":{"enable":"oob"}}"# + "\n", #"{"execute":"qmp_capabilities","arguments":{"x":1}}"# + "\n",
                #"{"execute":"qmp_capabilities","id":9,"arguments":{"enable":[]}}"# + "\n", #"{"execute":"qmp_capabilities"}"# + "\n",
                #"{"execute":"qmp_capabilities","arguments":{"x":1}}"# + "\n",
            ]),
            Case(name: "enabling out-of-band execution", negotiate: false, inputs: [
                #"{"execute":"qmp_capabilities","arguments":{"enable":["oob"]}}"# + "\n",
            ]),
            Case(name: "not JSON, and JSON that is not an object", inputs: [
                "}\n", "]\n", "123\n", "\"str\"\n", "null\n", "hello\n", "{\"a\":1,}\n", "{\"a\" 1}\n", "{1:2}\n", "{\"a\":1 \"b\"}\n", "[1 2]\n",
                "{\"a\":1,\"a\":2}\n", "{\"a\":1\"b\"}\n", "{\"a\":true\"b\"}\n", "{\"a\":[1,2}\n", "[[[]\n", "]]\n", "\u{1}\(qs)\n",
                "{\"execute\":\"query-status\",\"id\":01}\n", "{\"execute\":\"query-status\",\"id\":tru}\n", "{\"execute\":\"a\\qb\"}\n",
                "{\"execute\":\"query-status\",\"id\":\"\\ud800\"}\n", "\(qs) hello\n", "{\"a\":1} }\(qs)\n", "{\"a\":1] \"x\"}\n",
                "{\"a\" 1, \"b\": \(qs)}\n", "{\"a\" 1 -s }\n", "{\"a\":-s} \(qs)\n", "'x'\n", "\t\t{'execute':'query-status','id':'\\'q\\''}\r\n",
            ]),
            Case(name: "unterminated string: the next line is read afresh", inputs: [
                "{\"execute\":\"query-status", "\n", qs + "\n",
                "{\"execute\":\"x", qs + "\n", "\"}\n", "\n", qs + "\n", "\"abc\n", "}\n", qs + "\n",
            ]),
            Case(name: "envelope", inputs: [
                "{}\n", "{\"execute\":1,\"id\":5}\n", "{\"id\":5}\n", "{\"execute\":\"x\",\"foo\":1,\"id\":5}\n", "{\"exec-oob\":\"query-status\",\"id\":6}\n",
                "{\"execute\":\"stop\",\"control\":1}\n", "{\"foo\":1,\"execute\":1}\n", "{\"arguments\":1,\"execute\":\"stop\"}\n",
                "{\"execute\":\"query-status\",\"arguments\":[]}\n", "{\"execute\":\"cont\",\"arguments\":null}\n",
                "{\"execute\":\"query-status\",\"id\":[1,{\"a\":null}]}\n", "{\"execute\":\"query-status\",\"id\":18446744073709551615}\n",
                "{\"execute\":\"query-status\",\"id\":-9223372036854775808}\n", "{\"execute\":\"query-status\",\"id\":1.5e3}\n",
            ]),
            Case(name: "unknown commands", inputs: [
                "{\"execute\":\"nope\",\"id\":7}\n", "{\"execute\":\"nope\",\"arguments\":{\"a\":1}}\n", "{\"execute\":\"migrate-cancel\"}\n",
                "{\"execute\":\"qu\\u00e9ry\"}\n",
            ]),
            Case(name: "arguments: unknown, wrong type, out of range", inputs: [
                "{\"execute\":\"stop\",\"arguments\":{\"x\":1},\"id\":2}\n", "{\"execute\":\"query-status\",\"arguments\":{\"a\":1,\"b\":2,\"c\":3,\"zz\":1}}\n",
                "{\"execute\":\"query-status\",\"arguments\":{\"x\":{\"y\":1}}}\n", "{\"execute\":\"quit\",\"arguments\":{\"a\":1}}\n",
                "{\"execute\":\"migrate_cancel\",\"arguments\":{\"a\":1}}\n",
                msp(#"{"downtime-limit":-1}"#), msp(#"{"downtime-limit":"5"}"#), msp(#"{"downtime-limit":1.5}"#), msp(#"{"downtime-limit":1.0}"#),
                msp(#"{"downtime-limit":2000001}"#), msp(#"{"downtime-limit":18446744073709551616}"#), msp(#"{"downtime-limit":2000000}"#),
                msp(#"{"max-bandwidth":true}"#), msp(#"{"max-bandwidth":"1M"}"#), msp(#"{"max-bandwidth":1000000}"#),
                msp(#"{"cpu-throttle-initial":0}"#), msp(#"{"cpu-throttle-initial":256}"#), msp(#"{"cpu-throttle-initial":100}"#),
                msp(#"{"cpu-throttle-initial":"1"}"#), msp(#"{"cpu-throttle-increment":100}"#), msp(#"{"cpu-throttle-increment":-1}"#),
                msp(#"{"mode":"foo"}"#), msp(#"{"mode":1}"#), msp(#"{"cpr-exec-command":"x"}"#), msp(#"{"cpr-exec-command":[1]}"#),
                msp(#"{"bogus":1}"#), msp(#"{"bogus":1,"downtime-limit":"x"}"#), msp(#"{"bogus":1,"zzz":2}"#), msp("[]"),
                msp(#"{"tls-creds":5}"#), msp(#"{"multifd-compression":"lz4"}"#), msp(#"{"multifd-compression":"zlib"}"#),
                msp(#"{"cpr-exec-command":[]}"#), msp(#"{"max-bandwidth":18446744073709551615}"#),
                // Integers exact as QEMU reads them: 2^64-1 and 2^53+1 taken, a negative taken as its
                // two's complement, 2^64, a fraction or a string refused with the visitor's words.
                msp(#"{"max-bandwidth":9007199254740993}"#), msp(#"{"max-bandwidth":-1}"#), msp(#"{"max-bandwidth":-9223372036854775808}"#),
                msp(#"{"max-bandwidth":18446744073709551616}"#), msp(#"{"max-bandwidth":1.5}"#), msp(#"{"max-bandwidth":1e3}"#),
                msp(#"{"multifd-channels":18446744073709551615}"#),
                msp(#"{"multifd-channels":-1}"#), msp(#"{"downtime-limit":-9223372036854775808}"#), msp(#"{"max-bandwidth":0}"#),
                msc("{}"), msc(#"{"capabilities":{}}"#), msc(#"{"capabilities":[1]}"#), msc(#"{"capabilities":[{}]}"#),
                msc(#"{"capabilities":[{"capability":"nope","state":true}]}"#), msc(#"{"capabilities":[{"capability":"auto-converge"}]}"#),
                msc(#"{"capabilities":[{"capability":"auto-converge","state":1}]}"#), msc(#"{"capabilities":[{"capability":"auto-converge","state":true,"x":1}]}"#),
                msc(#"{"capabilities":[{"capability":"auto-converge","state":true},{"capability":"x","state":true}]}"#),
                msc(#"{"capabilities":[{"capability":"auto-converge","state":true}],"z":1}"#),
                msc(#"{"capabilities":[{"capability":"auto-converge","state":false}]}"#),
                msc(#"{"capabilities":[{"capability":"xbzrle","state":true}]}"#),
                "{\"execute\":\"migrate\",\"arguments\":{}}\n", "{\"execute\":\"migrate\",\"arguments\":{\"uri\":1}}\n",
                "{\"execute\":\"migrate\",\"arguments\":{\"uri\":\"carrier:1\"}}\n", "{\"execute\":\"migrate\",\"arguments\":{\"resume\":\"yes\"}}\n",
                "{\"execute\":\"migrate\",\"arguments\":{\"channels\":[{\"channel-type\":\"main\"}]}}\n",
                "{\"execute\":\"migrate\",\"arguments\":{\"channels\":[{\"channel-type\":\"main\",\"addr\":{}}]}}\n",
                "{\"execute\":\"migrate\",\"arguments\":{\"channels\":[{\"channel-type\":\"main\",\"addr\":{\"transport\":\"socket\"}}]}}\n",
                "{\"execute\":\"migrate\",\"arguments\":{\"channels\":[{\"channel-type\":\"main\",\"addr\":{\"transport\":\"socket\",\"type\":\"unix\"}}]}}\n",
                "{\"execute\":\"migrate\",\"arguments\":{\"channels\":[{\"channel-type\":\"x\",\"addr\":{\"transport\":\"socket\",\"type\":\"unix\",\"path\":\"/x\"}}]}}\n",
                "{\"execute\":\"migrate\",\"arguments\":{\"channels\":[{\"channel-type\":\"main\",\"addr\":{\"transport\":\"socket\",\"type\":\"inet\",\"host\":\"h\",\"port\":1}}]}}\n",
                "{\"execute\":\"migrate\",\"arguments\":{\"channels\":[{\"channel-type\":\"main\",\"addr\":{\"transport\":\"pigeon\"}}]}}\n",
                "{\"execute\":\"migrate\",\"arguments\":{\"uri\":\"tcp:127.0.0.1:1\",\"channels\":[{\"channel-type\":\"main\",\"addr\":{\"transport\":\"socket\",\"type\":\"unix\",\"path\":\"/x\"}}]}}\n",
                "{\"execute\":\"migrate-incoming\",\"arguments\":{\"uri\":5}}\n",
            ]),
            Case(name: "nesting limit, then the connection goes on", inputs: [
                String(repeating: "[", count: 1024) + String(repeating: "]", count: 1024) + "\n",
                String(repeating: "[", count: 1025) + String(repeating: "]", count: 1025) + "\n",
                "{\"execute\":\"query-status\",\"arguments\":" + String(repeating: "{\"a\":", count: 1025) + "1" + String(repeating: "}", count: 1026) + "\n",
                qs + "\n",
            ]),
            Case(name: "oversized: token count limit, then the connection goes on", firstMS: 60_000, inputs: [
                "[" + String(repeating: "1,", count: 1 << 20) + "1]]\n", qs + "\n",
            ]),
        ]
    }()

    /// vfio-live differs here on purpose; what it answers instead (README lists them).
    static let deliberate: [String: [String]] = [
        // No out-of-band execution: vfio-live's greeting offers no capability, QEMU's offers "oob".
        #"{"execute":"qmp_capabilities","arguments":{"enable":["oob"]}}"# + "\n": ["GenericError: Capability oob not available"],
        // An alias vfio-live accepts beside QEMU's migrate_cancel.
        "{\"execute\":\"migrate-cancel\"}\n": ["return"],
        // QEMU accepts every capability of its enum; vfio-live implements two and says so.
        #"{"execute":"migrate-set-capabilities","arguments":{"capabilities":[{"capability":"xbzrle","state":true}]},"id":"c"}"# + "\n":
            ["GenericError: capability 'xbzrle' is not supported (auto-converge, multifd, x-allow-untracked-devices, x-vfio-live-payload-checksum) id=\"c\""],
        // Parameters QEMU has and vfio-live does not implement are refused, not silently ignored.
        #"{"execute":"migrate-set-parameters","arguments":{"multifd-compression":"zlib"},"id":1}"# + "\n":
            ["GenericError: Parameter 'multifd-compression' is not supported by vfio-live id=1"],
        // vfio-live needs a command to exec; QEMU takes an empty list (and fails at cpr-exec time).
        #"{"execute":"migrate-set-parameters","arguments":{"cpr-exec-command":[]},"id":1}"# + "\n":
            ["GenericError: cpr-exec-command must be a non-empty list of strings id=1"],
    ]

    func testSameAnswersAsQEMU() throws {
        guard FileManager.default.isExecutableFile(atPath: Self.binary) else { throw XCTSkip("vfio-live is not built at \(Self.binary)") }
        let (qemuExe, qemuArgs) = try Self.qemu()
        let qemuSock = "/tmp/vfio-live-qmpconf-\(tag)-qemu.sock", oursSock = "/tmp/vfio-live-qmpconf-\(tag)-ours.sock"
        try start(qemuExe, qemuArgs + ["-machine", "none", "-nodefaults", "-display", "none", "-qmp", "unix:\(qemuSock),server=on,wait=off"],
                  log: "/tmp/vfio-live-qmpconf-\(tag)-qemu.log")
        try start(Self.binary, ["vm", "run", "--memory", "64M", "--workload", "dirty-rate=1000,working-set=4M", "--qmp", oursSock, "--quiet"],
                  log: "/tmp/vfio-live-qmpconf-\(tag)-ours.log")
        Self.waitForSocket(qemuSock); Self.waitForSocket(oursSock)
        defer { unlink(qemuSock) }

        var compared = 0
        for c in Self.cases {
            // Both servers get the case at once, each on its own connection.
            var answers: [[[String]]] = [[], []]
            let lock = Mutex()
            let threads = try [qemuSock, oursSock].enumerated().map { i, path in
                try OSThread(name: "qmpconf") {
                    var got: [[String]] = []
                    do {
                        let r = try Raw(path)
                        _ = r.collect(firstMS: 2000)
                        if c.negotiate { try r.send(Array("{\"execute\":\"qmp_capabilities\"}\n".utf8)); _ = r.collect(firstMS: 2000) }
                        for input in c.inputs {
                            try r.send(Array(input.utf8))
                            got.append(r.collect(firstMS: c.firstMS, quietMS: c.firstMS > 400 ? 1000 : 120))
                        }
                    } catch { got.append(["connection failed: \(error)"]) }
                    lock.withLock { answers[i] = got }
                }
            }
            threads.forEach { $0.join() }
            XCTAssertEqual(answers[0].count, c.inputs.count, "\(c.name): QEMU answered every input")
            for (k, input) in c.inputs.enumerated() where k < answers[0].count && k < answers[1].count {
                let (q, o) = (answers[0][k], answers[1][k])
                if let ours = Self.deliberate[input] {
                    XCTAssertEqual(o, ours, "\(c.name): vfio-live's deliberate answer to \(input.debugDescription) (QEMU: \(q))")
                    continue
                }
                XCTAssertEqual(o, q, "\(c.name): \(input.prefix(120).debugDescription)")
                if !q.isEmpty { compared += 1 }
            }
        }
        XCTAssertGreaterThan(compared, 100, "inputs QEMU answered and vfio-live answered the same")
    }
}
