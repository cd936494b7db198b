/* Private glue shared by kernels.c and lut.c (not part of the public API in kernels.h). */
#ifndef SALOMI_KERNELS_INTERNAL_H
#define SALOMI_KERNELS_INTERNAL_H

#include <stdint.h>
#include <string.h>

#include "kernels.h" /* salomi_run_parallel: the one thread pool of kernels.c */

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

#endif
