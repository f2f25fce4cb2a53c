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
    /// `beforeWrite` runs before each MIG_DATA_WRITE (fault injection in tests). No request is
    /// sent past `maxBytes`: data that has not ended by then (every reply full) is an error, so
    /// that a server whose replies are never short cannot keep the relay going forever.
    ///
    /// On failure both connections are brought back in step (the outstanding replies are read
    /// and dropped) so that the caller can still move the devices back; if that fails too, the
    /// connection is marked broken and every later call says why.
    public func relayMigrationData(to destination: VFIOUserClient, chunk: Int = Int.max, depth: Int = 4, maxBytes: UInt64 = .max,
                                   beforeWrite: (() throws -> Void)? = nil) throws -> UInt64 {
        precondition(destination !== self, "relay to the same connection")
        let n = min(chunk, maxTransfer, destination.maxTransfer)
        guard n > 0 else { throw VFIOUserClientError.protocolViolation("max_data_xfer_size is 0: no migration data can move") }
        let depth = max(1, min(depth, 64))
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: n, alignment: 64)
        defer { buffer.deallocate() }
        // The data of each reply goes on socket → pipe → socket (splice), never entering user
        // space; where that is not available it is received into `buffer` and sent from there.
        var forwarder = options.spliceRelay ? SpliceForwarder() : nil
        defer { forwarder?.close() }
        return try callLock.withLock {
            try destination.callLock.withLock {
                try checkUsable()
                try destination.checkUsable()
                var reads = ReplyPipe(), writes = ReplyPipe()
                var moved: UInt64 = 0
                // Payload bytes of the current reply not yet taken off the source's socket.
                var unread = 0
                do {
                    var asked: UInt64 = 0
                    for _ in 0..<depth where asked < maxBytes { reads.expected.append(try sendMigDataRead(size: n)); asked += UInt64(n) }
                    var issuing = true
                    while reads.outstanding > 0 {
                        let (got, padding) = try receiveMigDataReadReplyHead(&reads, capacity: n)
                        unread = got + padding
                        // A short reply ends the data: no new requests, but the ones in flight
                        // are still answered in order, and whatever they carry is stream data.
                        if got < n { issuing = false } else if issuing && asked < maxBytes {
                            reads.expected.append(try sendMigDataRead(size: n)); asked += UInt64(n)
                        }
                        if got > 0 {
                            try beforeWrite?()
                            if writes.outstanding >= depth { try destination.receiveMigDataWriteReply(&writes) }
                            if forwarder != nil {
                                writes.expected.append(try destination.sendMigDataWriteHead(size: got))
                                try forward(got, to: destination, via: &forwarder, buffer: buffer, unread: &unread)
                            } else {
                                try receive(into: UnsafeMutableRawBufferPointer(rebasing: buffer[0..<got]), .migDataRead)
                                // Taken off the source: a failed send below must not drain them again.
                                unread -= got
                                writes.expected.append(try destination.sendMigDataWrite(UnsafeRawBufferPointer(rebasing: buffer[0..<got])))
                            }
                            moved += UInt64(got)
                        }
                        if unread > 0 { try drain(unread, .migDataRead) }
                        unread = 0
                    }
                    while writes.outstanding > 0 { try destination.receiveMigDataWriteReply(&writes) }
                    // Every reply was full up to the bound: the data did not end.
                    if issuing { throw DeviceMigrationError.dataDidNotEnd(moved: moved, bound: maxBytes) }
                } catch {
                    // A reply whose payload is still (partly) on the socket: read it off first.
                    if unread > 0, broken == nil {
                        do { try connection.drain(unread) } catch { _ = markBroken(.protocolViolation("MIG_DATA_READ reply cut short: \(transportError(error, .migDataRead))")) }
                    }
                    drainAfterFailure(&reads)
                    destination.drainAfterFailure(&writes)
                    throw error
                }
                return moved
            }
        }
    }

    /// Move `count` payload bytes from this connection's socket to the destination's, after
    /// the MIG_DATA_WRITE header went out: spliced, or through `buffer` if splice is refused
    /// (then `forwarder` is dropped and later messages take the plain path). `unread` (the
    /// reply's bytes still on the source) goes down by `count` once they are all off it.
    /// The destination failing part-way leaves its stream mid-message (broken); the source's
    /// rest of the data is then read off and dropped, so that the source device can still be
    /// moved back to RUNNING (a destination that stopped reading cost the source its device).
    /// The source failing part-way breaks both.
    private func forward(_ count: Int, to destination: VFIOUserClient, via forwarder: inout SpliceForwarder?,
                         buffer: UnsafeMutableRawBufferPointer, unread: inout Int) throws {
        var left = count
        // Bytes of `count` taken off the source; whether the failure is the destination's.
        var taken = 0
        var atDestination = false
        let deadline = replyDeadline()
        defer { if taken == count { unread -= count } }
        do {
            while left > 0 {
                if let f = forwarder {
                    // Part-way through a message: a give-up leaves the stream out of step.
                    do { try awaitReadable(.migDataRead, deadline: deadline) } catch let e as VFIOUserClientError { throw markBroken(e) }
                    switch try f.move(from: connection.socket.fd.rawValue, to: destination.connection.socket.fd.rawValue, max: left) {
                    case let .moved(k):
                        left -= k
                        taken += k
                    case let .unsupported(sent, stranded):
                        taken += sent + stranded
                        // Bytes already in the pipe go on by hand; the rest by the plain path.
                        Log.debug("vfio-user", "splice relay refused by the kernel: receiving into a buffer instead")
                        forwarder = nil
                        defer { f.close() }
                        left -= sent
                        if stranded > 0 {
                            let b = UnsafeMutableRawBufferPointer(rebasing: buffer[0..<stranded])
                            try f.drainPipe(into: b)
                            atDestination = true
                            try destination.sendRaw(UnsafeRawBufferPointer(b))
                            atDestination = false
                            left -= stranded
                        }
                    }
                    continue
                }
                let k = min(left, buffer.count)
                let b = UnsafeMutableRawBufferPointer(rebasing: buffer[0..<k])
                try receive(into: b, .migDataRead)
                taken += k
                atDestination = true
                try destination.sendRaw(UnsafeRawBufferPointer(b))
                atDestination = false
                left -= k
            }
        } catch {
            var e = error
            if let f = error as? SpliceForwarder.Failure {
                if !f.atSource { atDestination = true; taken += f.taken }
                e = f.atSource ? transportError(f.errno, .migDataRead) : destination.transportError(f.errno, .migDataWrite)
            }
            if atDestination, broken == nil {
                do { try connection.drain(count - taken); taken = count } catch {
                    _ = markBroken(.protocolViolation("MIG_DATA_READ data could not be read off after the destination failed: \(transportError(error, .migDataRead))"))
                }
            }
            if broken == nil, !atDestination { _ = markBroken(.protocolViolation("MIG_DATA_READ data stopped part-way (\(count - left) of \(count) bytes relayed): \(e)")) }
            if destination.broken == nil {
                _ = destination.markBroken(.protocolViolation("MIG_DATA_WRITE cut part-way (\(count - left) of \(count) bytes sent): \(e)"))
            }
            throw e
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
        try settleOwedReplies()
    }

    private func sendMigDataRead(size n: Int) throws -> UInt16 {
        let id = connection.allocateID()
        var w = WireWriter(capacity: 8); w.u32(UInt32(8 + n)); w.u32(UInt32(n))
        do {
            try w.bytes.withUnsafeBytes { try connection.send(id: id, command: VFIOUserCommand.migDataRead.rawValue, flags: MessageHeader.typeCommand, payload: [$0]) }
        } catch { throw transportError(error, .migDataRead) }
        return id
    }

    func sendMigDataWrite(_ data: UnsafeRawBufferPointer) throws -> UInt16 {
        let id = connection.allocateID()
        var w = WireWriter(capacity: 8); w.u32(UInt32(8 + data.count)); w.u32(UInt32(data.count))
        do {
            try w.bytes.withUnsafeBytes { try connection.send(id: id, command: VFIOUserCommand.migDataWrite.rawValue, flags: MessageHeader.typeCommand, payload: [$0, data]) }
        } catch { throw transportError(error, .migDataWrite) }
        return id
    }

    /// The MIG_DATA_WRITE header and `{argsz, size}`; the caller sends the `size` data bytes.
    func sendMigDataWriteHead(size: Int) throws -> UInt16 {
        let id = connection.allocateID()
        var w = WireWriter(capacity: 8); w.u32(UInt32(8 + size)); w.u32(UInt32(size))
        let header = MessageHeader(messageID: id, command: VFIOUserCommand.migDataWrite.rawValue,
                                   messageSize: UInt32(MessageHeader.size + 8 + size), flags: MessageHeader.typeCommand, errorNumber: 0).bytes
        do { try (header + w.bytes).withUnsafeBytes { try connection.socket.send([$0]) } } catch { throw transportError(error, .migDataWrite) }
        return id
    }

    /// Bytes that continue a message already begun on the socket.
    func sendRaw(_ data: UnsafeRawBufferPointer) throws {
        do { try connection.socket.send([data]) } catch { throw transportError(error, .migDataWrite) }
    }

    /// The header of the next reply on the main socket, within the reply's bounds (see
    /// ReplyBound) and the cancel descriptor. Its payload is not read yet.
    private func awaitReplyHeader(_ cmd: VFIOUserCommand) throws -> (MessageHeader, ReceivedFDs) {
        var bound = replyBound()
        while true {
            try awaitReadable(cmd, bound)
            let (h, got): (MessageHeader, ReceivedFDs)
            do { (h, got) = try connection.receiveHeader(deadline: bound.overall) } catch { throw transportError(error, cmd) }
            if h.isCommand {
                let m: Message
                do { m = try connection.receiveBody(h, got, deadline: bound.overall) } catch { throw transportError(error, cmd) }
                serveServerCommand(m, on: connection)
                bound.served()
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
        } catch { throw transportError(error, cmd) }
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
            throw markBroken(.protocolViolation("\(cmd) reply: message size \(h.messageSize) is smaller than the 16-byte header"))
        }
        return h
    }

    /// Drop `n` payload bytes; a server that stops part-way is a timeout (the stream is out of
    /// step for good), as in every other receive here.
    private func drain(_ n: Int, _ cmd: VFIOUserCommand) throws {
        do { try connection.drain(n) } catch { throw transportError(error, cmd) }
    }

    private func receive(into b: UnsafeMutableRawBufferPointer, _ cmd: VFIOUserCommand) throws {
        guard b.count > 0 else { return }
        do { _ = try connection.socket.receiveExactly(into: b, maxFDs: 0) } catch { throw transportError(error, cmd) }
    }

    /// The next MIG_DATA_READ reply up to its data: header and `{argsz, size}` checked against
    /// a read of `capacity` bytes before a byte of data is taken. Returns the data size and the
    /// padding after it (libvfio-user pads the reply to the requested size), both still on the
    /// socket. A reply that is refused is consumed whole.
    private func receiveMigDataReadReplyHead(_ pipe: inout ReplyPipe, capacity: Int) throws -> (size: Int, padding: Int) {
        let cmd = VFIOUserCommand.migDataRead
        let h = try takeReplyHeader(&pipe, cmd)
        let payload = h.payloadSize
        guard payload >= 8, payload <= 8 + capacity else {
            try drain(payload, cmd)
            throw VFIOUserClientError.protocolViolation("MIG_DATA_READ reply of \(payload) bytes for a \(capacity)-byte read (8 to \(8 + capacity) expected)")
        }
        var head = [UInt8](repeating: 0, count: 8)
        try head.withUnsafeMutableBytes { try receive(into: $0, cmd) }
        var r = WireReader(head, context: "MIG_DATA_READ reply")
        let argsz = try r.u32(), size = Int(try r.u32())
        guard size <= capacity, size <= payload - 8, UInt64(argsz) >= 8 + UInt64(size) else {
            try drain(payload - 8, cmd)
            throw VFIOUserClientError.protocolViolation("MIG_DATA_READ returned size \(size) (argsz \(argsz)) in a \(payload)-byte reply to a \(capacity)-byte read")
        }
        return (size, payload - 8 - size)
    }

    /// The next MIG_DATA_READ reply, its data received into `buffer` (sized for the request).
    private func receiveMigDataReadReply(_ pipe: inout ReplyPipe, into buffer: UnsafeMutableRawBufferPointer) throws -> Int {
        let (size, padding) = try receiveMigDataReadReplyHead(&pipe, capacity: buffer.count)
        try receive(into: UnsafeMutableRawBufferPointer(rebasing: buffer[0..<size]), .migDataRead)
        if padding > 0 { try drain(padding, .migDataRead) }
        return size
    }

    func receiveMigDataWriteReply(_ pipe: inout ReplyPipe) throws {
        let cmd = VFIOUserCommand.migDataWrite
        let h = try takeReplyHeader(&pipe, cmd)
        guard h.payloadSize <= 64 * 1024 else {
            try drain(h.payloadSize, cmd)
            throw VFIOUserClientError.protocolViolation("MIG_DATA_WRITE reply of \(h.payloadSize) bytes")
        }
        if h.payloadSize > 0 { try drain(h.payloadSize, cmd) }
    }

    /// After a failure part-way through a pipeline: read and drop the replies still owed, so
    /// that the next call finds its own reply. A connection that cannot be brought back in step
    /// is marked broken.
    func drainAfterFailure(_ pipe: inout ReplyPipe) {
        guard broken == nil else { return }
        while pipe.outstanding > 0 {
            // A wait given up (timeout, cancel): the rest are owed, dropped when they come.
            if cutWait != nil {
                owedReplies += pipe.expected[pipe.head...]
                pipe.head = pipe.expected.count
                return
            }
            let id = pipe.next()
            do {
                let (h, got) = try awaitReplyHeader(.migDataRead)
                try discardReply(h, got, .migDataRead)
            } catch let e as VFIOUserClientError {
                if case .protocolViolation = e { continue }  // consumed, still in step
                if cutWait != nil { owedReplies.append(id); continue }
                if broken == nil { broken = e }
                return
            } catch {
                if broken == nil { broken = .protocolViolation("the migration data pipeline could not be brought back in step: \(error)") }
                return
            }
        }
    }
}
