import Glibc
import SystemCalls
import VFIO

/// Carries device DMA to a mapping that has no fd: DMA_READ / DMA_WRITE messages to the client.
public protocol DMAMessageChannel: AnyObject {
    func dmaRead(address: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws
    func dmaWrite(address: UInt64, from buffer: UnsafeRawBufferPointer) throws
}

/// The server's table of client DMA mappings: guest memory mapped from the fds passed with
/// DMA_MAP, looked up by IOVA. Every device access goes through `read`/`write`, which refuse any
/// byte outside a mapping (EFAULT) or against its protection (EACCES), and log writes in the
/// mapping's dirty bitmap while DMA logging is on.
public final class DMAMapTable: DMAAccessor, @unchecked Sendable {
    public final class Mapping {
        public let iova: UInt64
        public let size: UInt64
        public let offset: UInt64
        public let flags: DMAMapFlags
        let fd: FileDescriptor?
        /// Set only for an fd whose size cannot shrink (F_SEAL_SHRINK): touching a mapping of a
        /// file the client shrank would SIGBUS the server. Other fds are accessed with
        /// pread/pwrite, where a shrunk file is a short read.
        let memory: MappedRegion?
        var dirty: DirtyBitmap?
        init(iova: UInt64, size: UInt64, offset: UInt64, flags: DMAMapFlags, fd: FileDescriptor?, memory: MappedRegion?) {
            self.iova = iova; self.size = size; self.offset = offset; self.flags = flags; self.fd = fd; self.memory = memory
        }
        /// The last byte's address. (iova + size can be 2^64, which wraps to 0: comparisons
        /// use `last`, never an exclusive end.)
        var last: UInt64 { iova + (size - 1) }
        /// For messages only.
        var end: UInt64 { iova &+ size }
        func close() { memory?.unmap(); fd?.close() }
    }

    /// How the dirty log of device writes is kept.
    public enum DirtyTrackingMode: String, Sendable {
        /// Log exactly the pages the device wrote (what DMA logging promises).
        case precise
        /// The seed behaviour for devices that cannot track: every mapped page reports dirty.
        case pinnedPages = "pinned"
    }

    public let maxMappings: Int
    public let maxMappingSize: UInt64 = 1 << 43  // 8 TiB, as libvfio-user
    public var trackingMode: DirtyTrackingMode = .precise
    private var mappings: [Mapping] = []  // sorted by iova, non-overlapping
    private let lock = RWLock()
    private(set) public var loggingPageSize: UInt64? = nil
    /// Message channel for fd-less mappings (the twin socket); nil when none is available.
    public var messageChannel: DMAMessageChannel?
    /// Bytes the device moved, for metrics.
    public private(set) var bytesRead: UInt64 = 0
    public private(set) var bytesWritten: UInt64 = 0

    public init(maxMappings: Int = 65535) { self.maxMappings = maxMappings }

    public var count: Int { lock.withReadLock { mappings.count } }
    public var ranges: [(iova: UInt64, size: UInt64)] { lock.withReadLock { mappings.map { ($0.iova, $0.size) } } }

