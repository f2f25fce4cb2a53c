/* See include/vl_checksum.h. */
#include "vl_checksum.h"
#include <string.h>

static uint32_t table[8][256];
static int table_ready;

/* Slicing-by-8 tables for the portable path (built once; racing builders write the same values). */
static void build_table(void) {
    if (__atomic_load_n(&table_ready, __ATOMIC_ACQUIRE)) return;
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = (c >> 1) ^ (0x82F63B78u & (0u - (c & 1)));
        table[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++)
        for (int s = 1; s < 8; s++) table[s][i] = (table[s - 1][i] >> 8) ^ table[0][table[s - 1][i] & 0xff];
    __atomic_store_n(&table_ready, 1, __ATOMIC_RELEASE);
}

static inline uint64_t load64(const unsigned char *p) {
    uint64_t w;
    memcpy(&w, p, 8);
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    w = __builtin_bswap64(w);
#endif
    return w;
}

static inline uint32_t sw_u8(uint32_t c, unsigned char b) { return (c >> 8) ^ table[0][(c ^ b) & 0xff]; }

static inline uint32_t sw_u64(uint32_t c, uint64_t w) {
    w ^= c;
    return table[7][w & 0xff] ^ table[6][(w >> 8) & 0xff] ^ table[5][(w >> 16) & 0xff] ^ table[4][(w >> 24) & 0xff] ^
           table[3][(w >> 32) & 0xff] ^ table[2][(w >> 40) & 0xff] ^ table[1][(w >> 48) & 0xff] ^ table[0][w >> 56];
}

uint32_t vl_crc32c_raw_portable(uint32_t crc, const void *p, size_t n) {
    build_table();
    const unsigned char *b = p;
    while (n >= 8) { crc = sw_u64(crc, load64(b)); b += 8; n -= 8; }
    while (n--) crc = sw_u8(crc, *b++);
    return crc;
}

#define P1 0x9e3779b97f4a7c15ull
#define P2 0xc2b2ae3d27d4eb4full

static inline void lanes_from_seed(uint64_t seed, uint32_t *a, uint32_t *b, uint32_t *c) {
    *a = (uint32_t)seed;
    *b = (uint32_t)(seed >> 32);
    *c = (uint32_t)(seed ^ (seed >> 32)) ^ 0x9e3779b9u;
}

static inline uint64_t fold(uint32_t a, uint32_t b, uint32_t c, size_t n) {
    uint64_t x = (((uint64_t)a << 32) | b) ^ ((uint64_t)c * P1) ^ (uint64_t)n;
    x ^= x >> 33; x *= P2; x ^= x >> 29;
    return x;
}

uint64_t vl_crc3x64_portable(uint64_t seed, const void *p, size_t n) {
    build_table();
    uint32_t a, b, c;
    lanes_from_seed(seed, &a, &b, &c);
    const unsigned char *q = p;
    size_t left = n;
    while (left >= 24) {
        a = sw_u64(a, load64(q)); b = sw_u64(b, load64(q + 8)); c = sw_u64(c, load64(q + 16));
        q += 24; left -= 24;
    }
    while (left--) a = sw_u8(a, *q++);
    return fold(a, b, c, n);
}

#if defined(__x86_64__)
__attribute__((target("sse4.2"))) static uint32_t hw_raw(uint32_t crc, const void *p, size_t n) {
    const unsigned char *b = p;
    uint64_t c = crc;
    while (n >= 8) { c = __builtin_ia32_crc32di(c, load64(b)); b += 8; n -= 8; }
    uint32_t c32 = (uint32_t)c;
    while (n--) c32 = __builtin_ia32_crc32qi(c32, *b++);
    return c32;
}

__attribute__((target("sse4.2"))) static uint64_t hw_crc3(uint64_t seed, const void *p, size_t n) {
    uint32_t a32, b32, c32;
    lanes_from_seed(seed, &a32, &b32, &c32);
    uint64_t a = a32, b = b32, c = c32;
    const unsigned char *q = p;
    size_t left = n;
    /* Two blocks per iteration: fewer loop branches between the three chains. */
    while (left >= 48) {
        a = __builtin_ia32_crc32di(a, load64(q)); b = __builtin_ia32_crc32di(b, load64(q + 8)); c = __builtin_ia32_crc32di(c, load64(q + 16));
        a = __builtin_ia32_crc32di(a, load64(q + 24)); b = __builtin_ia32_crc32di(b, load64(q + 32)); c = __builtin_ia32_crc32di(c, load64(q + 40));
        q += 48; left -= 48;
    }
    if (left >= 24) {
        a = __builtin_ia32_crc32di(a, load64(q)); b = __builtin_ia32_crc32di(b, load64(q + 8)); c = __builtin_ia32_crc32di(c, load64(q + 16));
        q += 24; left -= 24;
    }
    uint32_t a1 = (uint32_t)a;
    while (left--) a1 = __builtin_ia32_crc32qi(a1, *q++);
    return fold(a1, (uint32_t)b, (uint32_t)c, n);
}

static int hw_state; /* 0 unknown, 1 yes, 2 no */
int vl_crc32c_hardware(void) {
    int s = __atomic_load_n(&hw_state, __ATOMIC_RELAXED);
    if (s == 0) {
        __builtin_cpu_init();
        s = __builtin_cpu_supports("sse4.2") ? 1 : 2;
        __atomic_store_n(&hw_state, s, __ATOMIC_RELAXED);
    }
    return s == 1;
}

uint32_t vl_crc32c_raw(uint32_t crc, const void *p, size_t n) {
    return vl_crc32c_hardware() ? hw_raw(crc, p, n) : vl_crc32c_raw_portable(crc, p, n);
}

uint64_t vl_crc3x64(uint64_t seed, const void *p, size_t n) {
    return vl_crc32c_hardware() ? hw_crc3(seed, p, n) : vl_crc3x64_portable(seed, p, n);
}
#else
int vl_crc32c_hardware(void) { return 0; }
uint32_t vl_crc32c_raw(uint32_t crc, const void *p, size_t n) { return vl_crc32c_raw_portable(crc, p, n); }
uint64_t vl_crc3x64(uint64_t seed, const void *p, size_t n) { return vl_crc3x64_portable(seed, p, n); }
#endif
