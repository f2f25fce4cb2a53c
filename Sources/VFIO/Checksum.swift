/// A fast 64-bit checksum for device data and state records: four independent lanes of
/// multiply-xor over little-endian 64-bit words (so the multiplies overlap), then the tail bytes,
/// then a final mix. It detects corruption; it is not cryptographic. Byte-at-a-time FNV-1a would
/// cap DMA and state transfer near 1 GB/s, below the memcpy-relative targets.
public enum Checksum {
    public static let seed: UInt64 = 0xcbf2_9ce4_8422_2325
    static let p1: UInt64 = 0x9e37_79b9_7f4a_7c15
    static let p2: UInt64 = 0xc2b2_ae3d_27d4_eb4f

    /// Continue a checksum `h` over `data` (chunked computation gives the same result as one
    /// call only when every chunk but the last is a multiple of 32 bytes).
    public static func update(_ h: UInt64, _ data: UnsafeRawBufferPointer) -> UInt64 {
        var a = h, b = h ^ p1, c = h ^ p2, d = h &+ p1
        let n = data.count
        var i = 0
        if let base = data.baseAddress {
            while i + 32 <= n {
                a = (a ^ base.loadUnaligned(fromByteOffset: i, as: UInt64.self)) &* p1
                b = (b ^ base.loadUnaligned(fromByteOffset: i + 8, as: UInt64.self)) &* p1
                c = (c ^ base.loadUnaligned(fromByteOffset: i + 16, as: UInt64.self)) &* p1
                d = (d ^ base.loadUnaligned(fromByteOffset: i + 24, as: UInt64.self)) &* p1
                a ^= a >> 29; b ^= b >> 29; c ^= c >> 29; d ^= d >> 29
                i += 32
            }
        }
        var r = (a &* 3) ^ (b &* 5) ^ (c &* 7) ^ (d &* 11) ^ UInt64(n)
        while i < n { r = (r ^ UInt64(data[i])) &* 0x100_0000_01b3; i += 1 }
        r ^= r >> 33; r = r &* p2; r ^= r >> 29
        return r
    }

    public static func of(_ data: UnsafeRawBufferPointer) -> UInt64 { update(seed, data) }

    /// Copy `src` to `dst` and return `update(h, src)` in the same pass (one read of the data
    /// instead of two: the DMA engine's hot loop).
    public static func copy(_ h: UInt64, from src: UnsafeRawBufferPointer, to dst: UnsafeMutableRawPointer) -> UInt64 {
        var a = h, b = h ^ p1, c = h ^ p2, d = h &+ p1
        let n = src.count
        var i = 0
        if let s = src.baseAddress {
            while i + 32 <= n {
                let w0 = s.loadUnaligned(fromByteOffset: i, as: UInt64.self)
                let w1 = s.loadUnaligned(fromByteOffset: i + 8, as: UInt64.self)
                let w2 = s.loadUnaligned(fromByteOffset: i + 16, as: UInt64.self)
                let w3 = s.loadUnaligned(fromByteOffset: i + 24, as: UInt64.self)
                dst.storeBytes(of: w0, toByteOffset: i, as: UInt64.self)
                dst.storeBytes(of: w1, toByteOffset: i + 8, as: UInt64.self)
                dst.storeBytes(of: w2, toByteOffset: i + 16, as: UInt64.self)
                dst.storeBytes(of: w3, toByteOffset: i + 24, as: UInt64.self)
                a = (a ^ w0) &* p1; b = (b ^ w1) &* p1; c = (c ^ w2) &* p1; d = (d ^ w3) &* p1
                a ^= a >> 29; b ^= b >> 29; c ^= c >> 29; d ^= d >> 29
                i += 32
            }
        }
        var r = (a &* 3) ^ (b &* 5) ^ (c &* 7) ^ (d &* 11) ^ UInt64(n)
        while i < n {
            let byte = src[i]
            dst.storeBytes(of: byte, toByteOffset: i, as: UInt8.self)
            r = (r ^ UInt64(byte)) &* 0x100_0000_01b3
            i += 1
        }
        r ^= r >> 33; r = r &* p2; r ^= r >> 29
        return r
    }
}
