import SystemCalls

/// What the guest workload does (`--workload dirty-rate=PAGES_PER_S,working-set=SIZE,...`).
public struct WorkloadConfig: Sendable, Equatable, CustomStringConvertible {
    /// Bytes of guest RAM the workload owns (split between vCPUs).
    public var workingSet: UInt64 = 16 << 20
    /// Page writes per second over all vCPUs; 0 = as fast as the vCPU goes.
    public var dirtyRate: UInt64 = 0
    /// Pages per batch (one doorbell exit per batch).
    public var batch: UInt64 = 64
    /// A DMA round trip through the first device every this many batches; 0 = none.
    public var dmaEvery: UInt64 = 16
    /// Bytes per DMA job (≤ 64 KiB).
    public var dmaLength: UInt64 = 16 << 10

    public init() {}

    public var description: String {
        "working set \(workingSet >> 20) MiB, dirty rate \(dirtyRate == 0 ? "unlimited" : "\(dirtyRate) pages/s"), " +
            "batch \(batch), DMA \(dmaEvery == 0 ? "off" : "every \(dmaEvery) batches of \(dmaLength) bytes")"
    }

    /// Parse `dirty-rate=N,working-set=SIZE,batch=N,dma-every=N,dma-length=SIZE`.
    public init(parsing s: String, parseSize: (String) throws -> UInt64) throws {
        self.init()
        for part in s.split(separator: ",") where !part.isEmpty {
            let kv = part.split(separator: "=", maxSplits: 1).map(String.init)
            guard kv.count == 2 else { throw KVMError.unavailable("workload option '\(part)' is not key=value") }
            switch kv[0] {
            case "dirty-rate": guard let v = UInt64(kv[1]) else { throw KVMError.unavailable("dirty-rate takes pages per second") }; dirtyRate = v
            case "working-set": workingSet = try parseSize(kv[1])
            case "batch": guard let v = UInt64(kv[1]), v > 0 else { throw KVMError.unavailable("batch takes a positive number") }; batch = v
            case "dma-every": guard let v = UInt64(kv[1]) else { throw KVMError.unavailable("dma-every takes a number of batches") }; dmaEvery = v
            case "dma-length":
                dmaLength = try parseSize(kv[1])
                guard dmaLength > 0, dmaLength <= 64 << 10, dmaLength % 8 == 0 else { throw KVMError.unavailable("dma-length must be 8..64K, a multiple of 8") }
            default: throw KVMError.unavailable("unknown workload option '\(kv[0])' (dirty-rate, working-set, batch, dma-every, dma-length)")
            }
        }
    }
}

/// What the integrity verifier found.
public struct VerifierReport: Sendable, CustomStringConvertible {
    public var pagesChecked: UInt64 = 0
    public var pageWrites: UInt64 = 0
    public var dmaRoundsOK: UInt64 = 0
    public var dmaErrors: UInt64 = 0
    public var violations: [String] = []
    public var ok: Bool { violations.isEmpty && dmaErrors == 0 }
    public var description: String {
        ok ? "integrity verified: \(pagesChecked) pages (\(pageWrites) writes), \(dmaRoundsOK) DMA round trips"
           : "INTEGRITY VIOLATION: " + (violations.first ?? "\(dmaErrors) DMA round trips failed in the guest")
    }
}

/// Checks guest memory against the workload's invariants. Call only while the vCPUs are paused.
public enum WorkloadVerifier {
    /// One vCPU's slice: pages [first, first+count) of the working set, its control block.
    public static func verify(memory m: GuestMemory, controlBlock cb: UInt64, into r: inout VerifierReport, maxViolations: Int = 8) {
        let base = m.load64(cb + UInt64(GuestLayout.CB.wsBase))
        let n = m.load64(cb + UInt64(GuestLayout.CB.wsPages))
        let p = m.load64(cb + UInt64(GuestLayout.CB.pagesWritten))
        guard m.load64(cb + UInt64(GuestLayout.CB.magic)) == GuestLayout.CB.magicValue, n > 0 else {
            r.violations.append("control block at \(hex(cb)) is not initialised")
            return
        }
        r.pageWrites += p
        r.dmaRoundsOK += m.load64(cb + UInt64(GuestLayout.CB.dmaOK))
        r.dmaErrors += m.load64(cb + UInt64(GuestLayout.CB.dmaErrors))
        let sweeps = p / n, cursor = p % n
        for i in 0..<n {
            // Every page before the cursor has been written once more than those after it.
            let expected = sweeps + (i < cursor ? 1 : 0)
            let a = base + i * 4096
            let inFlight = i == cursor  // may hold a torn write of sequence expected+1
            if let why = check(m, page: a, index: i, sequence: expected, alternative: inFlight ? expected + 1 : nil) {
                if r.violations.count < maxViolations {
                    r.violations.append("page \(i) at GPA \(hex(a)) (vCPU slice \(hex(cb))): \(why); \(p) writes published")
                }
            }
            r.pagesChecked += 1
        }
        // The last completed DMA round left its pattern in the destination buffer.
        if m.load64(cb + UInt64(GuestLayout.CB.dmaPhase)) == 0, m.load64(cb + UInt64(GuestLayout.CB.dmaOK)) > 0 {
            let dst = m.load64(cb + UInt64(GuestLayout.CB.dmaDestination))
            let len = m.load64(cb + UInt64(GuestLayout.CB.dmaLength))
            let key = m.load64(cb + UInt64(GuestLayout.CB.dmaKey))
            for k in 0..<(len / 8) where m.load64(dst + k * 8) != key ^ k ^ GuestLayout.dmaPattern {
                r.violations.append("DMA destination word \(k) at \(hex(dst + k * 8)) is \(hex(m.load64(dst + k * 8))), the completed job wrote \(hex(key ^ k ^ GuestLayout.dmaPattern))")
                break
            }
        }
    }

    static func expectedWords(index i: UInt64, sequence s: UInt64) -> [(Int, UInt64)] {
        let w0 = GuestLayout.pageMagic ^ i
        let w2 = (i &* GuestLayout.pageK) ^ s
        return [(0, w0), (8, s), (16, w2), (24, w0 ^ s ^ w2 ^ GuestLayout.pageCheck), (2048, s ^ i), (4088, s &+ i)]
    }

    /// nil if the page holds sequence `s` (or, word by word, `alternative` for a page mid-write).
    static func check(_ m: GuestMemory, page a: UInt64, index i: UInt64, sequence s: UInt64, alternative: UInt64?) -> String? {
        if s == 0 && alternative == nil {
            for (off, _) in expectedWords(index: i, sequence: 1) where m.load64(a + UInt64(off)) != 0 {
                return "never written, but word +\(off) is \(hex(m.load64(a + UInt64(off))))"
            }
            return nil
        }
        let want = expectedWords(index: i, sequence: s)
        let alt = alternative.map { expectedWords(index: i, sequence: $0) }
        for (k, (off, v)) in want.enumerated() {
            let got = m.load64(a + UInt64(off))
            if got == v { continue }
            if let alt, got == alt[k].1 { continue }
            if s == 0, got == 0 { continue }  // in flight on the first sweep: not yet written
            let seen = m.load64(a + 8)
            return "word +\(off) is \(hex(got)), expected \(hex(v)) for sequence \(s) (the page says sequence \(seen))"
        }
        return nil
    }
}