    /// DMA_MAP. Takes ownership of `fd` (closed on every error path).
    public func map(_ req: DMAMapRequest, fd: FileDescriptor?) throws {
        do {
            guard req.size <= maxMappingSize else { throw DeviceError(.ENOSPC, "DMA_MAP of \(req.size) bytes exceeds the 8 TiB limit") }
            guard req.address % 4096 == 0, req.size % 4096 == 0 else {
                throw DeviceError(.EINVAL, "DMA_MAP iova 0x\(String(req.address, radix: 16)) size 0x\(String(req.size, radix: 16)) not aligned to the 4 KiB page size")
            }
            guard req.flags.contains(.read) || req.flags.contains(.write) else {
                throw DeviceError(.EINVAL, "DMA_MAP with neither READ nor WRITE")
            }
            var memory: MappedRegion? = nil
            if let fd {
                // Seals first, then the size: once F_SEAL_SHRINK is seen the size only grows.
                let sealed = try Self.checkBacking(fd)
                let fileSize = try fd.fileSize()
                // A mapping must lie inside the file: mmap past EOF would SIGBUS on access.
                guard req.offset <= fileSize, req.size <= fileSize - req.offset else {
                    throw DeviceError(.EINVAL, "DMA_MAP offset 0x\(String(req.offset, radix: 16)) + size 0x\(String(req.size, radix: 16)) lies beyond the end of the \(fileSize)-byte file")
                }
                if sealed {
                    do {
                        memory = try MappedRegion(fd: fd, offset: req.offset, length: Int(req.size), writable: req.flags.contains(.write))
                    } catch let e as Errno {
                        throw DeviceError(e, "DMA_MAP: mmap of the passed fd failed: \(e)")
                    }
                } else {
                    Log.info("dma", "DMA_MAP [0x\(String(req.address, radix: 16)), +0x\(String(req.size, radix: 16))): fd not sealed against shrinking (F_SEAL_SHRINK), served by pread/pwrite instead of mmap")
                }
            }
            let m = Mapping(iova: req.address, size: req.size, offset: req.offset, flags: req.flags, fd: fd, memory: memory)
            try lock.withWriteLock {
                guard mappings.count < maxMappings else {
                    throw DeviceError(.ENOSPC, "DMA_MAP: the table already holds the maximum of \(maxMappings) mappings")
                }
                let i = insertionIndex(m.iova)
                if i > 0, mappings[i - 1].last >= m.iova {
                    let o = mappings[i - 1]
                    throw DeviceError(.EEXIST, "DMA_MAP [0x\(String(m.iova, radix: 16)), 0x\(String(m.end, radix: 16))) overlaps the mapping [0x\(String(o.iova, radix: 16)), 0x\(String(o.end, radix: 16)))")
                }
                if i < mappings.count, mappings[i].iova <= m.last {
                    let o = mappings[i]
                    throw DeviceError(.EEXIST, "DMA_MAP [0x\(String(m.iova, radix: 16)), 0x\(String(m.end, radix: 16))) overlaps the mapping [0x\(String(o.iova, radix: 16)), 0x\(String(o.end, radix: 16)))")
                }
                // An fd-less mapping gets no bitmap: the client logs its message writes itself,
                // and a bitmap sized from its 8 TiB would be memory it never backed.
                if let ps = loggingPageSize, m.fd != nil { m.dirty = DirtyBitmap(pageSize: ps, length: m.size) }
                mappings.insert(m, at: i)
            }
        } catch {
            fd?.close()
            throw error
        }
    }

    /// Raw fcntl numbers (linux/fcntl.h), which Glibc's module does not export.
    enum Seal {
        static let getSeals: Int32 = 1034  // F_GET_SEALS (F_LINUX_SPECIFIC_BASE + 10)
        static let shrink: Int32 = 0x0002  // F_SEAL_SHRINK
    }

    /// An fd backing guest memory must be a regular file (a memfd, a tmpfs or disk file):
    /// pipes, sockets and devices are refused. Returns whether its size is sealed against
    /// shrinking, so that mmap is safe.
    static func checkBacking(_ fd: FileDescriptor) throws -> Bool {
        var st = stat()
        let n = fd.rawValue
        _ = try syscallRetryingEINTR { fstat(n, &st) }
        guard st.st_mode & S_IFMT == S_IFREG else {
            throw DeviceError(.EINVAL, "DMA_MAP: the passed fd is not a regular file (mode 0o\(String(st.st_mode & S_IFMT, radix: 8))): pipes, sockets and devices cannot back guest memory")
        }
        let seals = fcntl(n, Seal.getSeals)
        return seals >= 0 && seals & Seal.shrink != 0  // -1: not sealable, so not sealed
    }

    /// Test hook: whether the mapping at `iova` has a dirty bitmap of its own.
    func hasDirtyBitmap(iova: UInt64) -> Bool { lock.withReadLock { find(iova)?.dirty != nil } }

    /// Test hook: whether the mapping at `iova` is served by mmap (sealed fd).
    func isMemoryMapped(iova: UInt64) -> Bool { lock.withReadLock { find(iova)?.memory != nil } }

