import CVFIOLive
import Glibc
import SystemCalls

/// Bounded waits on a vfio-user server's socket: a connect that a full backlog would block, and
/// the kernel-side send/receive timeouts that bound a stall in the middle of a message.
extension UnixSocket {
    /// Connect to `path`, giving up after `timeoutMilliseconds` (an AF_UNIX connect blocks while
    /// the listener's backlog is full, e.g. a one-client server busy with another VMM). Tries in
    /// slices of at most 250 ms so that `cancel` (an eventfd written by a signal handler) is
    /// honoured meanwhile. Throws ETIMEDOUT or ECANCELED; other errors are connect's own.
    public static func connect(path: String, timeoutMilliseconds: Int32, cancel: Int32? = nil) throws -> UnixSocket {
        guard path.utf8.count < UnixSocket.maxPathBytes else { throw Errno(ENAMETOOLONG) }
        let deadline = monotonicNanoseconds() + UInt64(max(timeoutMilliseconds, 0)) * 1_000_000
        while true {
            if let c = cancel, (try? Poll.waitAnyReadable([c], timeoutMilliseconds: 0)) == 0 { throw Errno(ECANCELED) }
            let now = monotonicNanoseconds()
            guard now < deadline else { throw Errno(ETIMEDOUT) }
            let slice = Int32(min((deadline - now) / 1_000_000 + 1, 250))
            let raw = try syscallRetryingEINTR { socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0) }
            let s = UnixSocket(adopting: FileDescriptor(adopting: raw))
            // A blocking AF_UNIX connect waits for backlog room for at most SO_SNDTIMEO.
            try s.setTimeouts(milliseconds: slice)
            let rc = path.withCString { vl_unix_connect(raw, $0) }
            if rc == 0 { return s }
            let e = Errno.current
            s.close()
            guard e == .EAGAIN || e == .EINTR else { throw e }
        }
    }

    /// SO_RCVTIMEO and SO_SNDTIMEO: a recvmsg or sendmsg that makes no progress for this long
    /// fails with EAGAIN instead of blocking for good. 0 means no limit (the kernel's rule).
    public func setTimeouts(milliseconds: Int32) throws {
        var tv = timeval(tv_sec: Int(milliseconds / 1000), tv_usec: Int(milliseconds % 1000) * 1000)
        for opt in [SO_RCVTIMEO, SO_SNDTIMEO] {
            _ = try syscallRetryingEINTR { setsockopt(fd.rawValue, SOL_SOCKET, opt, &tv, socklen_t(MemoryLayout<timeval>.size)) }
        }
    }

    /// What a vfio-user stream may hold unread in the kernel: device state moves in messages of
    /// up to max_data_xfer_size (1 MiB), and with the default (about 200 KiB) every such message
    /// blocks its sender until the peer has read most of it, so the two ends of a pipelined
    /// relay take turns instead of running at once. The kernel caps it at net.core.wmem_max.
    public static let streamSendBuffer: Int32 = 4 << 20

    /// SO_SNDBUF (best effort: a smaller cap only costs speed).
    public func setSendBuffer(bytes: Int32 = UnixSocket.streamSendBuffer) {
        var v = bytes
        _ = setsockopt(fd.rawValue, SOL_SOCKET, SO_SNDBUF, &v, socklen_t(MemoryLayout<Int32>.size))
    }

    /// sun_path holds 108 bytes including the terminating NUL.
    public static let maxPathBytes = 108
}
