/*
 * The record checksum of dma-engine state (format 3): three CRC32C lanes over interleaved
 * little-endian 64-bit words, folded to 64 bits. With SSE4.2 each lane is one `crc32`
 * instruction per word and the three lanes overlap (the instruction's latency is 3 cycles,
 * its throughput 1 per cycle); elsewhere a table gives the same result.
 */
#ifndef VFIO_LIVE_CHECKSUM_H
#define VFIO_LIVE_CHECKSUM_H

#include <stddef.h>
#include <stdint.h>

/* The CRC32C register update (reflected polynomial 0x82F63B78, no pre/post inversion), the
 * `crc32` instruction's semantics: standard CRC32C is ~vl_crc32c_raw(~0, p, n). */
uint32_t vl_crc32c_raw(uint32_t crc, const void *p, size_t n);
uint32_t vl_crc32c_raw_portable(uint32_t crc, const void *p, size_t n);

/* The 3-lane checksum of `n` bytes at `p`, started from `seed`. */
uint64_t vl_crc3x64(uint64_t seed, const void *p, size_t n);
uint64_t vl_crc3x64_portable(uint64_t seed, const void *p, size_t n);

/* 1 when vl_crc3x64 / vl_crc32c_raw use the CPU's crc32 instruction. */
int vl_crc32c_hardware(void);

#endif
