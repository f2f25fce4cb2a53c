import Glibc
import SystemCalls

/// A migration channel: the stream out, and a back channel for the destination's verdict.
/// Writes go straight from guest memory to the socket (one sendmsg over a list of buffers),
/// and reads of page data go straight into guest memory (one readv over a section's runs).
public final class ChannelSource: ByteSource {
    let socket: StreamSocket
    /// The receive timeout set on the socket (for the error's text), 0 if none.
    let timeoutMS: UInt64
    public init(_ s: StreamSocket, timeoutMS: UInt64 = 0) { socket = s; self.timeoutMS = timeoutMS }
    public func readExactly(_ buffer: UnsafeMutableRawBufferPointer) throws {
        do { _ = try socket.receiveExactly(into: buffer, maxFDs: 0) } catch let e as Errno where e == .EAGAIN {
            throw StreamError.peerSilent(ms: timeoutMS)
        }
    }

    /// recvmsg over all the vectors until every one is full: no bounce buffer, and one system
    /// call per socket-buffer's worth instead of one per run. EOF: ECONNRESET before the
    /// first byte, EPROTO after (as `receiveExactly`); the receive timeout: `.peerSilent`.
    public func readExactly(vectors: [UnsafeMutableRawBufferPointer]) throws {
        var iovs = vectors.filter { $0.count > 0 }.map { iovec(iov_base: $0.baseAddress, iov_len: $0.count) }
        var first = 0, got = 0
        while first < iovs.count {
            let n = iovs.withUnsafeMutableBufferPointer { p -> Int in
                var m = msghdr()
                m.msg_iov = p.baseAddress! + first
                m.msg_iovlen = min(p.count - first, 1024)  // IOV_MAX
                return Glibc.recvmsg(socket.fd.rawValue, &m, 0)
            }
            if n < 0 {
                let e = errno
                if e == EINTR { continue }
                if e == EAGAIN || e == EWOULDBLOCK { throw StreamError.peerSilent(ms: timeoutMS) }
                throw Errno(e)
            }
            if n == 0 { throw got == 0 ? Errno.ECONNRESET : Errno.EPROTO }
            got += n
            var left = n
            while left > 0 {
                if left >= iovs[first].iov_len { left -= iovs[first].iov_len; first += 1 } else {
                    iovs[first].iov_base += left
                    iovs[first].iov_len -= left
                    left = 0
                }
            }
        }
    }
}

/// The messages on the back channel, each "VLMIG" + 3 letters, a u32 length, then UTF-8 text:
///
///     destination → source  RDY  everything is loaded; waiting for GO (text empty)
///     source → destination  GO!  take the VM over: run it (text empty)
///     destination → source  ACK  resumed (a JSON summary), or ERR (the reason), at any time
///     destination → source  PRG  everything before probe N is applied (pre-copy; text
///                                {"x-probe":N}), the answer to a probe (see MigrationStream)
///
/// Until GO the source owns the VM; after it, the destination. A stream of version 1 has no
/// RDY/GO: the destination resumes and says ACK.
enum Verdict {
    enum Kind: String, CustomStringConvertible {
        case ack = "VLMIGACK", error = "VLMIGERR", ready = "VLMIGRDY", go = "VLMIGGO!", progress = "VLMIGPRG"
        var description: String { String(rawValue.suffix(3)) }
    }
    struct Message { let kind: Kind; let text: String }

    /// Why a verdict could not be read (a timeout comes out as Errno.EAGAIN).
    enum ReadError: Error, CustomStringConvertible {
        case closed, garbage
        var description: String {
            switch self {
            case .closed: return "the peer closed the connection"
            case .garbage: return "the peer sent something that is not a verdict"
            }
        }
    }

    static func send(_ s: StreamSocket, _ kind: Kind, _ text: String) throws {
        var w = BEWriter()
        w.append(Array(kind.rawValue.utf8))
        let t = Array(text.utf8.prefix(64 * 1024))
        w.u32(UInt32(t.count)); w.append(t)
        try s.send(w.bytes)
    }

    static func send(_ s: StreamSocket, ok: Bool, _ text: String) {
        try? send(s, ok ? .ack : .error, text)
    }

    /// Read one message; throws `ReadError`, or Errno.EAGAIN when the socket's timeout expired
    /// or, part-way through the message, `deadline` passed.
    static func read(_ s: StreamSocket, deadline: UInt64 = .max) throws -> Message {
        var head = [UInt8](repeating: 0, count: 12)
        func fill(_ b: inout [UInt8]) throws {
            do { try b.withUnsafeMutableBytes { _ = try s.receiveExactly(into: $0, maxFDs: 0, deadline: deadline) } } catch let e as Errno where e == .ECONNRESET || e == .EPROTO {
                throw ReadError.closed
            }
        }
        try fill(&head)
        guard let kind = Kind(rawValue: String(decoding: head[0..<8], as: UTF8.self)) else { throw ReadError.garbage }
        let n = Int(head[8...].reduce(UInt32(0)) { $0 << 8 | UInt32($1) })
        guard n <= 64 * 1024 else { throw ReadError.garbage }
        var body = [UInt8](repeating: 0, count: n)
        if n > 0 { try fill(&body) }
        return Message(kind: kind, text: String(decoding: body, as: UTF8.self))
    }

    /// A message, or nil if none could be read.
    static func receive(_ s: StreamSocket) -> Message? { try? read(s) }
}
