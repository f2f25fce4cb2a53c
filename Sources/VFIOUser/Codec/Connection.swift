import SystemCalls

/// A received message: header, payload bytes, and the fds that came with it (owned).
public struct Message {
    public var header: MessageHeader
    public var payload: [UInt8]
    public var fds: [FileDescriptor]

    public init(header: MessageHeader, payload: [UInt8], fds: [FileDescriptor]) {
        self.header = header; self.payload = payload; self.fds = fds
    }
    /// Close every received fd (the error paths call this so nothing leaks).
    public func closeFDs() { for f in fds { f.close() } }
}

/// A message that cannot be processed, with what to say in the error reply. The stream is still
/// in sync (its payload was consumed), so the connection can go on.
public struct FramingError: Error, CustomStringConvertible {
    public var header: MessageHeader
    public var errno: Errno
    public var reason: String
    public var description: String { reason }
}

/// One vfio-user stream: framing, fd passing, and the size and fd-count limits.
/// Sends are serialized; receives are done by one thread at a time.
public final class VFIOUserConnection: @unchecked Sendable {
    public let socket: UnixSocket
    /// The most fds we accept in one message (what we advertised as max_msg_fds).
    public var maxReceiveFDs: Int
    /// The largest message we accept; bigger ones are drained and refused.
    public var maxMessageSize: Int
    private let sendLock = Mutex()
    private var nextID: UInt16 = 0
    private let idLock = Mutex()

    public init(socket: UnixSocket, maxReceiveFDs: Int = 8, maxMessageSize: Int = (1 << 20) + 4096) {
        Allocator.keepLargeBuffersResident()
        self.socket = socket
        self.maxReceiveFDs = maxReceiveFDs
        self.maxMessageSize = maxMessageSize
    }

    public func allocateID() -> UInt16 { idLock.withLock { nextID &+= 1; return nextID } }
    /// The id the next `allocateID()` returns after this one (for a live-update successor).
    public func peekNextID() -> UInt16 { idLock.withLock { nextID &+ 1 } }
    /// Continue a predecessor's id sequence.
    public func setNextID(_ id: UInt16) { idLock.withLock { nextID = id &- 1 } }

    /// Send header + payload parts + fds in one sendmsg.
    public func send(id: UInt16, command: UInt16, flags: UInt32, errorNumber: UInt32 = 0,
                     payload: [UnsafeRawBufferPointer], fds: [Int32] = []) throws {
        try send(id: id, command: command, flags: flags, errorNumber: errorNumber, payload: payload) { try socket.send($0, fds: fds) }
    }

    /// Frame header + payload parts as one message and hand its parts (header first) to
    /// `write`, under the send lock: a sender that writes the message to the socket itself
    /// (the spliced MIG_DATA_READ reply).
    func send(id: UInt16, command: UInt16, flags: UInt32, errorNumber: UInt32 = 0,
              payload: [UnsafeRawBufferPointer], through write: ([UnsafeRawBufferPointer]) throws -> Void) throws {
        let total = payload.reduce(0) { $0 + $1.count } + MessageHeader.size
        guard total <= UInt32.max else { throw Errno.EMSGSIZE }
        let header = MessageHeader(messageID: id, command: command, messageSize: UInt32(total), flags: flags, errorNumber: errorNumber).bytes
        try sendLock.withLock {
            try header.withUnsafeBytes { h in try write([h] + payload) }
        }
    }

    public func send(id: UInt16, command: UInt16, flags: UInt32, errorNumber: UInt32 = 0,
                     payload: [UInt8], fds: [Int32] = []) throws {
        try payload.withUnsafeBytes { try send(id: id, command: command, flags: flags, errorNumber: errorNumber, payload: [$0], fds: fds) }
    }

    public func sendReply(to h: MessageHeader, payload: [UInt8] = [], fds: [Int32] = []) throws {
        try send(id: h.messageID, command: h.command, flags: MessageHeader.typeReply, payload: payload, fds: fds)
    }

