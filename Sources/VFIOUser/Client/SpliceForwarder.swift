import Glibc
import SystemCalls

/// splice(2), vmsplice(2) and pipe2(2): GNU extensions the Glibc module does not import, looked
/// up once, and what both splice paths share.
enum SpliceCalls {
    typealias Splice = @convention(c) (Int32, UnsafeMutablePointer<Int64>?, Int32, UnsafeMutablePointer<Int64>?, Int, UInt32) -> Int
    typealias Vmsplice = @convention(c) (Int32, UnsafePointer<iovec>?, Int, UInt32) -> Int
    private typealias Pipe2 = @convention(c) (UnsafeMutablePointer<Int32>?, Int32) -> Int32
    static let splice: Splice? = dlsym(nil, "splice").map { unsafeBitCast($0, to: Splice.self) }
    static let vmsplice: Vmsplice? = dlsym(nil, "vmsplice").map { unsafeBitCast($0, to: Vmsplice.self) }
    private static let pipe2: Pipe2? = dlsym(nil, "pipe2").map { unsafeBitCast($0, to: Pipe2.self) }
    static let moveFlag: UInt32 = 1  // SPLICE_F_MOVE
    static let nonblockFlag: UInt32 = 2  // SPLICE_F_NONBLOCK
    private static let setPipeSize: Int32 = 1024 + 7  // F_SETPIPE_SZ (F_LINUX_SPECIFIC_BASE + 7)

    /// The errors by which the kernel refuses splicing between these files (the caller then
    /// takes the plain path).
    static func isUnsupported(_ e: Int32) -> Bool { e == EINVAL || e == ENOSYS || e == EOPNOTSUPP }

    /// A pipe of 1 MiB (the unprivileged maximum by default: a whole message per splice), or
    /// nil where pipe2 is missing or fails; `capacity` is what the kernel gave.
    static func pipe(flags: Int32) -> (readEnd: Int32, writeEnd: Int32, capacity: Int)? {
        guard let pipe2 else { return nil }
        var p: [Int32] = [-1, -1]
        guard pipe2(&p, O_CLOEXEC | flags) == 0 else { return nil }
        let c = fcntl(p[1], setPipeSize, Int32(1 << 20))
        return (p[0], p[1], c > 0 ? Int(c) : 64 * 1024)
    }
}

/// socket → pipe → socket with splice(2), for the device-state relay: an AF_UNIX stream socket
/// hands its received pages to a pipe (unix_stream_splice_read) and takes pages from one
/// (MSG_SPLICE_PAGES, Linux 6.5 and later), so a MIG_DATA_READ reply's data goes on as a
/// MIG_DATA_WRITE's without being copied into and out of user space. Where the kernel refuses
/// (EINVAL, ENOSYS, EOPNOTSUPP), the caller falls back to receiving into a buffer.
struct SpliceForwarder {
    enum Outcome {
        case moved(Int)
        /// splice is refused; `moved` bytes reached the destination, `stranded` are in the pipe.
        case unsupported(moved: Int, stranded: Int)
    }
    /// A socket failed part-way: `source` (the reply being read) or the destination.
    struct Failure: Error {
        var errno: Errno
        var atSource: Bool
        /// Bytes this step took off the source before the destination failed.
        var taken = 0
    }

    /// Fault injection for tests: the pipe → socket step is refused (the data already in the
    /// pipe must then go on by hand).
    nonisolated(unsafe) static var refuseSendForTesting = false

    private let readEnd: Int32
    private let writeEnd: Int32
    private let capacity: Int
    private let refuseSend: Bool

    init?() {
        guard SpliceCalls.splice != nil, let p = SpliceCalls.pipe(flags: 0) else { return nil }
        (readEnd, writeEnd, capacity) = p
        refuseSend = Self.refuseSendForTesting
    }

    func close() {
        Glibc.close(readEnd)
        Glibc.close(writeEnd)
    }

    /// Up to `max` bytes from `source` (waiting at most its SO_RCVTIMEO) through the pipe to
    /// `destination` (at most its SO_SNDTIMEO per step). The pipe is empty again on return.
    func move(from source: Int32, to destination: Int32, max: Int) throws -> Outcome {
        try withSIGPIPEHeld { try moveHeld(from: source, to: destination, max: max) }
    }

