import SystemCalls

/// One bit per page, page n at bit n%64 of little-endian 64-bit word n/64: the layout of VFIO
/// DMA logging reports, type1 dirty bitmaps and KVM's dirty log. Thread-safe; readers take the
/// bits and clear them atomically with respect to writers.
public final class DirtyBitmap: @unchecked Sendable {
    public let pageSize: UInt64
    public let pageCount: UInt64
    private var words: [UInt64]
    private let lock = Mutex()

    public init(pageSize: UInt64, length: UInt64) {
        precondition(pageSize > 0 && pageSize & (pageSize - 1) == 0, "page size must be a power of two")
        self.pageSize = pageSize
        pageCount = (length + pageSize - 1) / pageSize
        words = [UInt64](repeating: 0, count: Int((pageCount + 63) / 64))
    }

    /// Bytes a report of this bitmap takes on the wire: ceil(pages / 64) × 8.
    public static func byteCount(pages: UInt64) -> Int { Int((pages + 63) / 64 * 8) }
    public var byteCount: Int { words.count * 8 }

    /// Mark every page overlapping [offset, offset+length).
    public func mark(offset: UInt64, length: UInt64) {
        guard length > 0, offset < pageCount * pageSize else { return }
        let first = offset / pageSize
        let last = min((offset + length - 1) / pageSize, pageCount - 1)
        lock.withLock {
            var p = first
            while p <= last {
                let w = Int(p / 64)
                let bit = p % 64
                if bit == 0 && last - p >= 63 {
                    words[w] = ~0
                    p += 64
                } else {
                    words[w] |= 1 << bit
                    p += 1
                }
            }
        }
    }

    public func markAll() { mark(offset: 0, length: pageCount * pageSize) }

    public func isDirty(page: UInt64) -> Bool {
        lock.withLock { words[Int(page / 64)] & (1 << (page % 64)) != 0 }
    }

    public var dirtyCount: Int { lock.withLock { words.reduce(0) { $0 + $1.nonzeroBitCount } } }

    /// The first dirty page at or after `page`, scanning a word at a time.
    public func firstDirtyPage(from page: UInt64 = 0) -> UInt64? {
        lock.withLock {
            guard page < pageCount else { return nil }
            var w = Int(page / 64)
            var bits = words[w] & (~0 << (page % 64))
            while true {
                if bits != 0 {
                    let p = UInt64(w * 64 + bits.trailingZeroBitCount)
                    return p < pageCount ? p : nil
                }
                w += 1
                guard w < words.count else { return nil }
                bits = words[w]
            }
        }
    }

    /// Clear pages [first, first+count) and say whether any was dirty.
    @discardableResult
    public func clear(firstPage first: UInt64, count: UInt64) -> Bool {
        lock.withLock {
            var any = false
            var p = first
            let end = min(first + count, pageCount)
            while p < end {
                let w = Int(p / 64), b = p % 64
                let n = min(64 - b, end - p)
                let mask: UInt64 = n == 64 ? ~0 : ((1 << n) - 1) << b
                if words[w] & mask != 0 { any = true; words[w] &= ~mask }
                p += n
            }
            return any
        }
    }

    /// How many groups of `pagesPerGroup` pages hold at least one dirty page.
    public func dirtyGroupCount(pagesPerGroup: UInt64) -> Int {
        lock.withLock {
            var n = 0
            var g: UInt64 = 0
            while g * pagesPerGroup < pageCount {
                var p = g * pagesPerGroup
                let end = min(p + pagesPerGroup, pageCount)
                while p < end {
                    let w = Int(p / 64)
                    if p % 64 == 0 && end - p >= 64 { if words[w] != 0 { n += 1; break }; p += 64; continue }
                    if words[w] & (1 << (p % 64)) != 0 { n += 1; break }
                    p += 1
                }
                g += 1
            }
            return n
        }
    }

    /// Take the words and clear them (read-and-clear, as DMA_LOGGING_REPORT does).
    public func takeWords() -> [UInt64] {
        lock.withLock {
            let w = words
            for i in words.indices { words[i] = 0 }
            return w
        }
    }

    /// Take the bits for pages [firstPage, firstPage+pages), re-based to bit 0, and clear them.
    /// `reportPageSize` may differ from ours: a smaller one replicates bits, a larger one ORs them.
    public func take(offset: UInt64, length: UInt64, reportPageSize: UInt64) -> [UInt64] {
        let reportPages = (length + reportPageSize - 1) / reportPageSize
        var out = [UInt64](repeating: 0, count: Int((reportPages + 63) / 64))
        lock.withLock {
            let firstOwn = offset / pageSize
            let lastOwn = min((offset + length + pageSize - 1) / pageSize, pageCount)
            guard firstOwn < lastOwn else { return }
            for p in firstOwn..<lastOwn {
                let w = Int(p / 64), b = p % 64
                guard words[w] & (1 << b) != 0 else { continue }
                words[w] &= ~(1 << b)
                // Map our page [p*ps, (p+1)*ps) onto report pages.
                let start = max(p * pageSize, offset) - offset
                let end = min((p + 1) * pageSize, offset + length) - offset
                var r = start / reportPageSize
                let rLast = (end - 1) / reportPageSize
                while r <= rLast {
                    out[Int(r / 64)] |= 1 << (r % 64)
                    r += 1
                }
            }
        }
        return out
    }

    /// OR another bitmap's words in (merging dirty sources).
    public func merge(words other: [UInt64], atPage firstPage: UInt64 = 0) {
        lock.withLock { words.orBits(other, atBit: firstPage, limit: pageCount) }
    }
}

extension Array where Element == UInt64 {
    /// OR the bits of `sub` into this bitmap, bit i of `sub` landing at bit `base + i`; bits at
    /// or past `limit` are dropped. (Merging dirty sources, re-basing a sub-range's report.)
    public mutating func orBits(_ sub: [UInt64], atBit base: UInt64, limit: UInt64) {
        for (i, w) in sub.enumerated() where w != 0 {
            var bits = w
            while bits != 0 {
                let p = base + UInt64(i * 64 + bits.trailingZeroBitCount)
                bits &= bits - 1
                if p < limit { self[Int(p / 64)] |= 1 << (p % 64) }
            }
        }
    }

    /// Little-endian bytes of a bitmap (the wire layout).
    public var littleEndianBytes: [UInt8] {
        var out = [UInt8](); out.reserveCapacity(count * 8)
        for w in self { Swift.withUnsafeBytes(of: w.littleEndian) { out.append(contentsOf: $0) } }
        return out
    }

    public init(littleEndianBitmap bytes: ArraySlice<UInt8>) {
        var words = [UInt64](); words.reserveCapacity(bytes.count / 8)
        var i = bytes.startIndex
        while i + 8 <= bytes.endIndex {
            var w: UInt64 = 0
            for k in 0..<8 { w |= UInt64(bytes[i + k]) << (8 * UInt64(k)) }
            words.append(w)
            i += 8
        }
        self = words
    }

    public var setBitCount: Int { reduce(0) { $0 + $1.nonzeroBitCount } }
}
