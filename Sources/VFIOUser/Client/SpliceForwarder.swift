import Glibc
import SystemCalls

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

    // glibc's splice and pipe2 are GNU extensions the Glibc module does not import: looked up once.
    private typealias SpliceFunction = @convention(c) (Int32, UnsafeMutablePointer<Int64>?, Int32, UnsafeMutablePointer<Int64>?, Int, UInt32) -> Int
    private typealias Pipe2Function = @convention(c) (UnsafeMutablePointer<Int32>?, Int32) -> Int32
    private static let spliceFunction: SpliceFunction? = dlsym(nil, "splice").map { unsafeBitCast($0, to: SpliceFunction.self) }
    private static let pipe2Function: Pipe2Function? = dlsym(nil, "pipe2").map { unsafeBitCast($0, to: Pipe2Function.self) }
    private static let moveFlag: UInt32 = 1  // SPLICE_F_MOVE
    private static let setPipeSize: Int32 = 1024 + 7  // F_SETPIPE_SZ (F_LINUX_SPECIFIC_BASE + 7)

    /// Fault injection for tests: the pipe → socket step is refused (the data already in the
    /// pipe must then go on by hand).
    nonisolated(unsafe) static var refuseSendForTesting = false

    private let readEnd: Int32
    private let writeEnd: Int32
    private let capacity: Int
    private let refuseSend: Bool

    init?() {
        guard Self.spliceFunction != nil, let pipe2 = Self.pipe2Function else { return nil }
        var p: [Int32] = [-1, -1]
        guard pipe2(&p, Int32(O_CLOEXEC)) == 0 else { return nil }
        readEnd = p[0]
        writeEnd = p[1]
        // A 1 MiB pipe (the unprivileged maximum by default) moves a whole message per splice.
        let c = fcntl(p[1], Self.setPipeSize, Int32(1 << 20))
        capacity = c > 0 ? Int(c) : 64 * 1024
        refuseSend = Self.refuseSendForTesting
    }

    func close() {
        Glibc.close(readEnd)
        Glibc.close(writeEnd)
    }

    private static func isUnsupported(_ e: Int32) -> Bool { e == EINVAL || e == ENOSYS || e == EOPNOTSUPP }

    /// Up to `max` bytes from `source` (waiting at most its SO_RCVTIMEO) through the pipe to
    /// `destination` (at most its SO_SNDTIMEO per step). The pipe is empty again on return.
    func move(from source: Int32, to destination: Int32, max: Int) throws -> Outcome {
        let splice = Self.spliceFunction!
        var n: Int
        repeat { n = splice(source, nil, writeEnd, nil, min(max, capacity), Self.moveFlag) } while n < 0 && errno == EINTR
        if n < 0 {
            let e = errno
            if Self.isUnsupported(e) { return .unsupported(moved: 0, stranded: 0) }
            throw Failure(errno: Errno(e), atSource: true)
        }
        // End of stream in the middle of a message (the caller asked only for bytes it is owed).
        if n == 0 { throw Failure(errno: .EPROTO, atSource: true) }
        var out = 0
        while out < n {
            if refuseSend { return .unsupported(moved: out, stranded: n - out) }
            let k = splice(readEnd, nil, destination, nil, n - out, Self.moveFlag)
            if k < 0 {
                let e = errno
                if e == EINTR { continue }
                if Self.isUnsupported(e) { return .unsupported(moved: out, stranded: n - out) }
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