    private func moveHeld(from source: Int32, to destination: Int32, max: Int) throws -> Outcome {
        let splice = SpliceCalls.splice!
        var n: Int
        repeat { n = splice(source, nil, writeEnd, nil, min(max, capacity), SpliceCalls.moveFlag) } while n < 0 && errno == EINTR
        if n < 0 {
            let e = errno
            if SpliceCalls.isUnsupported(e) { return .unsupported(moved: 0, stranded: 0) }
            throw Failure(errno: Errno(e), atSource: true)
        }
        // End of stream in the middle of a message (the caller asked only for bytes it is owed).
        if n == 0 { throw Failure(errno: .EPROTO, atSource: true) }
        var out = 0
        while out < n {
            if refuseSend { return .unsupported(moved: out, stranded: n - out) }
            let k = splice(readEnd, nil, destination, nil, n - out, SpliceCalls.moveFlag)
            if k < 0 {
                let e = errno
                if e == EINTR { continue }
                if SpliceCalls.isUnsupported(e) { return .unsupported(moved: out, stranded: n - out) }
                throw Failure(errno: Errno(e), atSource: false, taken: n)
            }
            if k == 0 { throw Failure(errno: .EPIPE, atSource: false, taken: n) }
            out += k
        }
        return .moved(n)
    }

    /// The bytes left in the pipe after `unsupported`, into `buffer` (exactly its size).
    func drainPipe(into buffer: UnsafeMutableRawBufferPointer) throws {
        var got = 0
        while got < buffer.count {
            let k = read(readEnd, buffer.baseAddress! + got, buffer.count - got)
            if k < 0 { if errno == EINTR { continue }; throw Failure(errno: Errno(errno), atSource: true) }
            if k == 0 { throw Failure(errno: .EPROTO, atSource: true) }
            got += k
        }
    }
}

/// The source server's side of the device-state path: a MIG_DATA_READ reply whose data lies in
/// memory that stays unchanged until the peer has read it (a stopped device's memory, see
/// `MigratableDevice.readMigrationDataPieces`) goes to the socket by reference: vmsplice puts
/// its pages in a pipe and splice hands them to the socket (MSG_SPLICE_PAGES), so the kernel
/// does not copy them; the bytes on the wire are the same. Everything else (headers, scratch)
/// is written into the pipe, which copies it, so its buffer may be reused at once.
final class SpliceSender {
    enum Piece {
        /// Copied into the pipe: the caller may reuse the buffer on return.
        case copy(UnsafeRawBufferPointer)
        /// Sent by reference: must not change until the peer has received it.
        case reference(UnsafeRawBufferPointer)
        var bytes: UnsafeRawBufferPointer { switch self { case let .copy(b), let .reference(b): return b } }
    }

    /// Fault injection for tests: the pipe → socket step is refused (what is in the pipe must
    /// then go on by hand, and the rest by plain sends).
    nonisolated(unsafe) static var refuseSendForTesting = false

    private let readEnd: Int32
    private let writeEnd: Int32
    private let refuseSend: Bool
    /// Bytes written into the pipe and not yet spliced to the socket.
    private var inPipe = 0
    /// The kernel refused a step once: every later reply takes the plain path.
    private(set) var disabled = false

    init?() {
        // Non-blocking pipe: a full pipe says EAGAIN (then it is flushed to the socket) instead
        // of waiting for a reader that is this same thread.
        guard SpliceCalls.vmsplice != nil, SpliceCalls.splice != nil, let p = SpliceCalls.pipe(flags: O_NONBLOCK) else { return nil }
        (readEnd, writeEnd, _) = p
        refuseSend = Self.refuseSendForTesting
    }

    deinit {
        Glibc.close(readEnd)
        Glibc.close(writeEnd)
    }

    /// Send `pieces` in order to the stream socket `socket` (blocking, with its SO_SNDTIMEO).
    /// Where the kernel refuses splicing, the bytes already in the pipe and the rest are sent
    /// with `plainSend` and the sender is disabled. Throws the errno of a socket that fails.
    func send(_ pieces: [Piece], to socket: Int32, plainSend: ([UnsafeRawBufferPointer]) throws -> Void) throws {
        precondition(inPipe == 0)
        var i = 0, off = 0
        do {
            try sendSpliced(pieces, &i, &off, to: socket)
        } catch is Unsupported {
            disabled = true
            Log.debug("vfio-user", "splice send refused by the kernel: MIG_DATA_READ replies are copied instead")
            // What is in the pipe goes first, by hand; then the rest of this reply.
            try drainPipe(plainSend)
            var rest: [UnsafeRawBufferPointer] = []
            if i < pieces.count {
                let b = pieces[i].bytes
                rest.append(UnsafeRawBufferPointer(rebasing: b[off...]))
                rest += pieces[(i + 1)...].map(\.bytes)
            }
            try plainSend(rest)
        } catch {
            // The socket failed: the pipe is emptied so that the next reply (perhaps on
            // another connection) starts clean.
            discardPipe()
            throw error
        }
    }

