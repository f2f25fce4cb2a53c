import Glibc
import SystemCalls
import VFIO

/// The device-state hot path: MIG_DATA_READ replies received straight into the caller's buffer,
/// and a pipelined relay from one server to another (several MIG_DATA_READ requests in flight,
/// each reply's data sent on as a MIG_DATA_WRITE from the buffer it was received into).
///
/// The spec allows it: a client may pipeline commands and the server processes them in order
/// (vfio-user.rst, "Request Concurrency"), so the data of reply k precedes that of reply k+1.
/// A reply that comes out of order is a protocol violation; one that never comes is a timeout.
/// Every size in a reply is checked before a byte of data is received.
extension VFIOUserClient {
    /// MIG_DATA_READ of at most `buffer.count` bytes (and `maxTransfer`), received into
    /// `buffer`. Returns the bytes read; fewer than asked ends the current data.
    public func readMigrationData(into buffer: UnsafeMutableRawBufferPointer) throws -> Int {
        let n = min(buffer.count, maxTransfer)
        return try callLock.withLock {
            try checkUsable()
            let id = try sendMigDataRead(size: n)
            var pipe = ReplyPipe(expected: [id])
            do {
                return try receiveMigDataReadReply(&pipe, into: UnsafeMutableRawBufferPointer(rebasing: buffer[0..<n]))
            } catch {
                drainAfterFailure(&pipe)
                throw error
            }
        }
    }

