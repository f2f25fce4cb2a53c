import SystemCalls

/// A migration channel: the stream out, and a back channel for the destination's verdict.
/// Writes go straight from guest memory to the socket (one sendmsg over a list of buffers).
public final class ChannelSource: ByteSource {
    let socket: StreamSocket
    public init(_ s: StreamSocket) { socket = s }
    public func readExactly(_ buffer: UnsafeMutableRawBufferPointer) throws {
        _ = try socket.receiveExactly(into: buffer, maxFDs: 0)
    }
}

/// The destination's reply at the end (or as soon as it fails): "VLMIGACK" or "VLMIGERR",
/// a u32 length, then UTF-8 text (a JSON object on success, the reason on failure).
enum Verdict {
    static let ack = Array("VLMIGACK".utf8), err = Array("VLMIGERR".utf8)

    static func send(_ s: StreamSocket, ok: Bool, _ text: String) {
        var w = BEWriter()
        w.append(ok ? ack : err)
        let t = Array(text.utf8.prefix(64 * 1024))
        w.u32(UInt32(t.count)); w.append(t)
        try? s.send(w.bytes)
    }

    /// Read a verdict; nil if the peer closed without one.
    static func receive(_ s: StreamSocket) -> (ok: Bool, text: String)? {
        var head = [UInt8](repeating: 0, count: 12)
        guard (try? head.withUnsafeMutableBytes({ try s.receiveExactly(into: $0, maxFDs: 0) })) != nil else { return nil }
        let kind = Array(head[0..<8])
        let n = Int(head[8...].reduce(UInt32(0)) { $0 << 8 | UInt32($1) })
        guard kind == ack || kind == err, n <= 64 * 1024 else { return nil }
        var body = [UInt8](repeating: 0, count: n)
        if n > 0 { guard (try? body.withUnsafeMutableBytes({ try s.receiveExactly(into: $0, maxFDs: 0) })) != nil else { return nil } }
        return (kind == ack, String(decoding: body, as: UTF8.self))
    }
}