    private func sendSpliced(_ pieces: [Piece], _ i: inout Int, _ off: inout Int, to socket: Int32) throws {
        if disabled { throw Unsupported() }
        while i < pieces.count {
            let b = pieces[i].bytes
            if off == b.count { i += 1; off = 0; continue }
            let n: Int
            switch pieces[i] {
            case .reference:
                var v = iovec(iov_base: UnsafeMutableRawPointer(mutating: b.baseAddress! + off), iov_len: b.count - off)
                n = SpliceCalls.vmsplice!(writeEnd, &v, 1, SpliceCalls.nonblockFlag)
            case .copy:
                n = Glibc.write(writeEnd, b.baseAddress! + off, b.count - off)
            }
            if n > 0 { off += n; inPipe += n; continue }
            let e = errno
            if n < 0 && e == EINTR { continue }
            if n < 0 && e == EAGAIN && inPipe > 0 { try flush(to: socket); continue }
            if n < 0 && SpliceCalls.isUnsupported(e) { throw Unsupported() }
            throw Errno(n < 0 ? e : EIO)
        }
        try flush(to: socket)
    }

    private func discardPipe() {
        var scratch = [UInt8](repeating: 0, count: 64 * 1024)
        while inPipe > 0 {
            let k = scratch.withUnsafeMutableBytes { Glibc.read(readEnd, $0.baseAddress!, Swift.min($0.count, inPipe)) }
            if k < 0 && errno == EINTR { continue }
            if k <= 0 { break }
            inPipe -= k
        }
        inPipe = 0
    }

    private struct Unsupported: Error {}

    /// Splice everything in the pipe to the socket. SIGPIPE (splice does not take
    /// MSG_NOSIGNAL) is held back and consumed: a closed peer is EPIPE, as for sendmsg.
    private func flush(to socket: Int32) throws {
        guard inPipe > 0 else { return }
        if refuseSend { throw Unsupported() }
        try withSIGPIPEHeld { try flushHeld(to: socket) }
    }

    private func flushHeld(to socket: Int32) throws {
        while inPipe > 0 {
            let k = SpliceCalls.splice!(readEnd, nil, socket, nil, inPipe, 0)
            if k > 0 { inPipe -= k; continue }
            let e = errno
            if k < 0 && e == EINTR { continue }
            if k < 0 && SpliceCalls.isUnsupported(e) { throw Unsupported() }
            throw Errno(k < 0 ? e : EPIPE)
        }
    }

    /// The pipe's bytes, sent with `plainSend` (the kernel refused the splice).
    private func drainPipe(_ plainSend: ([UnsafeRawBufferPointer]) throws -> Void) throws {
        guard inPipe > 0 else { return }
        let b = UnsafeMutableRawBufferPointer.allocate(byteCount: inPipe, alignment: 16)
        defer { b.deallocate() }
        var got = 0
        while got < b.count {
            let k = Glibc.read(readEnd, b.baseAddress! + got, b.count - got)
            if k < 0 && errno == EINTR { continue }
            guard k > 0 else { throw Errno(k < 0 ? errno : EIO) }
            got += k
        }
        inPipe = 0
        try plainSend([UnsafeRawBufferPointer(b)])
    }
}

/// Runs `body` with SIGPIPE blocked on this thread and a SIGPIPE it raised consumed: splice(2)
/// to a socket takes no MSG_NOSIGNAL, and a process that does not ignore SIGPIPE (a VMM, a test
/// runner) would otherwise die when the peer hangs up. A closed peer is then EPIPE, as for
/// sendmsg with MSG_NOSIGNAL. A SIGPIPE already pending before the call is left pending.
func withSIGPIPEHeld<T>(_ body: () throws -> T) rethrows -> T {
    var block = sigset_t(), old = sigset_t(), before = sigset_t()
    sigemptyset(&block)
    sigaddset(&block, SIGPIPE)
    sigpending(&before)
    pthread_sigmask(SIG_BLOCK, &block, &old)
    defer {
        var pending = sigset_t()
        sigpending(&pending)
        if sigismember(&pending, SIGPIPE) == 1, sigismember(&before, SIGPIPE) == 0, sigismember(&old, SIGPIPE) == 0 {
            var zero = timespec()
            _ = sigtimedwait(&block, nil, &zero)
        }
        pthread_sigmask(SIG_SETMASK, &old, nil)
    }
    return try body()
}
