import CVFIOLive
import Glibc

/// A failed system call: the errno it set. Reads as a message (`EINVAL (Invalid argument)`).
public struct Errno: Error, Equatable, Hashable, CustomStringConvertible, Sendable {
    public let rawValue: Int32
    public init(_ rawValue: Int32) { self.rawValue = rawValue }

    /// The calling thread's current errno.
    public static var current: Errno { Errno(vl_errno()) }

    public static let EPERM = Errno(Glibc.EPERM)
    public static let ENOENT = Errno(Glibc.ENOENT)
    public static let EINTR = Errno(Glibc.EINTR)
    public static let EIO = Errno(Glibc.EIO)
    public static let EBADF = Errno(Glibc.EBADF)
    public static let EAGAIN = Errno(Glibc.EAGAIN)
    public static let ENOMEM = Errno(Glibc.ENOMEM)
    public static let EFAULT = Errno(Glibc.EFAULT)
    public static let EBUSY = Errno(Glibc.EBUSY)
    public static let EEXIST = Errno(Glibc.EEXIST)
    public static let EINVAL = Errno(Glibc.EINVAL)
    public static let ENOSPC = Errno(Glibc.ENOSPC)
    public static let ENOTTY = Errno(Glibc.ENOTTY)
    public static let EPIPE = Errno(Glibc.EPIPE)
    public static let ERANGE = Errno(Glibc.ERANGE)
    public static let ENOSYS = Errno(Glibc.ENOSYS)
    public static let EMSGSIZE = Errno(Glibc.EMSGSIZE)
    public static let EPROTO = Errno(Glibc.EPROTO)
    public static let ENOTSUP = Errno(Glibc.EOPNOTSUPP)
    public static let E2BIG = Errno(Glibc.E2BIG)
    public static let ECONNRESET = Errno(Glibc.ECONNRESET)
    public static let ETIMEDOUT = Errno(Glibc.ETIMEDOUT)
    public static let ENOMSG = Errno(Glibc.ENOMSG)
    public static let EOVERFLOW = Errno(Glibc.EOVERFLOW)
    public static let EACCES = Errno(Glibc.EACCES)

    public var name: String {
        let names: [Int32: String] = [
            Glibc.EPERM: "EPERM", Glibc.ENOENT: "ENOENT", Glibc.EINTR: "EINTR", Glibc.EIO: "EIO",
            Glibc.EBADF: "EBADF", Glibc.EAGAIN: "EAGAIN", Glibc.ENOMEM: "ENOMEM", Glibc.EFAULT: "EFAULT",
            Glibc.EBUSY: "EBUSY", Glibc.EEXIST: "EEXIST", Glibc.EINVAL: "EINVAL", Glibc.ENOSPC: "ENOSPC",
            Glibc.ENOTTY: "ENOTTY", Glibc.EPIPE: "EPIPE", Glibc.ERANGE: "ERANGE", Glibc.ENOSYS: "ENOSYS",
            Glibc.EMSGSIZE: "EMSGSIZE", Glibc.EPROTO: "EPROTO", Glibc.EOPNOTSUPP: "EOPNOTSUPP",
            Glibc.E2BIG: "E2BIG", Glibc.ECONNRESET: "ECONNRESET", Glibc.ETIMEDOUT: "ETIMEDOUT",
            Glibc.ENOMSG: "ENOMSG", Glibc.EOVERFLOW: "EOVERFLOW", Glibc.EACCES: "EACCES",
            Glibc.ECONNREFUSED: "ECONNREFUSED", Glibc.ENAMETOOLONG: "ENAMETOOLONG",
        ]
        return names[rawValue] ?? "errno \(rawValue)"
    }

    public var description: String {
        "\(name) (\(String(cString: strerror(rawValue))))"
    }
}

/// The one wrapper every syscall goes through: retries EINTR, turns -1 into a thrown `Errno`.
@inline(__always)
public func syscallRetryingEINTR<T: FixedWidthInteger>(_ body: () -> T) throws -> T {
    while true {
        let result = body()
        if result != -1 { return result }
        let err = Errno.current
        if err == .EINTR { continue }
        throw err
    }
}