    /// Move this device's migration data to `destination` until a short read (the end of the
    /// data available now in PRE_COPY, the end of the stream in STOP_COPY), keeping `depth`
    /// MIG_DATA_READ requests in flight and at most `depth` MIG_DATA_WRITE replies outstanding.
    /// Messages carry up to `chunk` bytes, within both servers' `max_data_xfer_size`.
    /// `beforeWrite` runs before each MIG_DATA_WRITE (fault injection in tests).
    ///
    /// On failure both connections are brought back in step (the outstanding replies are read
    /// and dropped) so that the caller can still move the devices back; if that fails too, the
    /// connection is marked broken and every later call says why.
    public func relayMigrationData(to destination: VFIOUserClient, chunk: Int = Int.max, depth: Int = 4,
                                   beforeWrite: (() throws -> Void)? = nil) throws -> UInt64 {
        precondition(destination !== self, "relay to the same connection")
        let n = min(chunk, maxTransfer, destination.maxTransfer)
        guard n > 0 else { throw VFIOUserClientError.protocolViolation("max_data_xfer_size is 0: no migration data can move") }
        let depth = max(1, min(depth, 64))
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: n, alignment: 64)
        defer { buffer.deallocate() }
        return try callLock.withLock {
            try destination.callLock.withLock {
                try checkUsable()
                try destination.checkUsable()
                var reads = ReplyPipe(), writes = ReplyPipe()
                var moved: UInt64 = 0
                do {
                    for _ in 0..<depth { reads.expected.append(try sendMigDataRead(size: n)) }
                    var issuing = true
                    while reads.outstanding > 0 {
                        let got = try receiveMigDataReadReply(&reads, into: buffer)
                        // A short reply ends the data: no new requests, but the ones in flight
                        // are still answered in order, and whatever they carry is stream data.
                        if got < n { issuing = false } else if issuing { reads.expected.append(try sendMigDataRead(size: n)) }
                        guard got > 0 else { continue }
                        try beforeWrite?()
                        if writes.outstanding >= depth { try destination.receiveMigDataWriteReply(&writes) }
                        writes.expected.append(try destination.sendMigDataWrite(UnsafeRawBufferPointer(rebasing: buffer[0..<got])))
                        moved += UInt64(got)
                    }
                    while writes.outstanding > 0 { try destination.receiveMigDataWriteReply(&writes) }
                } catch {
                    drainAfterFailure(&reads)
                    destination.drainAfterFailure(&writes)
                    throw error
                }
                return moved
            }
        }
    }

    // MARK: the parts (callLock held)

    /// The ids of requests sent and not yet answered, oldest first.
    struct ReplyPipe {
        var expected: [UInt16] = []
        var head = 0
        var outstanding: Int { expected.count - head }
        mutating func next() -> UInt16 { defer { head += 1 }; return expected[head] }
    }

    func checkUsable() throws {
        if handedOver { throw VFIOUserClientError.handedOver }
        if let b = broken { throw b }
    }

    private var seconds: Double { Double(options.timeoutMilliseconds) / 1000 }

    private func sendFailed(_ e: Error, _ cmd: VFIOUserCommand) -> Error {
        if let e = e as? Errno, e == .EPIPE || e == .ECONNRESET { return VFIOUserClientError.disconnected }
        if let e = e as? Errno, e == .EAGAIN {
            let t = VFIOUserClientError.timeout(command: cmd, seconds: seconds)
            broken = t
            return t
        }
        return e
    }

    private func receiveFailed(_ e: Error, _ cmd: VFIOUserCommand) -> Error {
        if let e = e as? Errno, e == .ECONNRESET || e == .EPROTO { return VFIOUserClientError.disconnected }
        if let e = e as? Errno, e == .EAGAIN {
            // SO_RCVTIMEO: a message stopped half-way; the stream is out of step for good.
            let t = VFIOUserClientError.timeout(command: cmd, seconds: seconds)
            broken = t
            return t
        }
        if let f = e as? FramingError { return VFIOUserClientError.protocolViolation("reply to \(cmd): \(f.reason)") }
        return e
    }

    private func sendMigDataRead(size n: Int) throws -> UInt16 {
        let id = connection.allocateID()
        var w = WireWriter(capacity: 8); w.u32(UInt32(8 + n)); w.u32(UInt32(n))
        do {
            try w.bytes.withUnsafeBytes { try connection.send(id: id, command: VFIOUserCommand.migDataRead.rawValue, flags: MessageHeader.typeCommand, payload: [$0]) }
        } catch { throw sendFailed(error, .migDataRead) }
        return id
    }

    func sendMigDataWrite(_ data: UnsafeRawBufferPointer) throws -> UInt16 {
        let id = connection.allocateID()
        var w = WireWriter(capacity: 8); w.u32(UInt32(8 + data.count)); w.u32(UInt32(data.count))
        do {
            try w.bytes.withUnsafeBytes { try connection.send(id: id, command: VFIOUserCommand.migDataWrite.rawValue, flags: MessageHeader.typeCommand, payload: [$0, data]) }
        } catch { throw sendFailed(error, .migDataWrite) }
        return id
    }

    /// The header of the next reply on the main socket, within the timeout (restarted by each
    /// server command served meanwhile) and the cancel descriptor. Its payload is not read yet.
    private func awaitReplyHeader(_ cmd: VFIOUserCommand) throws -> (MessageHeader, ReceivedFDs) {
        var deadline = monotonicNanoseconds() + UInt64(options.timeoutMilliseconds) * 1_000_000
        while true {
            var watch = [connection.socket.fd.rawValue]
            if let c = cancelFD { watch.append(c) }
            let now = monotonicNanoseconds()
            guard now < deadline else {
                let t = VFIOUserClientError.timeout(command: cmd, seconds: seconds)
                broken = t
                throw t
            }
            let ms = Int32(min((deadline - now) / 1_000_000 + 1, 250))
            switch try Poll.waitAnyReadable(watch, timeoutMilliseconds: ms) {
            case nil: continue
            case 1?:
                broken = .cancelled(command: cmd)
                throw VFIOUserClientError.cancelled(command: cmd)
            default: break
            }
            let (h, got): (MessageHeader, ReceivedFDs)
            do { (h, got) = try connection.receiveHeader() } catch { throw receiveFailed(error, cmd) }
            if h.isCommand {
                let m: Message
                do { m = try connection.receiveBody(h, got) } catch { throw receiveFailed(error, cmd) }
                serveServerCommand(m, on: connection)
                deadline = monotonicNanoseconds() + UInt64(options.timeoutMilliseconds) * 1_000_000
                continue
            }
            return (h, got)
        }
    }

    /// Drop the rest of a reply whose header was read: its fds, and its payload (which must
    /// fit the limit we accept for any message, or the stream cannot be trusted any more).
    private func discardReply(_ h: MessageHeader, _ got: ReceivedFDs, _ cmd: VFIOUserCommand) throws {
        do { _ = try connection.receiveBody(h, got) } catch let f as FramingError {
            // Too large (already drained) or too many fds: in step, but a violation.
            throw VFIOUserClientError.protocolViolation("reply to \(cmd): \(f.reason)")
        } catch { throw receiveFailed(error, cmd) }
    }

    /// Check the next reply is the one `pipe` expects; errors and violations consume it.
    private func takeReplyHeader(_ pipe: inout ReplyPipe, _ cmd: VFIOUserCommand) throws -> MessageHeader {
        let (h, got) = try awaitReplyHeader(cmd)
        let id = pipe.next()
        guard h.messageID == id, h.command == cmd.rawValue else {
            try discardReply(h, got, cmd)
            throw VFIOUserClientError.protocolViolation("\(cmd) replies out of order: expected the reply to id \(id), got one for command \(h.command) id \(h.messageID) (the spec has the server process commands in order)")
        }
        guard got.fds.isEmpty, !got.truncated else {
            try discardReply(h, got, cmd)
            throw VFIOUserClientError.protocolViolation("\(cmd) reply carried file descriptors")
        }
        if h.isError {
            try discardReply(h, got, cmd)
            let e = h.errorNumber
            throw VFIOUserClientError.remote(command: cmd, errno: Errno(e >= 1 && e <= 4096 ? Int32(e) : EINVAL))
        }
        guard h.messageSize >= UInt32(MessageHeader.size) else {
            let v = VFIOUserClientError.protocolViolation("\(cmd) reply: message size \(h.messageSize) is smaller than the 16-byte header")
            broken = v
            throw v
        }
        return h
    }

    /// Drop `n` payload bytes; a server that stops part-way is a timeout (the stream is out of
    /// step for good), as in every other receive here.
    private func drain(_ n: Int, _ cmd: VFIOUserCommand) throws {
        do { try connection.drain(n) } catch { throw receiveFailed(error, cmd) }
    }

    private func receive(into b: UnsafeMutableRawBufferPointer, _ cmd: VFIOUserCommand) throws {
        guard b.count > 0 else { return }
        do { _ = try connection.socket.receiveExactly(into: b, maxFDs: 0) } catch { throw receiveFailed(error, cmd) }
    }

    /// The next MIG_DATA_READ reply, its data received into `buffer` (sized for the request).
    /// libvfio-user pads the reply to the requested size: the data is `size` bytes, the rest
    /// is dropped.
    private func receiveMigDataReadReply(_ pipe: inout ReplyPipe, into buffer: UnsafeMutableRawBufferPointer) throws -> Int {
        let cmd = VFIOUserCommand.migDataRead
        let h = try takeReplyHeader(&pipe, cmd)
        let payload = h.payloadSize
        guard payload >= 8, payload <= 8 + buffer.count else {
            try drain(payload, cmd)
            throw VFIOUserClientError.protocolViolation("MIG_DATA_READ reply of \(payload) bytes for a \(buffer.count)-byte read (8 to \(8 + buffer.count) expected)")
        }
        var head = [UInt8](repeating: 0, count: 8)
        try head.withUnsafeMutableBytes { try receive(into: $0, cmd) }
        var r = WireReader(head, context: "MIG_DATA_READ reply")
        let argsz = try r.u32(), size = Int(try r.u32())
        guard size <= buffer.count, size <= payload - 8, UInt64(argsz) >= 8 + UInt64(size) else {
            try drain(payload - 8, cmd)
            throw VFIOUserClientError.protocolViolation("MIG_DATA_READ returned size \(size) (argsz \(argsz)) in a \(payload)-byte reply to a \(buffer.count)-byte read")
        }
        try receive(into: UnsafeMutableRawBufferPointer(rebasing: buffer[0..<size]), cmd)
        if payload - 8 - size > 0 {
            do { try connection.drain(payload - 8 - size) } catch { throw receiveFailed(error, cmd) }
        }
        return size
    }

    func receiveMigDataWriteReply(_ pipe: inout ReplyPipe) throws {
        let cmd = VFIOUserCommand.migDataWrite
        let h = try takeReplyHeader(&pipe, cmd)
        guard h.payloadSize <= 64 * 1024 else {
            try drain(h.payloadSize, cmd)
            throw VFIOUserClientError.protocolViolation("MIG_DATA_WRITE reply of \(h.payloadSize) bytes")
        }
        if h.payloadSize > 0 { do { try connection.drain(h.payloadSize) } catch { throw receiveFailed(error, cmd) } }
    }

    /// After a failure part-way through a pipeline: read and drop the replies still owed, so
    /// that the next call finds its own reply. A connection that cannot be brought back in step
    /// is marked broken.
    func drainAfterFailure(_ pipe: inout ReplyPipe) {
        guard broken == nil else { return }
        while pipe.outstanding > 0 {
            _ = pipe.next()
            do {
                let (h, got) = try awaitReplyHeader(.migDataRead)
                try discardReply(h, got, .migDataRead)
            } catch let e as VFIOUserClientError {
                if case .protocolViolation = e { continue }  // consumed, still in step
                if broken == nil { broken = e }
                return
            } catch {
                if broken == nil { broken = .protocolViolation("the migration data pipeline could not be brought back in step: \(error)") }
                return
            }
        }
    }
}
