/* int8 kernels (lut.c): for sign, ternary and 2-, 4- or 8-bit grid cases (grid only with a group
 * the int8 kernel takes) the test also runs salomi_*_matmul_i8 and checks it against a double-precision reference that applies the
 * documented activation quantization (tolerance 3e-5 * sum_g |s_g| sx_g sum |xq_j|), and
 * that the scalar ISA gives bit-identical results.
 *
 * Tolerance: |y - y_ref| <= 1e-5 * ||x|| * ||m|| per output, m_j = |w_j| for sign and
 * ternary and |s| (|q_j| + |z|) for grid: the kernels sum s (sum x q - z sum x) per
 * group, whose float rounding scales with |q| and |z| rather than with |q - z|.
 *
 * Stand-alone check of kernels.c, meant to be built with -fsanitize=address,undefined
 * (bench/sanitize.sh kernels): random packed layers of every format, awkward shapes and
 * group sizes, every ISA this CPU supports, 1..3 threads, compared against a naive
 * double-precision reference written independently of the kernels (bit-by-bit decode).
 *
 * Usage: test_kernels [n_cases_per_isa] [seed]. Exit status 0 = all passed.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;
static uint64_t rnd(void) { /* xorshift64* */
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 2685821657736338717ull;
}
static int64_t rndi(int64_t n) { return (int64_t)(rnd() % (uint64_t)n); }
static float rndf(void) { return (float)((double)(rnd() >> 11) / 9007199254740992.0 * 2.0 - 1.0); }

static double ref_h2f(uint16_t h) {
    int s = h >> 15, e = (h >> 10) & 31, m = h & 1023;
    double v = e == 0 ? ldexp(m, -24) : ldexp(1.0 + m / 1024.0, e - 15);
    return s ? -v : v;
}

/* fp16 with exponent in [elo, ehi] (biased), random mantissa and given sign. */
static uint16_t rnd_half(int elo, int ehi, int neg) {
    return (uint16_t)((neg ? 0x8000 : 0) | ((elo + rndi(ehi - elo + 1)) << 10) | rndi(1024));
}

static int bit_at(const uint8_t *row, int64_t bit) { return (row[bit >> 3] >> (bit & 7)) & 1; }

enum { SIGN, TERN, GRID };

/* The int8 path: same-quantization reference, and scalar == current ISA bit for bit.
 * w holds the dequantized weights in weight column order; for grid (2 bits only) the
 * activations are quantized in stored column order (stored column j = weight column
 * perm[j]), like the kernel. */
static int check_i8(int fmt, int K, const float *x, int64_t M, int64_t in, int64_t out, const uint8_t *data,
                    const uint16_t *scale, const uint16_t *zero, int64_t G, const int32_t *perm, const double *w,
                    int threads, int isa) {
    const int64_t ng = in / G;
    float *y = malloc(sizeof(float) * (size_t)(M * out)), *y0 = malloc(sizeof(float) * (size_t)(M * out));
    float *xq = malloc(sizeof(float) * (size_t)in), *sx = malloc(sizeof(float) * (size_t)ng);
    float *xs = malloc(sizeof(float) * (size_t)in);
    int bad = 0;
    memset(y, 0xFF, sizeof(float) * (size_t)(M * out));
#define RUN_I8(Y)                                                                                                     \
    (fmt == SIGN   ? salomi_sign_matmul_i8(x, M, in, out, data, scale, G, Y, threads)                              \
     : fmt == TERN ? salomi_ternary_matmul_i8(x, M, in, out, data, scale, G, Y, threads)                           \
                   : salomi_grid_matmul_i8(x, M, in, out, data, K, scale, zero, G, perm, Y, threads))
    int rc = RUN_I8(y);
    salomi_set_isa(0);
    int rc0 = RUN_I8(y0);
    salomi_set_isa(isa);
#undef RUN_I8
    if (rc != 0 || rc0 != 0) {
        printf("FAIL i8 rc=%d/%d\n", rc, rc0);
        bad = 1;
    } else if (memcmp(y, y0, sizeof(float) * (size_t)(M * out)) != 0) {
        printf("FAIL i8: isa %s differs from scalar\n", salomi_isa_name(isa));
        bad = 1;
    }
    for (int64_t m = 0; m < M && !bad; m++) {
        for (int64_t j = 0; j < in; j++) xs[j] = x[m * in + (perm ? perm[j] : j)];
        for (int64_t g = 0; g < ng; g++) { /* the documented quantization, in float */
            float amax = 0.0f;
            for (int64_t j = g * G; j < (g + 1) * G; j++) amax = fabsf(xs[j]) > amax ? fabsf(xs[j]) : amax;
            const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
            sx[g] = amax / 127.0f;
            for (int64_t j = g * G; j < (g + 1) * G; j++) {
                float v = nearbyintf(xs[j] * inv);
                xq[j] = v > 127.0f ? 127.0f : v < -127.0f ? -127.0f : v;
            }
        }
        for (int64_t o = 0; o < out && !bad; o++) {
            double ref = 0, mag = 0;
            for (int64_t g = 0; g < ng; g++) {
                /* 8-bit grid sums (q - 128) xq and (z - 128) X: 128 more per term in magnitude */
                const double s = ref_h2f(scale[o * ng + g]),
                             z = (fmt == GRID ? fabs(ref_h2f(zero[o * ng + g])) : 1.0) + (K == 8 ? 128.0 : 0.0);
                double acc = 0, am = 0;
                for (int64_t j = g * G; j < (g + 1) * G; j++) {
                    const double qz = s != 0.0 ? w[o * in + (perm ? perm[j] : j)] / s : 0.0; /* q - z */
                    acc += qz * xq[j];
                    am += (fabs(qz) + 2 * z) * fabs(xq[j]);
                }
                ref += s * sx[g] * acc;
                mag += fabs(s) * sx[g] * am;
            }
            const double got = y[m * out + o], tol = 3e-5 * mag + 1e-30;
            if (!(fabs(got - ref) <= tol)) {
                printf("FAIL i8 m=%lld o=%lld got %.9g want %.9g (tol %.3g)\n", (long long)m, (long long)o, got, ref,
                       tol);
                bad = 1;
            }
        }
    }
    free(y), free(y0), free(xq), free(sx), free(xs);
    return bad;
}

