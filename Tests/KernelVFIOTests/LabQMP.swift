import Foundation
import SystemCalls

struct LabError: Error, CustomStringConvertible {
    var description: String
    init(_ s: String) { description = s }
}

/// The lab tests' one QMP client (this test module does not link the project's JSON codec):
/// one command at a time, answers parsed with Foundation's JSON, events skipped, every read
/// bounded (30 s).
final class LabQMP {
    let s: UnixSocket
    var buf: [UInt8] = []

    init(_ path: String) throws {
        s = try UnixSocket.connect(path: path)
        _ = try next()
        _ = try call("qmp_capabilities").get()
    }

    deinit { s.close() }

    func next() throws -> [String: Any] {
        while true {
            if let nl = buf.firstIndex(of: 10) {
                let line = Data(buf[..<nl])
                buf.removeFirst(nl + 1)
                guard let o = try JSONSerialization.jsonObject(with: line) as? [String: Any] else { throw LabError("QMP sent a non-object: \(String(decoding: line, as: UTF8.self))") }
                return o
            }
            guard try Poll.waitReadable(s.fd, timeoutMilliseconds: 30_000) else { throw LabError("QMP: no answer within 30 s") }
            var chunk = [UInt8](repeating: 0, count: 4096)
            let n = try chunk.withUnsafeMutableBytes { try s.fd.read(into: $0) }
            guard n > 0 else { throw LabError("QMP: the VMM closed the connection") }
            buf += chunk[0..<n]
        }
    }

    /// The command's return value, or its error's description.
    func call(_ cmd: String, _ arguments: String? = nil) throws -> Result<Any, LabError> {
        try s.send(Array("{\"execute\":\"\(cmd)\"\(arguments.map { ",\"arguments\":\($0)" } ?? "")}".utf8))
        while true {
            let m = try next()
            if m["event"] != nil { continue }
            if let e = m["error"] as? [String: Any] { return .failure(LabError("\(cmd): \(e["desc"] ?? e)")) }
            return .success(m["return"] ?? NSNull())
        }
    }

    /// The command's return object; a QMP error is thrown (LabError, with its desc).
    func object(_ cmd: String, _ arguments: String? = nil) throws -> [String: Any] {
        guard let o = try call(cmd, arguments).get() as? [String: Any] else { throw LabError("\(cmd) did not return an object") }
        return o
    }

    func array(_ cmd: String) throws -> [[String: Any]] {
        guard let a = try call(cmd).get() as? [Any] else { throw LabError("\(cmd) did not return an array") }
        return a.compactMap { $0 as? [String: Any] }
    }
}
