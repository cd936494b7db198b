/* Private glue shared by kernels.c and lut.c (not part of the public API in kernels.h). */
#ifndef SALOMI_KERNELS_INTERNAL_H
#define SALOMI_KERNELS_INTERNAL_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "kernels.h" /* salomi_run_parallel: the one thread pool of kernels.c */

/* AVX-512 extensions beyond the ISA level "avx512" (F/BW/VL), probed once by kernels.c. */
#define SALOMI_EXT_VBMI 1u /* vpermi2b / vpermb: the byte-table lookups */
#define SALOMI_EXT_VNNI 2u /* vpdpbusd: the int8 grid dot products */
unsigned salomi_cpu_ext(void);

/* IEEE half -> float, portable and exact (the SIMD paths use F16C instead). */
static inline float salomi_h2f(uint16_t h) {
    uint32_t s = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ffu, u;
    float f;
    if (e == 0) {
        f = (float)m * (1.0f / 16777216.0f); /* subnormal: m * 2^-24 (exact) */
        memcpy(&u, &f, 4);
        u |= s;
    } else if (e == 31) {
        u = s | 0x7f800000u | (m << 13);
    } else {
        u = s | ((e + 112) << 23) | (m << 13);
    }
    memcpy(&f, &u, 4);
    return f;
}

/* float -> IEEE half, round to nearest even (what F16C's vcvtps2ph does in that mode),
 * portable: overflow to +-inf, NaN stays NaN (quiet), subnormals exact. */
static inline uint16_t salomi_f2h(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    const uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
    const uint32_t a = x & 0x7fffffffu;
    if (a >= 0x7f800000u) return sign | (a > 0x7f800000u ? 0x7e00 : 0x7c00);
    if (a >= 0x477ff000u) return sign | 0x7c00; /* >= 65520 rounds to inf */
    if (a < 0x38800000u) {                      /* below 2^-14: a subnormal half (or the smallest normal) */
        float v;
        memcpy(&v, &a, 4);
        return sign | (uint16_t)nearbyintf(v * 16777216.0f); /* v * 2^24 is exact; ties to even */
    }
    uint32_t h = ((a >> 23) - 112) << 10 | (a & 0x7fffffu) >> 13;
    const uint32_t rem = a & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1))) h++; /* a carry into the exponent is right */
    return sign | (uint16_t)h;
}

#endif