static int grid_i8_ok(int K, int64_t G, int64_t in) {
    return (K == 2 && G % 16 == 0 && (128 % G == 0 || G % 128 == 0)) || (K == 8 && G % 32 == 0) ||
           (K == 4 && G % 32 == 0 && in % 64 == 0);
}

static int check_case(int fmt, int K, int64_t in, int64_t out, int64_t G, int64_t M, int use_perm, int threads,
                      int isa) {
    const int64_t ng = in / G;
    const int64_t rb = fmt == SIGN ? (in + 7) / 8 : fmt == TERN ? (in + 4) / 5 : (in * K + 7) / 8;
    uint8_t *data = malloc((size_t)(out * rb));
    uint16_t *scale = malloc(sizeof(uint16_t) * (size_t)(out * ng)), *zero = malloc(sizeof(uint16_t) * (size_t)(out * ng));
    int32_t *perm = malloc(sizeof(int32_t) * (size_t)in);
    float *x = malloc(sizeof(float) * (size_t)(M * in)), *y = malloc(sizeof(float) * (size_t)(M * out));
    double *w = malloc(sizeof(double) * (size_t)(out * in));
    double *wmag = malloc(sizeof(double) * (size_t)(out * in)); /* |s| (|q| + |z|): scale of the rounding error */
    for (int64_t i = 0; i < out * rb; i++) data[i] = fmt == TERN ? (uint8_t)rndi(243) : (uint8_t)rnd();
    if (fmt != TERN) /* the format pads rows with zero bits */
        for (int64_t o = 0; o < out; o++) {
            int64_t used = fmt == SIGN ? in : in * K;
            if (used % 8) data[o * rb + rb - 1] &= (uint8_t)((1u << (used % 8)) - 1);
        }
    for (int64_t i = 0; i < out * ng; i++) {
        scale[i] = rndi(20) == 0 ? (uint16_t)rndi(1024) /* subnormal */ : rnd_half(10, 17, rndi(8) == 0);
        zero[i] = rnd_half(12, 14 + K, rndi(6) == 0);
    }
    for (int64_t j = 0; j < in; j++) perm[j] = (int32_t)j;
    for (int64_t j = in - 1; j > 0; j--) {
        int64_t k = rndi(j + 1);
        int32_t t = perm[j]; perm[j] = perm[k]; perm[k] = t;
    }
    double big = rndi(4) == 0 ? 1000.0 : 1.0; /* sometimes large activations */
    for (int64_t i = 0; i < M * in; i++) x[i] = (float)(rndf() * big + (rndi(3) == 0 ? 0.5 * big : 0.0));

    /* reference dequantization, column order of the true weight */
    for (int64_t o = 0; o < out; o++) {
        const uint8_t *row = data + o * rb;
        for (int64_t j = 0; j < in; j++) {
            int64_t g = j / G;
            double s = ref_h2f(scale[o * ng + g]), v, qz = 0; /* qz = |q| + |z| for grid */
            if (fmt == SIGN) v = s * (bit_at(row, j) ? 1.0 : -1.0);
            else if (fmt == TERN) {
                int b = row[j / 5], t = b;
                for (int k = 0; k < j % 5; k++) t /= 3;
                v = s * (double)(t % 3 - 1);
            } else {
                int q = 0;
                for (int k = 0; k < K; k++) q |= bit_at(row, j * K + k) << k;
                v = s * ((double)q - ref_h2f(zero[o * ng + g]));
                qz = q + fabs(ref_h2f(zero[o * ng + g]));
            }
            int64_t col = (fmt == GRID && use_perm) ? perm[j] : j; /* stored column j is weight column perm[j] */
            w[o * in + col] = v;
            wmag[o * in + col] = fmt == GRID ? fabs(s) * qz : fabs(v);
        }
    }
    memset(y, 0xFF, sizeof(float) * (size_t)(M * out)); /* NaN: every output must be written */
    int rc = fmt == SIGN    ? salomi_sign_matmul(x, M, in, out, data, scale, G, y, threads)
             : fmt == TERN ? salomi_ternary_matmul(x, M, in, out, data, scale, G, y, threads)
                           : salomi_grid_matmul(x, M, in, out, data, K, scale, zero, G, use_perm ? perm : NULL, y,
                                                threads);
    int bad = 0;
    if (rc != 0) {
        printf("FAIL rc=%d\n", rc);
        bad = 1;
    }
    for (int64_t m = 0; m < M && !bad; m++)
        for (int64_t o = 0; o < out && !bad; o++) {
            double ref = 0, nx = 0, nw = 0;
            for (int64_t j = 0; j < in; j++) {
                ref += (double)x[m * in + j] * w[o * in + j];
                nx += (double)x[m * in + j] * x[m * in + j];
                nw += wmag[o * in + j] * wmag[o * in + j];
            }
            double err = fabs((double)y[m * out + o] - ref), tol = 1e-5 * sqrt(nx * nw) + 1e-30;
            if (!(err <= tol)) {
                printf("FAIL m=%lld o=%lld got %.9g want %.9g (err %.3g tol %.3g)\n", (long long)m, (long long)o,
                       (double)y[m * out + o], ref, err, tol);
                bad = 1;
            }
        }
    if (!bad && (fmt != GRID || grid_i8_ok(K, G, in)))
        bad = check_i8(fmt, K, x, M, in, out, data, scale, zero, G, fmt == GRID && use_perm ? perm : NULL, w, threads,
                       isa);
    if (bad)
        printf("  case: isa=%s fmt=%d K=%d in=%lld out=%lld G=%lld M=%lld perm=%d threads=%d\n", salomi_isa_name(isa),
               fmt, K, (long long)in, (long long)out, (long long)G, (long long)M, use_perm, threads);
    free(data), free(scale), free(zero), free(perm), free(x), free(y), free(w), free(wmag);
    return bad;
}