    /// An error reply is header only: flags REPLY|ERROR and the errno.
    public func sendError(to h: MessageHeader, errno: Errno) throws {
        try send(id: h.messageID, command: h.command, flags: MessageHeader.typeReply | MessageHeader.flagError,
                 errorNumber: UInt32(errno.rawValue), payload: [UInt8]())
    }

    /// Receive one message. Throws `FramingError` (stream still in sync) for a message that is
    /// too large, too small or carries too many fds; throws `Errno` when the stream is broken
    /// (ECONNRESET on a clean EOF between messages).
    public func receive(deadline: UInt64 = .max) throws -> Message {
        let (header, got) = try receiveHeader(deadline: deadline)
        return try receiveBody(header, got, deadline: deadline)
    }

    /// The first half of `receive()`: the 16-byte header and the fds that came with it. The
    /// caller either reads the payload itself (the migration-data hot path receives it straight
    /// into its buffer) or passes both to `receiveBody`. Past `deadline` no further read of the
    /// message starts (EAGAIN, as the socket's own timeout): a peer trickling it cannot stretch it.
    public func receiveHeader(deadline: UInt64 = .max) throws -> (MessageHeader, ReceivedFDs) {
        var hdr = [UInt8](repeating: 0, count: MessageHeader.size)
        let got = try hdr.withUnsafeMutableBytes { try socket.receiveExactly(into: $0, maxFDs: maxReceiveFDs, deadline: deadline) }
        var r = WireReader(hdr, context: "header")
        do { return (try MessageHeader(decoding: &r), got) } catch {
            for f in got.fds { f.close() }
            throw error
        }
    }

    /// The second half of `receive()`: the payload of a message whose header was just read.
    public func receiveBody(_ header: MessageHeader, _ got: ReceivedFDs, deadline: UInt64 = .max) throws -> Message {
        var fds = got.fds
        func refuse(_ errno: Errno, _ why: String) -> FramingError {
            for f in fds { f.close() }
            fds = []
            return FramingError(header: header, errno: errno, reason: why)
        }
        if header.messageSize < UInt32(MessageHeader.size) {
            throw refuse(.EINVAL, "message size \(header.messageSize) is smaller than the 16-byte header")
        }
        let payloadSize = Int(header.messageSize) - MessageHeader.size
        if payloadSize > maxMessageSize - MessageHeader.size {
            try drain(payloadSize, deadline: deadline)
            throw refuse(.E2BIG, "message size \(header.messageSize) exceeds the limit of \(maxMessageSize) bytes")
        }
        // Not zero-filled first: recv overwrites every byte, or the stream is broken and the
        // buffer is dropped (a zero fill was a whole extra pass over each MIG_DATA_WRITE).
        let payload: [UInt8]
        do {
            payload = try [UInt8](unsafeUninitializedCapacity: payloadSize) { buf, count in
                if payloadSize > 0 {
                    let more = try socket.receiveExactly(into: UnsafeMutableRawBufferPointer(buf), maxFDs: 0, deadline: deadline)
                    for f in more.fds { f.close() }
                }
                count = payloadSize
            }
        } catch {
            for f in fds { f.close() }
            throw error
        }
        if got.truncated {
            throw refuse(.EINVAL, "\(header.knownCommand?.description ?? "command \(header.command)") carried more than \(maxReceiveFDs) fds")
        }
        return Message(header: header, payload: payload, fds: fds)
    }

    /// Read and discard `count` payload bytes so the next header is found where it should be.
    public func drain(_ count: Int, deadline: UInt64 = .max) throws {
        var left = count
        var scratch = [UInt8](repeating: 0, count: min(count, 64 * 1024))
        while left > 0 {
            let n = min(left, scratch.count)
            let got = try scratch.withUnsafeMutableBytes { try socket.receiveExactly(into: UnsafeMutableRawBufferPointer(rebasing: $0[0..<n]), maxFDs: 0, deadline: deadline) }
            for f in got.fds { f.close() }
            left -= n
        }
    }

    public func close() { socket.shutdown(); socket.close() }
}
