import CVFIOLive
import Glibc

/// An owned file descriptor: closed exactly once, either by `close()` or when the last
/// reference goes away. `take()` hands the raw number to someone else (for example a kernel
/// object or an SCM_RIGHTS message that transfers ownership) without closing it.
public final class FileDescriptor: CustomStringConvertible, @unchecked Sendable {
    private var fd: Int32
    private let lock = Mutex()

    /// Adopt `rawValue`: from now on this object closes it.
    public init(adopting rawValue: Int32) {
        precondition(rawValue >= 0, "adopting a negative fd")
        fd = rawValue
    }

    /// The descriptor number. Valid until `close()` or `take()`.
    public var rawValue: Int32 { lock.withLock { fd } }
    public var isOpen: Bool { lock.withLock { fd >= 0 } }
    public var description: String { "fd \(rawValue)" }

    /// Close now. Safe to call more than once; only the first call closes.
    public func close() {
        let old: Int32 = lock.withLock { let o = fd; fd = -1; return o }
        if old >= 0 { _ = Glibc.close(old) }  // close is never retried: the fd is gone either way
    }

    /// Give up ownership and return the raw number (the caller must close it).
    public func take() -> Int32 {
        lock.withLock { let o = fd; fd = -1; return o }
    }

    deinit { if fd >= 0 { _ = Glibc.close(fd) } }

    public func duplicate() throws -> FileDescriptor {
        let n = rawValue
        let new = try syscallRetryingEINTR { fcntl(n, F_DUPFD_CLOEXEC, 0) }
        return FileDescriptor(adopting: new)
    }

    public func setCloseOnExec(_ on: Bool) throws {
        let n = rawValue
        _ = try syscallRetryingEINTR { vl_set_cloexec(n, on ? 1 : 0) }
    }

    public func read(into buffer: UnsafeMutableRawBufferPointer) throws -> Int {
        let n = rawValue
        return try syscallRetryingEINTR { Glibc.read(n, buffer.baseAddress, buffer.count) }
    }

    public func write(_ buffer: UnsafeRawBufferPointer) throws -> Int {
        let n = rawValue
        return try syscallRetryingEINTR { Glibc.write(n, buffer.baseAddress, buffer.count) }
    }

    /// Write everything, looping over short writes.
    public func writeAll(_ buffer: UnsafeRawBufferPointer) throws {
        var done = 0
        while done < buffer.count {
            let w = try write(UnsafeRawBufferPointer(rebasing: buffer[done...]))
            if w == 0 { throw Errno.EPIPE }
            done += w
        }
    }

    public func pread(into buffer: UnsafeMutableRawBufferPointer, offset: UInt64) throws -> Int {
        let n = rawValue
        return try syscallRetryingEINTR { Glibc.pread(n, buffer.baseAddress, buffer.count, off_t(offset)) }
    }

    public func pwrite(_ buffer: UnsafeRawBufferPointer, offset: UInt64) throws -> Int {
        let n = rawValue
        return try syscallRetryingEINTR { Glibc.pwrite(n, buffer.baseAddress, buffer.count, off_t(offset)) }
    }

    /// Size of the file behind the descriptor (fstat).
    public func fileSize() throws -> UInt64 {
        var st = stat()
        let n = rawValue
        _ = try syscallRetryingEINTR { fstat(n, &st) }
        return UInt64(st.st_size)
    }

    public func truncate(to size: UInt64) throws {
        let n = rawValue
        _ = try syscallRetryingEINTR { ftruncate(n, off_t(size)) }
    }

    /// ioctl with a pointer argument (the VFIO/iommufd/KVM style).
    public func ioctl(_ request: UInt, _ arg: UnsafeMutableRawPointer?) throws -> Int32 {
        let n = rawValue
        return try syscallRetryingEINTR { vl_ioctl_ptr(n, request, arg) }
    }

    /// ioctl with a by-value argument (VFIO_CHECK_EXTENSION, VFIO_SET_IOMMU, KVM_CREATE_VCPU...).
    public func ioctl(_ request: UInt, value: UInt) throws -> Int32 {
        let n = rawValue
        return try syscallRetryingEINTR { vl_ioctl_val(n, request, value) }
    }
}

/// A small pthread mutex wrapper (Foundation-free, usable from any thread).
public final class Mutex: @unchecked Sendable {
    private var m = pthread_mutex_t()
    public init() { pthread_mutex_init(&m, nil) }
    deinit { pthread_mutex_destroy(&m) }
    public func lock() { pthread_mutex_lock(&m) }
    public func unlock() { pthread_mutex_unlock(&m) }
    @inline(__always)
    public func withLock<T>(_ body: () throws -> T) rethrows -> T {
        pthread_mutex_lock(&m)
        defer { pthread_mutex_unlock(&m) }
        return try body()
    }
    fileprivate var raw: UnsafeMutablePointer<pthread_mutex_t> {
        withUnsafeMutablePointer(to: &m) { $0 }
    }
}

/// A condition variable paired with a `Mutex`.
public final class Condition: @unchecked Sendable {
    public let mutex = Mutex()
    private var c = pthread_cond_t()
    public init() { pthread_cond_init(&c, nil) }
    deinit { pthread_cond_destroy(&c) }
    /// Wait (mutex held by the caller). Returns false on timeout.
    @discardableResult
    public func wait(timeoutSeconds: Double? = nil) -> Bool {
        guard let t = timeoutSeconds else {
            pthread_cond_wait(&c, mutex.raw)
            return true
        }
        var now = timespec()
        clock_gettime(CLOCK_REALTIME, &now)
        let total = Double(now.tv_sec) + Double(now.tv_nsec) / 1e9 + t
        var deadline = timespec(tv_sec: Int(total), tv_nsec: Int((total - Double(Int(total))) * 1e9))
        return pthread_cond_timedwait(&c, mutex.raw, &deadline) == 0
    }
    public func signal() { pthread_cond_signal(&c) }
    public func broadcast() { pthread_cond_broadcast(&c) }
}

/// A pthread read-write lock: many DMA accessors, one map/unmap at a time.
public final class RWLock: @unchecked Sendable {
    private var l = pthread_rwlock_t()
    public init() { pthread_rwlock_init(&l, nil) }
    deinit { pthread_rwlock_destroy(&l) }
    @inline(__always)
    public func withReadLock<T>(_ body: () throws -> T) rethrows -> T {
        pthread_rwlock_rdlock(&l); defer { pthread_rwlock_unlock(&l) }
        return try body()
    }
    @inline(__always)
    public func withWriteLock<T>(_ body: () throws -> T) rethrows -> T {
        pthread_rwlock_wrlock(&l); defer { pthread_rwlock_unlock(&l) }
        return try body()
    }
}

/// How many fds this process has open (diagnostics and leak tests).
public func openFileDescriptorCount() -> Int {
    guard let d = opendir("/proc/self/fd") else { return -1 }
    defer { closedir(d) }
    var n = 0
    while readdir(d) != nil { n += 1 }
    return n
}