static int64_t pick_group(int64_t in) {
    int64_t divs[256];
    int n = 0;
    for (int64_t d = 1; d <= in && n < 256; d++)
        if (in % d == 0) divs[n++] = d;
    switch (rndi(4)) {
    case 0: return in; /* one group per row */
    case 1: /* SIMD-friendly multiples of 16 / 8 when there are some */
        for (int t = 0; t < 8; t++) {
            int64_t d = divs[rndi(n)];
            if (d % 8 == 0) return d;
        }
        return divs[rndi(n)];
    default: return divs[rndi(n)];
    }
}

int main(int argc, char **argv) {
    int n_cases = argc > 1 ? atoi(argv[1]) : 300;
    if (argc > 2) rng_state ^= strtoull(argv[2], NULL, 10) * 0x2545F4914F6CDD1Dull;
    static const int64_t ins[] = {1, 2, 3, 4, 5, 7, 8, 9, 10, 15, 16, 17, 24, 31, 32, 33, 40, 48, 63, 64, 65, 80,
                                  100, 128, 129, 192, 200, 255, 576, 1283, 1536, 2600};
    static const int64_t Ms[] = {1, 1, 1, 1, 2, 3, 4, 5, 7, 33, 70};
    static const int Ks[] = {1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3, 4};
    int failures = 0, total = 0;
    int best = salomi_cpu_isa();
    printf("cpu isa: %s\n", salomi_isa_name(best));

    /* argument checks */
    {
        float x[8] = {0}, y[2];
        uint8_t d[2] = {0};
        uint16_t s[2] = {0x3c00, 0x3c00}, z[2] = {0, 0};
        int32_t bad_perm[8] = {0, 1, 2, 3, 4, 5, 6, 8};
        int r1 = salomi_sign_matmul(x, 1, 8, 1, d, s, 3, y, 1);              /* 3 does not divide 8 */
        int r2 = salomi_grid_matmul(x, 1, 8, 1, d, 9, s, z, 8, NULL, y, 1);  /* bits 9 */
        int r3 = salomi_grid_matmul(x, 1, 8, 1, d, 1, s, z, 8, bad_perm, y, 1);
        int r4 = salomi_sign_matmul(x, 0, 8, 1, d, s, 8, y, 1);              /* M = 0 is fine */
        int r5 = salomi_sign_matmul_i8(x, 1, 8, 1, d, s, 3, y, 1);           /* 3 does not divide 8 */
        int r6 = salomi_ternary_matmul_i8(x, 0, 8, 1, d, s, 8, y, 1);        /* M = 0 is fine */
        int r7 = salomi_ternary_matmul_i8(NULL, 1, 8, 1, d, s, 8, y, 1);
        float x32[32] = {0};
        uint8_t d8[8] = {0};
        int32_t bad_perm32[32] = {0};
        for (int j = 0; j < 32; j++) bad_perm32[j] = j;
        bad_perm32[5] = 32;
        int r8 = salomi_grid_matmul_i8(x32, 1, 32, 1, d8, 3, s, z, 32, NULL, y, 1);       /* 3 bits */
        int r9 = salomi_grid_matmul_i8(x32, 1, 32, 1, d8, 2, s, z, 8, NULL, y, 1);        /* group 8 */
        int r10 = salomi_grid_matmul_i8(x32, 1, 32, 1, d8, 2, s, z, 32, bad_perm32, y, 1); /* perm out of range */
        int r11 = salomi_grid_matmul_i8(x32, 1, 32, 1, d8, 2, s, z, 32, NULL, y, 1);      /* fine */
        int r12 = salomi_grid_matmul_i8(x32, 1, 32, 1, d8, 4, s, z, 32, NULL, y, 1);      /* 4 bits, in % 64 */
        if (r1 != -1 || r2 != -1 || r3 != -1 || r4 != 0 || r5 != -1 || r6 != 0 || r7 != -1 || r8 != -1 || r9 != -1 ||
            r10 != -1 || r11 != 0 || r12 != -1) {
            printf("FAIL argument checks: %d %d %d %d %d %d %d %d %d %d %d %d\n", r1, r2, r3, r4, r5, r6, r7, r8, r9,
                   r10, r11, r12);
            failures++;
        }
    }

    for (int isa = 0; isa <= best; isa++) {
        if (salomi_set_isa(isa) != 0 || salomi_get_isa() != isa) {
            printf("FAIL cannot select isa %s\n", salomi_isa_name(isa));
            failures++;
            continue;
        }
        int f0 = failures;
        for (int c = 0; c < n_cases; c++) {
            int fmt = (int)rndi(3), K = Ks[rndi(12)];
            int64_t in = ins[rndi(sizeof ins / sizeof ins[0])];
            int64_t out = rndi(5) == 0 ? 1 : 1 + rndi(21);
            int64_t M = Ms[rndi(sizeof Ms / sizeof Ms[0])];
            if (in * out * M > 4000000) M = 1;
            int64_t G = pick_group(in);
            int threads = 1 + (int)rndi(3);
            failures += check_case(fmt, fmt == GRID ? K : 1, in, out, G, M, fmt == GRID && rndi(2), threads, isa);
            total++;
        }
        /* the 8- and 4-bit grid int8 kernels (embedding / head formats) need G % 32 == 0 (and
         * in % 64 == 0 for 4 bits): few random cases hit them, so add some: every multiple-of-32
         * group of a few widths, with a perm */
        static const int64_t ins8[] = {32, 64, 96, 192, 576, 1536};
        int extra = 0;
        for (size_t t = 0; t < sizeof ins8 / sizeof ins8[0]; t++)
            for (int64_t G = 32; G <= ins8[t]; G += 32)
                if (ins8[t] % G == 0)
                    for (int K = 4; K <= 8; K += 4) {
                        failures += check_case(GRID, K, ins8[t], 1 + rndi(13), G,
                                               Ms[rndi(sizeof Ms / sizeof Ms[0])] % 9, (int)rndi(2), 1 + (int)rndi(3),
                                               isa);
                        total++, extra++;
                    }
        printf("isa %-6s: %d cases, %d failures\n", salomi_isa_name(isa), n_cases + extra, failures - f0);
    }
    salomi_set_isa(-1);
    printf("%s: %d cases, %d failures\n", failures ? "FAILED" : "OK", total, failures);
    return failures ? 1 : 0;
}