    /// pread/pwrite access to an unsealed fd; a file shrunk under us is a fault, not a SIGBUS.
    private func fileIO(_ m: Mapping, _ fd: FileDescriptor, offset: UInt64, _ buf: UnsafeMutableRawBufferPointer, write: Bool) throws {
        var done = 0
        while done < buf.count {
            let piece = UnsafeMutableRawBufferPointer(rebasing: buf[done...])
            let at = m.offset + offset + UInt64(done)
            let n: Int
            do {
                n = write ? try fd.pwrite(UnsafeRawBufferPointer(piece), offset: at) : try fd.pread(into: piece, offset: at)
            } catch let e as Errno {
                throw DeviceError(.EFAULT, "DMA \(write ? "write" : "read") at file offset 0x\(String(at, radix: 16)) of mapping [0x\(String(m.iova, radix: 16)), +0x\(String(m.size, radix: 16))) failed: \(e)")
            }
            guard n > 0 else {
                throw DeviceError(.EFAULT, "DMA read at file offset 0x\(String(at, radix: 16)) of mapping [0x\(String(m.iova, radix: 16)), +0x\(String(m.size, radix: 16))): the client shrank the file")
            }
            done += n
        }
    }

    /// DMA_UNMAP of exactly one earlier mapping; returns its dirty bitmap when asked.
    /// Holding the write lock means no device access is in flight on the mapping when we return.
    public func unmap(address: UInt64, size: UInt64, dirtyPageSize: UInt64? = nil) throws -> [UInt64]? {
        let m: Mapping = try lock.withWriteLock {
            guard let i = mappings.firstIndex(where: { $0.iova == address && $0.size == size }) else {
                throw DeviceError(.ENOENT, "DMA_UNMAP [0x\(String(address, radix: 16)), +0x\(String(size, radix: 16))) matches no mapping")
            }
            return mappings.remove(at: i)
        }
        defer { m.close() }
        guard let ps = dirtyPageSize else { return nil }
        return bitmapFor(m, offset: 0, length: m.size, pageSize: ps)
    }

    /// DMA_UNMAP without a bitmap, as the kernel's type1 IOMMU does it (QEMU's client is written
    /// against that): every mapping wholly inside [address, address+size) goes, and a range
    /// holding none succeeds. QEMU's intel-iommu unmaps whole address-space chunks on an
    /// invalidation; refusing those left its 4 KiB mappings behind and every later DMA_MAP of
    /// the same RAM failed with EEXIST. A range that cuts a mapping is refused (ENOENT).
    @discardableResult
    public func unmapRange(address: UInt64, size: UInt64) throws -> Int {
        // `last` rather than an end: QEMU's last chunk ends at exactly 2^64.
        guard size > 0, case let (last, false) = address.addingReportingOverflow(size - 1) else {
            throw DeviceError(.EINVAL, "DMA_UNMAP [0x\(String(address, radix: 16)), +0x\(String(size, radix: 16))) is empty or wraps")
        }
        let gone: [Mapping] = try lock.withWriteLock {
            let touched = mappings.filter { $0.iova <= last && $0.iova &+ ($0.size - 1) >= address }
            if let cut = touched.first(where: { $0.iova < address || $0.iova &+ ($0.size - 1) > last }) {
                throw DeviceError(.ENOENT, "DMA_UNMAP [0x\(String(address, radix: 16)), +0x\(String(size, radix: 16))) cuts the mapping [0x\(String(cut.iova, radix: 16)), 0x\(String(cut.end, radix: 16))) (only whole mappings are unmapped)")
            }
            mappings.removeAll { m in touched.contains { $0 === m } }
            return touched
        }
        for m in gone { m.close() }
        return gone.count
    }

    /// Unmap everything (UNMAP_ALL, and client disconnect).
    public func unmapAll() {
        let all = lock.withWriteLock { () -> [Mapping] in let a = mappings; mappings = []; return a }
        for m in all { m.close() }
    }

    // MARK: dirty logging

