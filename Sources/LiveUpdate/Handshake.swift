import Migration
import SystemCalls

/// The messages old and new VMM exchange on the CPR socket around the main stream:
///
///     old → new   CPR state (descriptors)            guest still running
///     new → old   READY     (VM built around them)
///     old → new   main stream (CONFIG, VCPUS, LIVE_UPDATE, END)   vCPUs paused: blackout
///     new → old   LOADED    (state applied; the new VMM waits)
///     old → new   GO        commit: the old VMM never takes the VM back after this
///     new → old   DONE {json}  (running; blackout measured)
///     either      ERROR text (and close)
///
/// GO is the commit point: until the new VMM has it, it must not run the guest, and the old
/// one rolls back on any error, EOF or timeout. Each message: an 8-byte tag, u32 length, text.
public enum CPRMessage: String, CaseIterable {
    case ready = "VLCPRRDY", loaded = "VLCPRLOD", go = "VLCPRGO!", done = "VLCPRDON", error = "VLCPRERR"

    public static func send(_ s: StreamSocket, _ m: CPRMessage, _ text: String = "") throws {
        var w = BEWriter()
        w.append(Array(m.rawValue.utf8))
        let t = Array(text.utf8.prefix(64 * 1024))
        w.u32(UInt32(t.count)); w.append(t)
        try s.send(w.bytes)
    }

    /// The next message, waiting at most `timeoutMilliseconds` (-1: forever).
    public static func receive(_ s: StreamSocket, timeoutMilliseconds: Int32) throws -> (CPRMessage, String) {
        // One bound for the whole message (each recvmsg also has the socket's own timeout).
        let deadline = timeoutMilliseconds < 0 ? UInt64.max : monotonicNanoseconds() + UInt64(timeoutMilliseconds) * 1_000_000
        guard try Poll.waitReadable(s.fd, timeoutMilliseconds: timeoutMilliseconds) else {
            throw CPRError.channel("no answer within \(timeoutMilliseconds) ms")
        }
        var head = [UInt8](repeating: 0, count: 12)
        do { _ = try head.withUnsafeMutableBytes { try s.receiveExactly(into: $0, maxFDs: 0, deadline: deadline) } } catch let e as Errno where e == .EAGAIN {
            throw CPRError.channel("no whole message within \(timeoutMilliseconds) ms")
        } catch {
            throw CPRError.channel("the peer closed the CPR socket")
        }
        guard let m = CPRMessage(rawValue: String(decoding: head[0..<8], as: UTF8.self)) else {
            throw CPRError.malformed("unknown CPR message tag")
        }
        let n = Int(head[8...].reduce(UInt32(0)) { $0 << 8 | UInt32($1) })
        guard n <= 64 * 1024 else { throw CPRError.malformed("CPR message of \(n) bytes") }
        var body = [UInt8](repeating: 0, count: n)
        if n > 0 {
            do { _ = try body.withUnsafeMutableBytes { try s.receiveExactly(into: $0, maxFDs: 0, deadline: deadline) } } catch let e as Errno where e == .EAGAIN {
                throw CPRError.channel("no whole message within \(timeoutMilliseconds) ms")
            } catch {
                throw CPRError.channel("the peer closed the CPR socket mid-message")
            }
        }
        return (m, String(decoding: body, as: UTF8.self))
    }

    /// Receive `expected`; an ERROR from the peer becomes `CPRError.successor`.
    public static func expect(_ expected: CPRMessage, from s: StreamSocket, timeoutMilliseconds: Int32) throws -> String {
        let (m, text) = try receive(s, timeoutMilliseconds: timeoutMilliseconds)
        if m == .error { throw CPRError.successor(text) }
        guard m == expected else { throw CPRError.malformed("expected \(expected.rawValue), got \(m.rawValue)") }
        return text
    }
}
