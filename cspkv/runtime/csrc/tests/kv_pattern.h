/* Shared by the C tests: K/V values are opaque bit patterns, a hash of (layer, K|V, head,
 * position, d), so that a value copied to the wrong place (even its low 16 bits, for fp16) is
 * caught; put/get store and read them as fp32 (4 bytes) or fp16 (their low 2 bytes). */
#ifndef CSPKV_TEST_KV_PATTERN_H
#define CSPKV_TEST_KV_PATTERN_H

#include <stdint.h>
#include <string.h>

static uint32_t tag(int l, int k, int h, int64_t pos, int d) {
    uint64_t x = ((((uint64_t)l * 2 + (uint64_t)k) * 4096 + (uint64_t)h) * 1000003u + (uint64_t)pos) * 131u + (uint64_t)d;
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    /* never all-zero, so it differs from a cleared slot; bit 30 (fp32) and bit 14 (fp16) clear, so
     * the exponent is never all ones: a finite value, which the library requires of K/V */
    return ((uint32_t)x | 1u) & ~0x40004000u;
}

static void put(void *base, size_t i, uint32_t v, size_t elem) {
    if (elem == 4) memcpy((char *)base + i * 4, &v, 4);
    else { uint16_t v16 = (uint16_t)v; memcpy((char *)base + i * 2, &v16, 2); }
}

static uint32_t get(const void *base, size_t i, size_t elem) {
    if (elem == 4) { uint32_t v; memcpy(&v, (const char *)base + i * 4, 4); return v; }
    uint16_t v16;
    memcpy(&v16, (const char *)base + i * 2, 2);
    return v16;
}

#endif