    public func startLogging(pageSize: UInt64) throws {
        guard pageSize >= 4096, pageSize & (pageSize - 1) == 0 else {
            throw DeviceError(.EINVAL, "DMA logging page size \(pageSize) is not a power of two ≥ 4096")
        }
        try lock.withWriteLock {
            if let cur = loggingPageSize {
                guard cur == pageSize else { throw DeviceError(.EINVAL, "DMA logging already started with page size \(cur)") }
                return
            }
            loggingPageSize = pageSize
            for m in mappings where m.fd != nil { m.dirty = DirtyBitmap(pageSize: pageSize, length: m.size) }
        }
    }

    public func stopLogging() {
        lock.withWriteLock {
            loggingPageSize = nil
            for m in mappings { m.dirty = nil }
        }
    }

    public var isLogging: Bool { lock.withReadLock { loggingPageSize != nil } }

    /// DMA_LOGGING_REPORT: read-and-clear the bits for [iova, iova+length) at `pageSize`. The
    /// range may span several mappings; every byte of it must be mapped.
    public func report(iova: UInt64, length: UInt64, pageSize: UInt64) throws -> [UInt64] {
        guard loggingPageSize != nil else { throw DeviceError(.EINVAL, "DMA_LOGGING_REPORT before DMA_LOGGING_START") }
        guard pageSize >= 4096, pageSize & (pageSize - 1) == 0 else {
            throw DeviceError(.EINVAL, "report page size \(pageSize) is not a power of two ≥ 4096")
        }
        guard length > 0, length - 1 <= UInt64.max - iova else { throw DeviceError(.EINVAL, "report range is empty or wraps") }
        let last = iova + (length - 1)
        let pages = length / pageSize + (length % pageSize == 0 ? 0 : 1)
        return try lock.withReadLock {
            // Every byte must be mapped: checked before the bitmap is allocated.
            var pieces: [(Mapping, UInt64, UInt64)] = []  // mapping, first, last
            var at = iova
            while true {
                guard let m = find(at) else {
                    throw DeviceError(.EINVAL, "report range [0x\(String(iova, radix: 16)), +0x\(String(length, radix: 16))) is not fully mapped (0x\(String(at, radix: 16)) is not)")
                }
                let lastHere = min(m.last, last)
                pieces.append((m, at, lastHere))
                if lastHere == last { break }
                at = lastHere + 1
            }
            var out = [UInt64](repeating: 0, count: Int(pages / 64 + (pages % 64 == 0 ? 0 : 1)))
            for (m, first, lastHere) in pieces {
                let sub = bitmapFor(m, offset: first - m.iova, length: lastHere - first + 1, pageSize: pageSize)
                // `sub` is relative to `first`, `out` to iova.
                out.orBits(sub, atBit: (first - iova) / pageSize, limit: pages)
            }
            return out
        }
    }

    private func bitmapFor(_ m: Mapping, offset: UInt64, length: UInt64, pageSize: UInt64) -> [UInt64] {
        let pages = (length + pageSize - 1) / pageSize
        if trackingMode == .pinnedPages {
            var all = [UInt64](repeating: ~0, count: Int((pages + 63) / 64))
            let tail = pages % 64
            if tail != 0 { all[all.count - 1] = (1 << tail) - 1 }
            return all
        }
        guard let d = m.dirty else { return [UInt64](repeating: 0, count: Int((pages + 63) / 64)) }
        return d.take(offset: offset, length: length, reportPageSize: pageSize)
    }

    // MARK: device access

    private func insertionIndex(_ iova: UInt64) -> Int {
        var lo = 0, hi = mappings.count
        while lo < hi { let mid = (lo + hi) / 2; if mappings[mid].iova < iova { lo = mid + 1 } else { hi = mid } }
        return lo
    }

    private func find(_ addr: UInt64) -> Mapping? {
        let i = insertionIndex(addr &+ 1)
        guard i > 0 else { return nil }
        let m = mappings[i - 1]
        return addr >= m.iova && addr <= m.last ? m : nil
    }

    private func fault(_ addr: UInt64, _ count: Int, _ why: String) -> DeviceError {
        DeviceError(.EFAULT, "DMA to [0x\(String(addr, radix: 16)), +0x\(String(count, radix: 16))) refused: \(why)")
    }

