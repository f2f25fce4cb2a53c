import CVFIOLive
import Glibc

/// An mmap'd range, unmapped exactly once when released.
public final class MappedRegion: @unchecked Sendable {
    public let base: UnsafeMutableRawPointer
    public let length: Int
    private var unmapped = false

    /// Map `length` bytes of `fd` at `offset`, shared, read/write unless `writable` is false.
    public init(fd: FileDescriptor, offset: UInt64 = 0, length: Int, writable: Bool = true,
                populate: Bool = false) throws {
        guard length > 0 else { throw Errno.EINVAL }
        var prot = PROT_READ
        if writable { prot |= PROT_WRITE }
        var flags = MAP_SHARED
        if populate { flags |= MAP_POPULATE }
        let p = mmap(nil, length, prot, flags, fd.rawValue, off_t(offset))
        guard let p, p != MAP_FAILED else { throw Errno.current }
        base = p
        self.length = length
    }

    /// Anonymous private memory (page aligned, zeroed). `populate` faults it in at once, which
    /// is far cheaper than page by page on shadow-paging hosts.
    public init(anonymous length: Int, populate: Bool = false) throws {
        guard length > 0 else { throw Errno.EINVAL }
        let p = mmap(nil, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | (populate ? MAP_POPULATE : 0), -1, 0)
        guard let p, p != MAP_FAILED else { throw Errno.current }
        base = p
        self.length = length
    }

    public var buffer: UnsafeMutableRawBufferPointer {
        UnsafeMutableRawBufferPointer(start: base, count: length)
    }

    public func unmap() {
        if !unmapped { unmapped = true; munmap(base, length) }
    }

    deinit { unmap() }
}

public enum MemFD {
    /// A sealed-size-capable memfd of `size` bytes (MFD_CLOEXEC | MFD_ALLOW_SEALING).
    public static func create(name: String, size: UInt64) throws -> FileDescriptor {
        let raw = try name.withCString { n in
            try syscallRetryingEINTR { vl_memfd_create(n, VL_MFD_CLOEXEC | VL_MFD_ALLOW_SEALING) }
        }
        let fd = FileDescriptor(adopting: raw)
        try fd.truncate(to: size)
        // Guest RAM and device memory never shrink. Sealing that (as QEMU's memfd backend does)
        // lets a vfio-user server mmap the fd: it refuses to mmap one that could shrink under it.
        _ = fcntl(raw, 1033 /* F_ADD_SEALS */, 0x0002 /* F_SEAL_SHRINK */)
        return fd
    }
}

/// An eventfd: the interrupt line between a device and its VMM.
public final class EventFD: @unchecked Sendable {
    public let fd: FileDescriptor

    public init(semaphore: Bool = false, nonBlocking: Bool = false) throws {
        var flags = Int32(EFD_CLOEXEC)
        if semaphore { flags |= Int32(EFD_SEMAPHORE) }
        if nonBlocking { flags |= Int32(EFD_NONBLOCK) }
        let raw = try syscallRetryingEINTR { eventfd(0, flags) }
        fd = FileDescriptor(adopting: raw)
    }

    public init(adopting fd: FileDescriptor) { self.fd = fd }

    /// Add `value` to the counter (signals the interrupt).
    public func signal(_ value: UInt64 = 1) throws {
        var v = value
        _ = try withUnsafeBytes(of: &v) { try fd.write($0) }
    }

    /// Read and reset the counter; blocks unless the eventfd is non-blocking (then EAGAIN → 0).
    public func consume() throws -> UInt64 {
        var v: UInt64 = 0
        do {
            _ = try withUnsafeMutableBytes(of: &v) { try fd.read(into: $0) }
        } catch let e as Errno where e == .EAGAIN {
            return 0
        }
        return v
    }

    /// Wait until the eventfd is readable or the timeout passes; returns the count consumed.
    public func wait(timeoutMilliseconds: Int32) throws -> UInt64 {
        guard try Poll.waitReadable(fd, timeoutMilliseconds: timeoutMilliseconds) else { return 0 }
        return try consume()
    }
}

public enum Poll {
    /// True when `fd` is readable (or hung up) within the timeout.
    public static func waitReadable(_ fd: FileDescriptor, timeoutMilliseconds: Int32) throws -> Bool {
        try waitAnyReadable([fd.rawValue], timeoutMilliseconds: timeoutMilliseconds) != nil
    }

    /// Index of the first readable fd among `fds`, or nil on timeout.
    public static func waitAnyReadable(_ fds: [Int32], timeoutMilliseconds: Int32) throws -> Int? {
        var ps = fds.map { pollfd(fd: $0, events: Int16(POLLIN), revents: 0) }
        // After a signal, poll again for what is left of the timeout, not all of it: a thread
        // that is signalled every few milliseconds (a vCPU being kicked) would never time out.
        let deadline = timeoutMilliseconds < 0 ? 0 : monotonicNanoseconds() + UInt64(timeoutMilliseconds) * 1_000_000
        while true {
            var left = timeoutMilliseconds
            if timeoutMilliseconds >= 0 {
                let now = monotonicNanoseconds()
                left = now >= deadline ? 0 : Int32((deadline - now + 999_999) / 1_000_000)
            }
            let n = poll(&ps, nfds_t(ps.count), left)
            if n == 0 { return nil }
            if n > 0 { return ps.firstIndex { $0.revents != 0 } }
            let e = Errno.current
            if e != .EINTR { throw e }
        }
    }
}

/// Monotonic clock in nanoseconds.
@inline(__always)
public func monotonicNanoseconds() -> UInt64 {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
}

public enum Allocator {
    private static let once: Void = {
        // On the project's machines (PVM, shadow paging) a first-touch page fault costs ~10 µs.
        // glibc serves blocks over 128 KiB with mmap and returns them on free, so every 1 MiB
        // message buffer would fault its 256 pages again. Keep large blocks in the heap instead.
        vl_keep_large_buffers_resident()
    }()
    /// Idempotent; called by every connection and by the CLI.
    public static func keepLargeBuffersResident() { _ = once }
}