    /// Copy guest memory at `address` into `buffer`.
    public func read(address: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws {
        try access(address: address, count: buffer.count, write: false) { m, off, range in
            let dst = UnsafeMutableRawBufferPointer(rebasing: buffer[range])
            if let mem = m.memory {
                memcpy(dst.baseAddress!, mem.base + Int(off), dst.count)
            } else if let fd = m.fd {
                try fileIO(m, fd, offset: off, dst, write: false)
            } else {
                guard let ch = messageChannel else { throw fault(address, buffer.count, "mapping has no fd and no message channel") }
                try ch.dmaRead(address: m.iova + off, into: dst)
            }
        }
        bytesRead &+= UInt64(buffer.count)
    }

    /// Copy `buffer` into guest memory at `address`, logging the pages written.
    public func write(address: UInt64, from buffer: UnsafeRawBufferPointer) throws {
        try access(address: address, count: buffer.count, write: true) { m, off, range in
            let src = UnsafeRawBufferPointer(rebasing: buffer[range])
            if let mem = m.memory {
                memcpy(mem.base + Int(off), src.baseAddress!, src.count)
                m.dirty?.mark(offset: off, length: UInt64(src.count))
            } else if let fd = m.fd {
                try fileIO(m, fd, offset: off, UnsafeMutableRawBufferPointer(mutating: src), write: true)
                m.dirty?.mark(offset: off, length: UInt64(src.count))
            } else {
                // The client performs (and logs) message-based writes itself.
                guard let ch = messageChannel else { throw fault(address, buffer.count, "mapping has no fd and no message channel") }
                try ch.dmaWrite(address: m.iova + off, from: src)
            }
        }
        bytesWritten &+= UInt64(buffer.count)
    }

    public func withGuestMemory(address: UInt64, count: Int, write: Bool,
                                _ body: (UnsafeMutableRawBufferPointer) throws -> Void) throws {
        try access(address: address, count: count, write: write) { m, off, range in
            guard let mem = m.memory else { throw DeviceError(.ENOTSUP, "mapping has no fd or an unsealed one: zero-copy access impossible") }
            try body(UnsafeMutableRawBufferPointer(start: mem.base + Int(off), count: range.count))
            if write { m.dirty?.mark(offset: off, length: UInt64(range.count)) }
        }
        if write { bytesWritten &+= UInt64(count) } else { bytesRead &+= UInt64(count) }
    }

    /// Walk the mappings covering [address, address+count), all of which must exist and allow
    /// the access, before touching any byte.
    private func access(address: UInt64, count: Int, write: Bool,
                        _ body: (Mapping, UInt64, Range<Int>) throws -> Void) throws {
        guard count > 0 else { return }
        guard address &+ UInt64(count) > address else { throw fault(address, count, "range wraps around") }
        try lock.withReadLock {
            var pieces: [(Mapping, UInt64, Range<Int>)] = []
            var done = 0
            while done < count {
                let at = address + UInt64(done)
                guard let m = find(at) else { throw fault(address, count, "0x\(String(at, radix: 16)) is not mapped") }
                guard m.flags.contains(write ? .write : .read) else {
                    throw DeviceError(.EACCES, "DMA \(write ? "write" : "read") to [0x\(String(m.iova, radix: 16)), +0x\(String(m.size, radix: 16))) not permitted by its mapping")
                }
                let n = Int(min(UInt64(count - done - 1), m.last - at)) + 1
                pieces.append((m, at - m.iova, done..<done + n))
                done += n
            }
            for (m, off, r) in pieces { try body(m, off, r) }
        }
    }
}

/// What devices see of the DMA table.
public protocol DMAAccessor: AnyObject {
    func read(address: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws
    func write(address: UInt64, from buffer: UnsafeRawBufferPointer) throws
    /// Zero-copy access: `body` gets each mapped piece of [address, address+count) in order,
    /// after the whole range was checked. Writes are logged. Throws ENOTSUP if a piece has no
    /// fd (message-based): use read/write then.
    func withGuestMemory(address: UInt64, count: Int, write: Bool,
                         _ body: (UnsafeMutableRawBufferPointer) throws -> Void) throws
}
