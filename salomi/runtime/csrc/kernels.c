/* salomi packed-weight matmul kernels (see kernels.h for the layouts and the API).
 *
 * Two code paths, both reading only the packed bytes and fp16 scales:
 *
 *  - GEMV (one activation row, decode) is memory bound, so it is fused: weights are
 *    decoded in registers and never stored. Per group we accumulate a vector of
 *    sum_j x_j * q_j and fold the group's scale in once per group:
 *        y += scale_g * (sum_j x_j q_j - zero_g * sum_j x_j)
 *    (sum_j x_j per group is computed once per call, it does not depend on the row).
 *    Sign uses a 256-entry table of +-1 float vectors (AVX2) or the bits themselves as
 *    an AVX-512 lane mask (masked add); ternary uses a 243-entry table of 5 decoded
 *    trits; grid K-bit codes are shifted/masked into int32 lanes and converted.
 *
 *  - GEMM (several activation rows, prefill) decodes a tile of NRT weight rows x KC
 *    columns into a small float buffer once (already scaled, exactly w = s*(q - z)),
 *    then runs a register-blocked float micro-kernel over blocks of MC activation rows,
 *    so each weight byte is decoded once per MC rows.
 *
 * ISA: every SIMD function is compiled for its own target with __attribute__((target))
 * and the one to use is chosen at run time (__builtin_cpu_supports, SALOMI_ISA env var,
 * or salomi_set_isa). The library itself is built without -march flags.
 *
 * Threads: output rows are split into contiguous ranges across a small persistent
 * pthread pool (workers spin briefly, then sleep), because creating threads per call
 * would cost more than a decode-size GEMV.
 */
#define _GNU_SOURCE
#include "kernels.h"
#include "kernels_internal.h"

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#if defined(__x86_64__) || defined(__i386__)
#define SALOMI_X86 1
#include <immintrin.h>
#else
#define SALOMI_X86 0
#endif

#define NRT 8     /* weight rows per GEMM tile */
#define KC 1280   /* columns per GEMM tile: a multiple of 5*16 so ternary bytes and 16-lane vectors align */
#define MC 64     /* activation rows per GEMM block: x block MC*KC*4 = 320 KB stays in L2 */
#define LDW (KC + 16)
#define MAX_THREADS 64

enum { FMT_SIGN, FMT_TERNARY, FMT_GRID };

typedef struct {
    int fmt, K;
    int64_t in, out, G, ng, rb; /* rb = bytes per packed row */
    const uint8_t *data;
    const uint16_t *scale, *zero; /* zero only for grid */
} layer_t;

typedef struct {
    const layer_t *L;
    const float *xp; /* activations (permuted for grid+perm), rows padded with zeros to ldx */
    int64_t ldx;
    const float *sx; /* M == 1 only: per-group sums of xp */
    float *y;
    int64_t M;
    int isa;
    _Atomic int err;
} job_t;

static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
static inline int64_t roundup(int64_t a, int64_t m) { return (a + m - 1) / m * m; }

/* ------------------------------------------------------------------ tables */

/* 32-byte aligned rows of 8 floats so a table entry is one aligned vector load. */
static float LUT_PM[256][8] __attribute__((aligned(64))); /* sign: bit k of the byte -> +1 / -1 */
static float LUT_01[256][8] __attribute__((aligned(64))); /* grid K=1: bit k -> 1 / 0 */
static float LUT_T3[256][8] __attribute__((aligned(64))); /* ternary: digit k -> t-1 (k<5), lanes 5..7 = 0 */
static uint8_t TRIT[256][5];                              /* base-3 digits (bytes > 242 are invalid but stay in range) */
static uint32_t LANEMASK[6][6][8] __attribute__((aligned(64))); /* all-ones in lanes [lo, hi) */

static void init_tables(void) {
    static const int pow3[5] = {1, 3, 9, 27, 81};
    for (int b = 0; b < 256; b++) {
        for (int k = 0; k < 8; k++) {
            LUT_PM[b][k] = (b >> k) & 1 ? 1.0f : -1.0f;
            LUT_01[b][k] = (float)((b >> k) & 1);
            LUT_T3[b][k] = 0.0f;
        }
        for (int k = 0; k < 5; k++) {
            TRIT[b][k] = (uint8_t)((b / pow3[k]) % 3);
            LUT_T3[b][k] = (float)TRIT[b][k] - 1.0f;
        }
    }
    for (int lo = 0; lo < 6; lo++)
        for (int hi = 0; hi < 6; hi++)
            for (int k = 0; k < 8; k++) LANEMASK[lo][hi][k] = (k >= lo && k < hi) ? 0xFFFFFFFFu : 0u;
}

static inline float h2f(uint16_t h) { return salomi_h2f(h); }

/* K-bit code j of a row (K <= 8 so it spans at most two bytes). */
static inline unsigned code_at(const uint8_t *row, int64_t rb, int64_t j, int K) {
    int64_t bit = j * K, byte = bit >> 3;
    unsigned v = row[byte];
    if (byte + 1 < rb) v |= (unsigned)row[byte + 1] << 8;
    return (v >> (bit & 7)) & ((1u << K) - 1u);
}

/* ------------------------------------------------------------------ ISA selection */

/* The one place the CPU is probed: the ISA level, and the extensions a kernel of that level
 * may use on top of it (salomi_cpu_ext). */
static unsigned g_cpu_ext = 0;

static int detect_isa(void) {
#if SALOMI_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512vbmi")) g_cpu_ext |= SALOMI_EXT_VBMI;
    if (__builtin_cpu_supports("avx512vnni")) g_cpu_ext |= SALOMI_EXT_VNNI;
    /* F16C converts the fp16 scales; every AVX2 CPU has it but check anyway. */
    int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    if (avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl"))
        return SALOMI_ISA_AVX512;
    if (avx2) return SALOMI_ISA_AVX2;
#endif
    return SALOMI_ISA_SCALAR;
}

static int g_best_isa = SALOMI_ISA_SCALAR;
static _Atomic int g_isa = SALOMI_ISA_SCALAR;

const char *salomi_isa_name(int isa) {
    switch (isa) {
    case SALOMI_ISA_AVX512: return "avx512";
    case SALOMI_ISA_AVX2: return "avx2";
    case SALOMI_ISA_SCALAR: return "scalar";
    default: return "unknown";
    }
}

/* SALOMI_ISA=avx512|avx2|scalar picks a path; a request above what the CPU has falls
 * back to the best available one (salomi_get_isa tells which one is in use). */
static int default_isa(void) {
    const char *e = getenv("SALOMI_ISA");
    if (e && *e) {
        for (int i = SALOMI_ISA_SCALAR; i <= SALOMI_ISA_AVX512; i++)
            if (strcmp(e, salomi_isa_name(i)) == 0) return i <= g_best_isa ? i : g_best_isa;
    }
    return g_best_isa;
}

static pthread_once_t g_once = PTHREAD_ONCE_INIT;
static void init_once(void) {
    init_tables();
    g_best_isa = detect_isa();
    atomic_store(&g_isa, default_isa());
}
static inline void ensure_init(void) { pthread_once(&g_once, init_once); }

int salomi_cpu_isa(void) { ensure_init(); return g_best_isa; }
unsigned salomi_cpu_ext(void) { ensure_init(); return g_cpu_ext; }
int salomi_get_isa(void) { ensure_init(); return atomic_load(&g_isa); }
int salomi_set_isa(int isa) {
    ensure_init();
    if (isa == -1) { atomic_store(&g_isa, default_isa()); return 0; }
    if (isa < SALOMI_ISA_SCALAR || isa > g_best_isa) return -1;
    atomic_store(&g_isa, isa);
    return 0;
}

/* ------------------------------------------------------------------ portable path */

/* Dequantize rows [o, o+nr) x columns [k0, k0+kcv) into wt (row stride LDW) as
 * w = s * (q - z), exactly the reference's arithmetic; columns [kcv, kcp) are zeroed
 * so the micro-kernel can run whole vectors. No alignment requirements on k0 or G. */
static void tile_generic(const layer_t *L, int64_t o, int nr, int64_t k0, int64_t kcv, int64_t kcp, float *wt) {
    const int64_t G = L->G, ng = L->ng, rb = L->rb;
    for (int r = 0; r < nr; r++) {
        const uint8_t *row = L->data + (o + r) * rb;
        const uint16_t *sc = L->scale + (o + r) * ng;
        const uint16_t *zr = L->fmt == FMT_GRID ? L->zero + (o + r) * ng : NULL;
        float *w = wt + (int64_t)r * LDW - k0;
        for (int64_t j = k0; j < k0 + kcv;) {
            int64_t g = j / G, gend = min64((g + 1) * G, k0 + kcv);
            float s = h2f(sc[g]);
            if (L->fmt == FMT_SIGN) {
                for (; j < gend; j++) w[j] = s * ((row[j >> 3] >> (j & 7)) & 1 ? 1.0f : -1.0f);
            } else if (L->fmt == FMT_TERNARY) {
                for (; j < gend; j++) w[j] = s * ((float)TRIT[row[j / 5]][j % 5] - 1.0f);
            } else {
                float z = h2f(zr[g]);
                for (; j < gend; j++) w[j] = s * ((float)code_at(row, rb, j, L->K) - z);
            }
        }
        for (int64_t j = k0 + kcv; j < k0 + kcp; j++) w[j] = 0.0f;
    }
}

/* y[b*ldy + r] (+)= dot(w_r, x_b) over kcp columns; 8 partial sums per dot for accuracy. */
static void mk_scalar(int R, int B, const float *w, const float *x, int64_t ldx, int64_t kcp, float *y, int64_t ldy,
                      int accumulate) {
    for (int r = 0; r < R; r++)
        for (int b = 0; b < B; b++) {
            const float *wr = w + (int64_t)r * LDW, *xb = x + b * ldx;
            float p[8] = {0};
            for (int64_t k = 0; k < kcp; k += 8)
                for (int t = 0; t < 8; t++) p[t] += wr[k + t] * xb[k + t];
            float v = ((p[0] + p[4]) + (p[1] + p[5])) + ((p[2] + p[6]) + (p[3] + p[7]));
            float *d = y + b * ldy + r;
            *d = accumulate ? *d + v : v;
        }
}

/* ------------------------------------------------------------------ AVX2 + FMA + F16C */
#if SALOMI_X86

#define A2 __attribute__((target("avx2,fma,f16c")))
#define A2I static inline __attribute__((target("avx2,fma,f16c"), always_inline))

A2I float hsum8(__m256 v) {
    __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    a = _mm_add_ps(a, _mm_movehl_ps(a, a));
    a = _mm_add_ss(a, _mm_movehdup_ps(a));
    return _mm_cvtss_f32(a);
}

A2I float h2f_hw(uint16_t h) { return _cvtsh_ss(h); }

/* Bytes a grid_dec8 of K-bit codes reads (may exceed the K it needs: a 4-byte load for
 * K=3, an 8-byte load for K=5..7); chunks near the row end are decoded from a copy. */
static inline int ls8(int K) { return K == 1 ? 1 : K == 2 ? 2 : K <= 4 ? 4 : 8; }

/* 8 consecutive K-bit codes (chunk-aligned: they start at bit 0 of p) as floats. */
A2I __m256 grid_dec8(const uint8_t *p, int K) {
    switch (K) {
    case 1: return _mm256_load_ps(LUT_01[p[0]]);
    case 2: {
        uint16_t v;
        memcpy(&v, p, 2);
        __m256i t = _mm256_srlv_epi32(_mm256_set1_epi32(v), _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14));
        return _mm256_cvtepi32_ps(_mm256_and_si256(t, _mm256_set1_epi32(3)));
    }
    case 3: {
        uint32_t v;
        memcpy(&v, p, 4);
        __m256i t = _mm256_srlv_epi32(_mm256_set1_epi32((int)v), _mm256_setr_epi32(0, 3, 6, 9, 12, 15, 18, 21));
        return _mm256_cvtepi32_ps(_mm256_and_si256(t, _mm256_set1_epi32(7)));
    }
    case 4: {
        uint32_t v;
        memcpy(&v, p, 4);
        __m256i t = _mm256_srlv_epi32(_mm256_set1_epi32((int)v), _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28));
        return _mm256_cvtepi32_ps(_mm256_and_si256(t, _mm256_set1_epi32(15)));
    }
    case 8: return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p)));
    default: { /* K = 5..7: codes 0..3 sit in the low 32 bits, codes 4..7 in the 32 bits from 4K */
        uint64_t v;
        memcpy(&v, p, 8);
        __m256i t = _mm256_set_m128i(_mm_set1_epi32((int)(uint32_t)(v >> (4 * K))), _mm_set1_epi32((int)(uint32_t)v));
        t = _mm256_srlv_epi32(t, _mm256_setr_epi32(0, K, 2 * K, 3 * K, 0, K, 2 * K, 3 * K));
        return _mm256_cvtepi32_ps(_mm256_and_si256(t, _mm256_set1_epi32((1 << K) - 1)));
    }
    }
}

/* Number of leading 8-code chunks whose grid_dec8 load stays inside a row of rb bytes. */
static inline int64_t safe_chunks8(int64_t rb, int K, int64_t nc) {
    int ls = ls8(K);
    return rb >= ls ? min64((rb - ls) / K + 1, nc) : 0;
}

/* ---- fused GEMV, R (1 or 4) output rows at a time; xp padded with >= 16 zeros. */

/* sign: chunk c = byte c = columns [8c, 8c+8). Needs G % 8 == 0 or a single group. */
A2I void sign_gemv_avx2_impl(const layer_t *L, const float *xp, int64_t o, int R, float *y) {
    const int64_t rb = L->rb, ng = L->ng, cpg = ng == 1 ? rb : L->G / 8;
    const uint8_t *row[4];
    __m256 yv[4];
    for (int r = 0; r < R; r++) row[r] = L->data + (o + r) * rb, yv[r] = _mm256_setzero_ps();
    for (int64_t g = 0; g < ng; g++) {
        __m256 a0[4], a1[4]; /* two accumulator sets hide FMA latency */
        for (int r = 0; r < R; r++) a0[r] = a1[r] = _mm256_setzero_ps();
        int64_t c = g * cpg, c1 = c + cpg;
        for (; c + 2 <= c1; c += 2) {
            __m256 x0 = _mm256_loadu_ps(xp + 8 * c), x1 = _mm256_loadu_ps(xp + 8 * c + 8);
            for (int r = 0; r < R; r++) {
                a0[r] = _mm256_fmadd_ps(x0, _mm256_load_ps(LUT_PM[row[r][c]]), a0[r]);
                a1[r] = _mm256_fmadd_ps(x1, _mm256_load_ps(LUT_PM[row[r][c + 1]]), a1[r]);
            }
        }
        if (c < c1) {
            __m256 x0 = _mm256_loadu_ps(xp + 8 * c);
            for (int r = 0; r < R; r++) a0[r] = _mm256_fmadd_ps(x0, _mm256_load_ps(LUT_PM[row[r][c]]), a0[r]);
        }
        for (int r = 0; r < R; r++) {
            __m256 s = _mm256_set1_ps(h2f_hw(L->scale[(o + r) * ng + g]));
            yv[r] = _mm256_fmadd_ps(s, _mm256_add_ps(a0[r], a1[r]), yv[r]);
        }
    }
    for (int r = 0; r < R; r++) y[o + r] = hsum8(yv[r]);
}

/* grid: chunk c = K bytes = columns [8c, 8c+8). Needs G % 8 == 0 or a single group. */
A2I void grid_gemv_avx2_impl(const layer_t *L, const float *xp, const float *sx, int64_t o, int R, float *y,
                             const int K) {
    const int64_t rb = L->rb, ng = L->ng, nc = (L->in + 7) / 8, cpg = ng == 1 ? nc : L->G / 8;
    const int64_t csafe = safe_chunks8(rb, K, nc);
    const uint8_t *row[4];
    __m256 yv[4];
    float ys[4];
    for (int r = 0; r < R; r++) row[r] = L->data + (o + r) * rb, yv[r] = _mm256_setzero_ps(), ys[r] = 0.0f;
    for (int64_t g = 0; g < ng; g++) {
        __m256 a0[4], a1[4];
        for (int r = 0; r < R; r++) a0[r] = a1[r] = _mm256_setzero_ps();
        int64_t c = g * cpg, c1 = c + cpg, cf = min64(c1, csafe);
        for (; c + 2 <= cf; c += 2) {
            __m256 x0 = _mm256_loadu_ps(xp + 8 * c), x1 = _mm256_loadu_ps(xp + 8 * c + 8);
            for (int r = 0; r < R; r++) {
                a0[r] = _mm256_fmadd_ps(x0, grid_dec8(row[r] + c * K, K), a0[r]);
                a1[r] = _mm256_fmadd_ps(x1, grid_dec8(row[r] + (c + 1) * K, K), a1[r]);
            }
        }
        for (; c < c1; c++) { /* odd chunk, or the last chunks whose wide load would leave the row */
            __m256 x0 = _mm256_loadu_ps(xp + 8 * c);
            for (int r = 0; r < R; r++) {
                const uint8_t *p = row[r] + c * K;
                uint8_t tmp[16] = {0};
                if (c >= csafe) memcpy(tmp, p, (size_t)(rb - c * K)), p = tmp;
                a0[r] = _mm256_fmadd_ps(x0, grid_dec8(p, K), a0[r]);
            }
        }
        for (int r = 0; r < R; r++) {
            float s = h2f_hw(L->scale[(o + r) * ng + g]), z = h2f_hw(L->zero[(o + r) * ng + g]);
            yv[r] = _mm256_fmadd_ps(_mm256_set1_ps(s), _mm256_add_ps(a0[r], a1[r]), yv[r]);
            ys[r] -= s * z * sx[g];
        }
    }
    for (int r = 0; r < R; r++) y[o + r] = hsum8(yv[r]) + ys[r];
}

/* ternary: byte b holds columns [5b, 5b+5); one FMA of x[5b..5b+7] with the byte's
 * table entry (lanes 5..7 are zero). Groups need not align with bytes: a byte that
 * straddles a group edge is applied twice with complementary lane masks. Any G. */
A2I void ternary_gemv_avx2_impl(const layer_t *L, const float *xp, int64_t o, int R, float *y) {
    const int64_t rb = L->rb, ng = L->ng, G = L->G;
    const uint8_t *row[4];
    __m256 yv[4];
    for (int r = 0; r < R; r++) row[r] = L->data + (o + r) * rb, yv[r] = _mm256_setzero_ps();
    for (int64_t g = 0; g < ng; g++) {
        __m256 a0[4], a1[4];
        for (int r = 0; r < R; r++) a0[r] = a1[r] = _mm256_setzero_ps();
        const int64_t s = g * G, e = s + G;
        int64_t b = s / 5;
        if (s % 5) { /* leading partial byte: lanes [s%5, min(5, e-5b)) */
            int lo = (int)(s % 5), hi = (int)min64(5, e - 5 * b);
            __m256 x0 = _mm256_and_ps(_mm256_loadu_ps(xp + 5 * b), _mm256_load_ps((const float *)LANEMASK[lo][hi]));
            for (int r = 0; r < R; r++) a0[r] = _mm256_fmadd_ps(x0, _mm256_load_ps(LUT_T3[row[r][b]]), a0[r]);
            b++;
        }
        const int64_t bfull = e / 5; /* bytes [b, bfull) lie wholly inside the group */
        for (; b + 2 <= bfull; b += 2) {
            __m256 x0 = _mm256_loadu_ps(xp + 5 * b), x1 = _mm256_loadu_ps(xp + 5 * b + 5);
            for (int r = 0; r < R; r++) {
                a0[r] = _mm256_fmadd_ps(x0, _mm256_load_ps(LUT_T3[row[r][b]]), a0[r]);
                a1[r] = _mm256_fmadd_ps(x1, _mm256_load_ps(LUT_T3[row[r][b + 1]]), a1[r]);
            }
        }
        if (b < bfull) {
            __m256 x0 = _mm256_loadu_ps(xp + 5 * b);
            for (int r = 0; r < R; r++) a0[r] = _mm256_fmadd_ps(x0, _mm256_load_ps(LUT_T3[row[r][b]]), a0[r]);
            b++;
        }
        if (5 * b < e) { /* trailing partial byte: lanes [0, e-5b) */
            __m256 x0 = _mm256_and_ps(_mm256_loadu_ps(xp + 5 * b),
                                      _mm256_load_ps((const float *)LANEMASK[0][(int)(e - 5 * b)]));
            for (int r = 0; r < R; r++) a0[r] = _mm256_fmadd_ps(x0, _mm256_load_ps(LUT_T3[row[r][b]]), a0[r]);
        }
        for (int r = 0; r < R; r++) {
            __m256 sc = _mm256_set1_ps(h2f_hw(L->scale[(o + r) * ng + g]));
            yv[r] = _mm256_fmadd_ps(sc, _mm256_add_ps(a0[r], a1[r]), yv[r]);
        }
    }
    for (int r = 0; r < R; r++) y[o + r] = hsum8(yv[r]);
}

#define GRID_K_SWITCH(CALL_R)                                                                                         \
    switch (L->K) {                                                                                                   \
    case 1: CALL_R(1); break;                                                                                         \
    case 2: CALL_R(2); break;                                                                                         \
    case 3: CALL_R(3); break;                                                                                         \
    case 4: CALL_R(4); break;                                                                                         \
    case 5: CALL_R(5); break;                                                                                         \
    case 6: CALL_R(6); break;                                                                                         \
    case 7: CALL_R(7); break;                                                                                         \
    default: CALL_R(8); break;                                                                                        \
    }

A2 static void gemv_fused_avx2(const layer_t *L, const float *xp, const float *sx, int64_t o0, int64_t o1, float *y) {
    int64_t o = o0;
    switch (L->fmt) {
    case FMT_SIGN:
        for (; o + 4 <= o1; o += 4) sign_gemv_avx2_impl(L, xp, o, 4, y);
        for (; o < o1; o++) sign_gemv_avx2_impl(L, xp, o, 1, y);
        break;
    case FMT_TERNARY:
        for (; o + 4 <= o1; o += 4) ternary_gemv_avx2_impl(L, xp, o, 4, y);
        for (; o < o1; o++) ternary_gemv_avx2_impl(L, xp, o, 1, y);
        break;
    default:
#define GRID_ROWS(K)                                                                                                  \
    for (; o + 4 <= o1; o += 4) grid_gemv_avx2_impl(L, xp, sx, o, 4, y, K);                                          \
    for (; o < o1; o++) grid_gemv_avx2_impl(L, xp, sx, o, 1, y, K)
        GRID_K_SWITCH(GRID_ROWS)
#undef GRID_ROWS
    }
}

/* ---- GEMM tile decode: SIMD code expansion, then per-group affine pass. k0 is a
 * multiple of KC (so of 8 and of 5), any G. */
A2I void span_scale(float *w, int64_t n, float s) {
    __m256 vs = _mm256_set1_ps(s);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(w + i, _mm256_mul_ps(_mm256_loadu_ps(w + i), vs));
    for (; i < n; i++) w[i] *= s;
}
A2I void span_affine(float *w, int64_t n, float s, float z) { /* w = s * (q - z), same rounding as the reference */
    __m256 vs = _mm256_set1_ps(s), vz = _mm256_set1_ps(z);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(w + i, _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(w + i), vz), vs));
    for (; i < n; i++) w[i] = s * (w[i] - z);
}

A2I void grid_tile_row(const uint8_t *row, int64_t rb, int64_t k0, int64_t kcv, int64_t nc, float *w, const int K) {
    const int64_t c0 = k0 / 8, nch = (kcv + 7) / 8, csafe = safe_chunks8(rb, K, nc);
    for (int64_t i = 0; i < nch; i++) {
        int64_t c = c0 + i;
        const uint8_t *p = row + c * K;
        uint8_t tmp[16] = {0};
        if (c >= csafe) memcpy(tmp, p, (size_t)(rb - c * K)), p = tmp;
        _mm256_storeu_ps(w + 8 * i, grid_dec8(p, K));
    }
}

A2 static void tile_avx2(const layer_t *L, int64_t o, int nr, int64_t k0, int64_t kcv, int64_t kcp, float *wt) {
    const int64_t G = L->G, ng = L->ng, rb = L->rb, nc = (L->in + 7) / 8;
    for (int r = 0; r < nr; r++) {
        const uint8_t *row = L->data + (o + r) * rb;
        float *w = wt + (int64_t)r * LDW;
        if (L->fmt == FMT_SIGN) {
            for (int64_t i = 0, n = (kcv + 7) / 8; i < n; i++)
                _mm256_storeu_ps(w + 8 * i, _mm256_load_ps(LUT_PM[row[k0 / 8 + i]]));
        } else if (L->fmt == FMT_TERNARY) {
            /* overlapping 8-float stores, 5 apart, in increasing order: each store's 3
             * zero lanes are overwritten by the next byte; LDW leaves room for the last. */
            for (int64_t i = 0, n = (kcv + 4) / 5; i < n; i++)
                _mm256_storeu_ps(w + 5 * i, _mm256_load_ps(LUT_T3[row[k0 / 5 + i]]));
        } else {
#define GRID_TILE(K) grid_tile_row(row, rb, k0, kcv, nc, w, K)
            GRID_K_SWITCH(GRID_TILE)
#undef GRID_TILE
        }
        const uint16_t *sc = L->scale + (o + r) * ng;
        for (int64_t j = k0; j < k0 + kcv;) {
            int64_t g = j / G, gend = min64((g + 1) * G, k0 + kcv);
            if (L->fmt == FMT_GRID)
                span_affine(w + (j - k0), gend - j, h2f_hw(sc[g]), h2f_hw(L->zero[(o + r) * ng + g]));
            else
                span_scale(w + (j - k0), gend - j, h2f_hw(sc[g]));
            j = gend;
        }
        for (int64_t j = kcv; j < kcp; j++) w[j] = 0.0f;
    }
}

/* ---- GEMM micro-kernel: R weight rows x B activation rows, kcp % 8 == 0. */
#define MB_AVX2 3
A2I void mk_avx2_impl(const int R, const int B, const float *w, const float *x, int64_t ldx, int64_t kcp, float *y,
                      int64_t ldy, int accumulate) {
    __m256 a[4][MB_AVX2];
    for (int r = 0; r < R; r++)
        for (int b = 0; b < B; b++) a[r][b] = _mm256_setzero_ps();
    for (int64_t k = 0; k < kcp; k += 8) {
        __m256 xv[MB_AVX2];
        for (int b = 0; b < B; b++) xv[b] = _mm256_loadu_ps(x + b * ldx + k);
        for (int r = 0; r < R; r++) {
            __m256 wv = _mm256_loadu_ps(w + (int64_t)r * LDW + k);
            for (int b = 0; b < B; b++) a[r][b] = _mm256_fmadd_ps(wv, xv[b], a[r][b]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int b = 0; b < B; b++) {
            float v = hsum8(a[r][b]), *d = y + b * ldy + r;
            *d = accumulate ? *d + v : v;
        }
}

A2 static void mk_avx2(int R, int B, const float *w, const float *x, int64_t ldx, int64_t kcp, float *y, int64_t ldy,
                       int acc) {
#define MK(RR, BB)                                                                                                    \
    case RR * 8 + BB: mk_avx2_impl(RR, BB, w, x, ldx, kcp, y, ldy, acc); break;
    switch (R * 8 + B) {
        MK(1, 1) MK(1, 2) MK(1, 3) MK(2, 1) MK(2, 2) MK(2, 3) MK(3, 1) MK(3, 2) MK(3, 3) MK(4, 1) MK(4, 2) MK(4, 3)
    }
#undef MK
}

/* ------------------------------------------------------------------ AVX-512 (F/BW/VL)
 * Not exercised on the development machine (AVX2 only); written to mirror the AVX2
 * code. VNNI / VPOPCNTDQ are deliberately not used: activations stay float32, and the
 * sign format needs no popcount because its bits are used directly as a lane mask. */

#define A5 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")))
#define A5I static inline __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c"), always_inline))

/* Bytes a grid_dec16 reads from the chunk start. */
static inline int ls16(int K) { return K == 1 ? 2 : K == 2 ? 4 : K == 4 ? 8 : K == 8 ? 16 : K + ls8(K); }

A5I __m512 grid_dec16(const uint8_t *p, int K) {
    switch (K) {
    case 2: {
        uint32_t v;
        memcpy(&v, p, 4);
        __m512i t = _mm512_srlv_epi32(_mm512_set1_epi32((int)v),
                                      _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30));
        return _mm512_cvtepi32_ps(_mm512_and_si512(t, _mm512_set1_epi32(3)));
    }
    case 4: { /* split nibbles and interleave them back into code order, then widen */
        __m128i b = _mm_loadl_epi64((const __m128i *)p), m = _mm_set1_epi8(0x0F);
        __m128i q = _mm_unpacklo_epi8(_mm_and_si128(b, m), _mm_and_si128(_mm_srli_epi16(b, 4), m));
        return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(q));
    }
    case 8: return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p)));
    default: { /* two 8-code halves; the second starts K bytes in */
        __m256 lo = grid_dec8(p, K), hi = grid_dec8(p + K, K);
        return _mm512_castpd_ps(
            _mm512_insertf64x4(_mm512_castpd256_pd512(_mm256_castps_pd(lo)), _mm256_castps_pd(hi), 1));
    }
    }
}

/* sign (and grid K=1): chunk c = 16 columns = bytes 2c, 2c+1 used as a lane mask:
 * s1 = sum of x where the bit is set, then sum_j x_j (2b_j - 1) = 2 s1 - sum_j x_j.
 * Needs G % 16 == 0 or a single group. */
A5I void bits_gemv_avx512_impl(const layer_t *L, const float *xp, const float *sx, int64_t o, int R, float *y,
                               int is_grid) {
    const int64_t rb = L->rb, ng = L->ng, nc = (L->in + 15) / 16, cpg = ng == 1 ? nc : L->G / 16;
    const int64_t csafe = min64(rb / 2, nc); /* chunks whose 2-byte mask lies inside the row */
    const uint8_t *row[4];
    __m512 yv[4];
    float ys[4];
    for (int r = 0; r < R; r++) row[r] = L->data + (o + r) * rb, yv[r] = _mm512_setzero_ps(), ys[r] = 0.0f;
    for (int64_t g = 0; g < ng; g++) {
        __m512 a0[4], a1[4];
        for (int r = 0; r < R; r++) a0[r] = a1[r] = _mm512_setzero_ps();
        int64_t c = g * cpg, c1 = c + cpg, cf = min64(c1, csafe);
        for (; c + 2 <= cf; c += 2) {
            __m512 x0 = _mm512_loadu_ps(xp + 16 * c), x1 = _mm512_loadu_ps(xp + 16 * c + 16);
            for (int r = 0; r < R; r++) {
                uint16_t m0, m1;
                memcpy(&m0, row[r] + 2 * c, 2);
                memcpy(&m1, row[r] + 2 * c + 2, 2);
                a0[r] = _mm512_mask_add_ps(a0[r], (__mmask16)m0, a0[r], x0);
                a1[r] = _mm512_mask_add_ps(a1[r], (__mmask16)m1, a1[r], x1);
            }
        }
        for (; c < c1; c++) {
            __m512 x0 = _mm512_loadu_ps(xp + 16 * c);
            for (int r = 0; r < R; r++) {
                uint16_t m = row[r][2 * c];
                if (2 * c + 1 < rb) m |= (uint16_t)(row[r][2 * c + 1] << 8);
                a0[r] = _mm512_mask_add_ps(a0[r], (__mmask16)m, a0[r], x0);
            }
        }
        for (int r = 0; r < R; r++) {
            float s = h2f_hw(L->scale[(o + r) * ng + g]);
            __m512 acc = _mm512_add_ps(a0[r], a1[r]);
            if (is_grid) { /* w = s (b - z): s * s1 - s z sum x */
                yv[r] = _mm512_fmadd_ps(_mm512_set1_ps(s), acc, yv[r]);
                ys[r] -= s * h2f_hw(L->zero[(o + r) * ng + g]) * sx[g];
            } else { /* w = s (2b - 1) */
                yv[r] = _mm512_fmadd_ps(_mm512_set1_ps(2.0f * s), acc, yv[r]);
                ys[r] -= s * sx[g];
            }
        }
    }
    for (int r = 0; r < R; r++) y[o + r] = _mm512_reduce_add_ps(yv[r]) + ys[r];
}

/* grid K >= 2: chunk c = 16 codes = 2K bytes. Needs G % 16 == 0 or a single group. */
A5I void grid_gemv_avx512_impl(const layer_t *L, const float *xp, const float *sx, int64_t o, int R, float *y,
                               const int K) {
    const int64_t rb = L->rb, ng = L->ng, nc = (L->in + 15) / 16, cpg = ng == 1 ? nc : L->G / 16;
    const int ls = ls16(K);
    const int64_t csafe = rb >= ls ? min64((rb - ls) / (2 * K) + 1, nc) : 0;
    const uint8_t *row[4];
    __m512 yv[4];
    float ys[4];
    for (int r = 0; r < R; r++) row[r] = L->data + (o + r) * rb, yv[r] = _mm512_setzero_ps(), ys[r] = 0.0f;
    for (int64_t g = 0; g < ng; g++) {
        __m512 a0[4], a1[4];
        for (int r = 0; r < R; r++) a0[r] = a1[r] = _mm512_setzero_ps();
        int64_t c = g * cpg, c1 = c + cpg, cf = min64(c1, csafe);
        for (; c + 2 <= cf; c += 2) {
            __m512 x0 = _mm512_loadu_ps(xp + 16 * c), x1 = _mm512_loadu_ps(xp + 16 * c + 16);
            for (int r = 0; r < R; r++) {
                a0[r] = _mm512_fmadd_ps(x0, grid_dec16(row[r] + c * 2 * K, K), a0[r]);
                a1[r] = _mm512_fmadd_ps(x1, grid_dec16(row[r] + (c + 1) * 2 * K, K), a1[r]);
            }
        }
        for (; c < c1; c++) {
            __m512 x0 = _mm512_loadu_ps(xp + 16 * c);
            for (int r = 0; r < R; r++) {
                const uint8_t *p = row[r] + c * 2 * K;
                uint8_t tmp[32] = {0};
                if (c >= csafe) memcpy(tmp, p, (size_t)(rb - c * 2 * K)), p = tmp;
                a0[r] = _mm512_fmadd_ps(x0, grid_dec16(p, K), a0[r]);
            }
        }
        for (int r = 0; r < R; r++) {
            float s = h2f_hw(L->scale[(o + r) * ng + g]), z = h2f_hw(L->zero[(o + r) * ng + g]);
            yv[r] = _mm512_fmadd_ps(_mm512_set1_ps(s), _mm512_add_ps(a0[r], a1[r]), yv[r]);
            ys[r] -= s * z * sx[g];
        }
    }
    for (int r = 0; r < R; r++) y[o + r] = _mm512_reduce_add_ps(yv[r]) + ys[r];
}

A5 static void gemv_fused_avx512(const layer_t *L, const float *xp, const float *sx, int64_t o0, int64_t o1,
                                 float *y) {
    int64_t o = o0;
    if (L->fmt == FMT_SIGN || (L->fmt == FMT_GRID && L->K == 1)) {
        int is_grid = L->fmt == FMT_GRID;
        for (; o + 4 <= o1; o += 4) bits_gemv_avx512_impl(L, xp, sx, o, 4, y, is_grid);
        for (; o < o1; o++) bits_gemv_avx512_impl(L, xp, sx, o, 1, y, is_grid);
        return;
    }
#define GRID_ROWS(K)                                                                                                  \
    for (; o + 4 <= o1; o += 4) grid_gemv_avx512_impl(L, xp, sx, o, 4, y, K);                                        \
    for (; o < o1; o++) grid_gemv_avx512_impl(L, xp, sx, o, 1, y, K)
    GRID_K_SWITCH(GRID_ROWS)
#undef GRID_ROWS
}

#define MB_AVX512 6
A5I void mk_avx512_impl(const int R, const int B, const float *w, const float *x, int64_t ldx, int64_t kcp, float *y,
                        int64_t ldy, int accumulate) {
    __m512 a[4][MB_AVX512];
    for (int r = 0; r < R; r++)
        for (int b = 0; b < B; b++) a[r][b] = _mm512_setzero_ps();
    for (int64_t k = 0; k < kcp; k += 16) { /* kcp is a multiple of 16 */
        __m512 xv[MB_AVX512];
        for (int b = 0; b < B; b++) xv[b] = _mm512_loadu_ps(x + b * ldx + k);
        for (int r = 0; r < R; r++) {
            __m512 wv = _mm512_loadu_ps(w + (int64_t)r * LDW + k);
            for (int b = 0; b < B; b++) a[r][b] = _mm512_fmadd_ps(wv, xv[b], a[r][b]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int b = 0; b < B; b++) {
            float v = _mm512_reduce_add_ps(a[r][b]), *d = y + b * ldy + r;
            *d = accumulate ? *d + v : v;
        }
}

A5 static void mk_avx512(int R, int B, const float *w, const float *x, int64_t ldx, int64_t kcp, float *y,
                         int64_t ldy, int acc) {
#define MK(RR, BB)                                                                                                    \
    case RR * 8 + BB: mk_avx512_impl(RR, BB, w, x, ldx, kcp, y, ldy, acc); break;
    switch (R * 8 + B) {
        MK(1, 1) MK(1, 2) MK(1, 3) MK(1, 4) MK(1, 5) MK(1, 6)
        MK(2, 1) MK(2, 2) MK(2, 3) MK(2, 4) MK(2, 5) MK(2, 6)
        MK(3, 1) MK(3, 2) MK(3, 3) MK(3, 4) MK(3, 5) MK(3, 6)
        MK(4, 1) MK(4, 2) MK(4, 3) MK(4, 4) MK(4, 5) MK(4, 6)
    }
#undef MK
}

#endif /* SALOMI_X86 */

/* ------------------------------------------------------------------ per-thread work */

/* Can the fused GEMV handle this layer on this ISA? (Otherwise GEMV goes through the
 * tile path, which accepts any group size.) */
static int fused_isa(int isa, const layer_t *L) {
#if SALOMI_X86
    if (isa == SALOMI_ISA_AVX512 && L->fmt != FMT_TERNARY && (L->G % 16 == 0 || L->ng == 1)) return SALOMI_ISA_AVX512;
    if (isa >= SALOMI_ISA_AVX2 && (L->fmt == FMT_TERNARY || L->G % 8 == 0 || L->ng == 1)) return SALOMI_ISA_AVX2;
#else
    (void)isa; (void)L;
#endif
    return -1;
}

static void gemm_tiled(job_t *J, int64_t o0, int64_t o1) {
    const layer_t *L = J->L;
    float *wt = aligned_alloc(64, sizeof(float) * NRT * LDW);
    if (!wt) { atomic_store(&J->err, -2); return; }
    const int isa = J->isa;
    const int mb = isa == SALOMI_ISA_AVX512 ? 6 : isa == SALOMI_ISA_AVX2 ? 3 : 4;
    for (int64_t m0 = 0; m0 < J->M; m0 += MC) {
        const int64_t mend = min64(J->M, m0 + MC);
        for (int64_t ot = o0; ot < o1; ot += NRT) {
            const int nr = (int)min64(NRT, o1 - ot);
            for (int64_t k0 = 0; k0 < L->in; k0 += KC) {
                const int64_t kcv = min64(KC, L->in - k0), kcp = roundup(kcv, 16);
#if SALOMI_X86
                if (isa >= SALOMI_ISA_AVX2) tile_avx2(L, ot, nr, k0, kcv, kcp, wt);
                else
#endif
                    tile_generic(L, ot, nr, k0, kcv, kcp, wt);
                for (int r = 0; r < nr; r += 4) {
                    const int R = nr - r < 4 ? nr - r : 4;
                    for (int64_t m = m0; m < mend; m += mb) {
                        const int B = (int)min64(mb, mend - m);
                        const float *w = wt + (int64_t)r * LDW, *x = J->xp + m * J->ldx + k0;
                        float *y = J->y + m * L->out + ot + r;
#if SALOMI_X86
                        if (isa == SALOMI_ISA_AVX512) mk_avx512(R, B, w, x, J->ldx, kcp, y, L->out, k0 > 0);
                        else if (isa == SALOMI_ISA_AVX2) mk_avx2(R, B, w, x, J->ldx, kcp, y, L->out, k0 > 0);
                        else
#endif
                            mk_scalar(R, B, w, x, J->ldx, kcp, y, L->out, k0 > 0);
                    }
                }
            }
        }
    }
    free(wt);
}

static void run_task(void *ctx, int tid, int nt) {
    job_t *J = ctx;
    const layer_t *L = J->L;
    /* contiguous 8-row-aligned ranges: whole GEMM tiles, no shared cache lines in y */
    const int64_t per = roundup((L->out + nt - 1) / nt, 8);
    const int64_t o0 = tid * per, o1 = min64(L->out, o0 + per);
    if (o0 >= o1) return;
    if (J->M == 1) {
        int f = fused_isa(J->isa, L);
#if SALOMI_X86
        if (f == SALOMI_ISA_AVX512) { gemv_fused_avx512(L, J->xp, J->sx, o0, o1, J->y); return; }
        if (f == SALOMI_ISA_AVX2) { gemv_fused_avx2(L, J->xp, J->sx, o0, o1, J->y); return; }
#else
        (void)f;
#endif
    }
    gemm_tiled(J, o0, o1);
}

/* ------------------------------------------------------------------ thread pool */

typedef void (*task_fn)(void *ctx, int tid, int nt);

static pthread_mutex_t g_call_mu = PTHREAD_MUTEX_INITIALIZER; /* one parallel job at a time */
static pthread_mutex_t g_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t g_start_cv = PTHREAD_COND_INITIALIZER, g_done_cv = PTHREAD_COND_INITIALIZER;
static int g_nworkers = 0; /* workers have tids 1..g_nworkers */
/* Per-worker mailbox: bumped only for the workers that take part in a job. A shared
 * "job generation" is not enough: a worker left out of one job could wake late, read
 * the next job's parameters and run it twice. */
static _Atomic unsigned long g_mail[MAX_THREADS];
static _Atomic int g_pending = 0; /* workers still running the current job */
static task_fn g_fn;
static void *g_ctx;
static int g_nt;
static pthread_once_t g_atfork_once = PTHREAD_ONCE_INIT;

static inline void cpu_relax(void) {
#if SALOMI_X86
    _mm_pause();
#endif
}

static inline int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* Spin this long for the next job before sleeping: back-to-back layer calls during
 * decode then never pay a futex wake-up, while an idle process does not burn a core. */
#define WORKER_SPIN_NS 200000
/* After this much pure spinning, yield between polls: on an oversubscribed machine the
 * thread we wait for may need our CPU. */
#define YIELD_AFTER_NS 20000

static inline void spin_pause(int64_t waited_ns) {
    if (waited_ns > YIELD_AFTER_NS) sched_yield();
    else cpu_relax();
}

static void *worker_main(void *arg) {
    const int tid = (int)(intptr_t)arg;
    unsigned long seen = 0; /* run_parallel zeroes g_mail[tid] before creating the thread */
    for (;;) {
        unsigned long g;
        int64_t t0 = now_ns();
        int n = 0;
        int64_t waited = 0;
        while ((g = atomic_load_explicit(&g_mail[tid], memory_order_acquire)) == seen) {
            spin_pause(waited);
            if ((++n & 63) == 0 && (waited = now_ns() - t0) > WORKER_SPIN_NS) {
                pthread_mutex_lock(&g_mu);
                while ((g = atomic_load_explicit(&g_mail[tid], memory_order_acquire)) == seen)
                    pthread_cond_wait(&g_start_cv, &g_mu);
                pthread_mutex_unlock(&g_mu);
                break;
            }
        }
        seen = g;
        /* g_fn/g_ctx/g_nt stay fixed until this worker decrements g_pending */
        g_fn(g_ctx, tid, g_nt);
        if (atomic_fetch_sub_explicit(&g_pending, 1, memory_order_acq_rel) == 1) {
            pthread_mutex_lock(&g_mu);
            pthread_cond_signal(&g_done_cv);
            pthread_mutex_unlock(&g_mu);
        }
    }
    return NULL;
}

/* A forked child has none of the parent's workers: start over. */
static void atfork_child(void) {
    pthread_mutex_init(&g_call_mu, NULL);
    pthread_mutex_init(&g_mu, NULL);
    pthread_cond_init(&g_start_cv, NULL);
    pthread_cond_init(&g_done_cv, NULL);
    g_nworkers = 0;
    atomic_store(&g_pending, 0);
}
static void register_atfork(void) { pthread_atfork(NULL, NULL, atfork_child); }

static void run_parallel(task_fn fn, void *ctx, int nt) {
    if (nt <= 1) { fn(ctx, 0, 1); return; }
    pthread_once(&g_atfork_once, register_atfork);
    pthread_mutex_lock(&g_call_mu);
    while (g_nworkers < nt - 1) { /* grow the pool on demand */
        int tid = g_nworkers + 1;
        atomic_store(&g_mail[tid], 0);
        pthread_t th;
        pthread_attr_t at;
        pthread_attr_init(&at);
        pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
        int rc = pthread_create(&th, &at, worker_main, (void *)(intptr_t)tid);
        pthread_attr_destroy(&at);
        if (rc != 0) break;
        g_nworkers = tid;
    }
    if (nt - 1 > g_nworkers) nt = g_nworkers + 1; /* could not create all: fewer threads, same result */
    if (nt <= 1) { pthread_mutex_unlock(&g_call_mu); fn(ctx, 0, 1); return; }
    g_fn = fn, g_ctx = ctx, g_nt = nt;
    atomic_store(&g_pending, nt - 1);
    pthread_mutex_lock(&g_mu);
    for (int t = 1; t < nt; t++) atomic_fetch_add_explicit(&g_mail[t], 1, memory_order_release);
    pthread_cond_broadcast(&g_start_cv);
    pthread_mutex_unlock(&g_mu);
    fn(ctx, 0, nt);
    int64_t t0 = now_ns(), waited = 0;
    int n = 0;
    while (atomic_load_explicit(&g_pending, memory_order_acquire) != 0) {
        spin_pause(waited);
        if ((++n & 63) == 0 && (waited = now_ns() - t0) > 2000000) {
            pthread_mutex_lock(&g_mu);
            while (atomic_load_explicit(&g_pending, memory_order_acquire) != 0) pthread_cond_wait(&g_done_cv, &g_mu);
            pthread_mutex_unlock(&g_mu);
            break;
        }
    }
    pthread_mutex_unlock(&g_call_mu);
}

void salomi_run_parallel(salomi_task_fn fn, void *ctx, int threads) {
    ensure_init();
    run_parallel(fn, ctx, threads < 1 ? 1 : threads > MAX_THREADS ? MAX_THREADS : threads);
}

/* ------------------------------------------------------------------ read-bandwidth probe */

/* What a read-only kernel can stream on this machine (the benchmark's ceiling next to the
 * STREAM copy figure): each thread xors its slice of buf, read as `streams` equal parts in
 * lockstep, one 64-byte line of each per step. Several streams per thread give the hardware
 * prefetchers more pages to work ahead in (on an Ice Lake VM: 1 stream ~50% of the copy
 * bandwidth, 8 streams ~70%). */
typedef struct {
    const uint8_t *buf;
    int64_t n;
    int streams;
    uint64_t out[MAX_THREADS];
} readjob_t;

A2 static uint64_t read_lines_avx2(const uint8_t *p, int64_t len, int ns) {
    __m256i acc = _mm256_setzero_si256();
    for (int64_t i = 0; i + 64 <= len; i += 64)
        for (int j = 0; j < ns; j++) {
            const uint8_t *q = p + j * len + i;
            acc = _mm256_xor_si256(acc, _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)q),
                                                         _mm256_loadu_si256((const __m256i *)(q + 32))));
        }
    return (uint64_t)(_mm256_extract_epi64(acc, 0) ^ _mm256_extract_epi64(acc, 1) ^ _mm256_extract_epi64(acc, 2) ^
                      _mm256_extract_epi64(acc, 3));
}

static uint64_t read_lines_scalar(const uint8_t *p, int64_t len, int ns) {
    uint64_t acc = 0;
    for (int64_t i = 0; i + 64 <= len; i += 64)
        for (int j = 0; j < ns; j++)
            for (int k = 0; k < 64; k += 8) {
                uint64_t v;
                memcpy(&v, p + j * len + i + k, 8);
                acc ^= v;
            }
    return acc;
}

static void read_task(void *ctx, int tid, int nt) {
    readjob_t *R = ctx;
    const int64_t per = R->n / nt / R->streams / 64 * 64; /* each stream a whole number of lines */
    const uint8_t *p = R->buf + (int64_t)tid * per * R->streams;
    R->out[tid] = atomic_load(&g_isa) >= SALOMI_ISA_AVX2 ? read_lines_avx2(p, per, R->streams)
                                                         : read_lines_scalar(p, per, R->streams);
}

uint64_t salomi_read_stream(const uint8_t *buf, int64_t n, int streams, int threads) {
    readjob_t R = {.buf = buf, .n = n < 0 ? 0 : n, .streams = streams < 1 ? 1 : streams};
    threads = threads < 1 ? 1 : threads > MAX_THREADS ? MAX_THREADS : threads;
    salomi_run_parallel(read_task, &R, threads);
    uint64_t x = 0;
    for (int t = 0; t < threads; t++) x ^= R.out[t];
    return x;
}

/* ------------------------------------------------------------------ entry points */

/* Validate one layer and build its job: x copied (permuted for grid+perm) into rows
 * padded with zeros, plus per-group sums of x for the fused GEMV. J->xp/J->sx must be
 * released with job_free (also on error). */
static int job_prepare(job_t *J, const layer_t *L, const float *x, int64_t M, const int32_t *perm, float *y) {
    memset(J, 0, sizeof *J);
    if (!x || !y || !L->data || !L->scale || M < 0 || L->in < 1 || L->out < 1 || L->G < 1 || L->in % L->G)
        return -1;
    if (L->fmt == FMT_GRID && (L->K < 1 || L->K > 8 || !L->zero)) return -1;
    const int64_t in = L->in, ldx = roundup(in, 16) + 16; /* >= 16 zero floats after each row */
    if (M > INT64_MAX / 4 / ldx) return -1;
    if (perm)
        for (int64_t j = 0; j < in; j++)
            if (perm[j] < 0 || perm[j] >= in) return -1;
    J->L = L, J->ldx = ldx, J->y = y, J->M = M, J->isa = atomic_load(&g_isa);
    atomic_store(&J->err, 0);
    if (M == 0) return 0;
    float *xp = aligned_alloc(64, sizeof(float) * (size_t)(M * ldx));
    if (!xp) return -2;
    J->xp = xp;
    for (int64_t m = 0; m < M; m++) {
        const float *xr = x + m * in;
        float *d = xp + m * ldx;
        if (perm)
            for (int64_t j = 0; j < in; j++) d[j] = xr[perm[j]]; /* permute x once instead of W */
        else
            memcpy(d, xr, sizeof(float) * (size_t)in);
        memset(d + in, 0, sizeof(float) * (size_t)(ldx - in));
    }
    if (M == 1) {
        float *sx = malloc(sizeof(float) * (size_t)L->ng);
        if (!sx) return -2;
        for (int64_t g = 0; g < L->ng; g++) {
            float s = 0.0f;
            for (int64_t j = g * L->G; j < (g + 1) * L->G; j++) s += xp[j];
            sx[g] = s;
        }
        J->sx = sx;
    }
    return 0;
}

static void job_free(job_t *J) {
    free((void *)J->sx);
    free((void *)J->xp);
    J->sx = J->xp = NULL;
}

static int clamp_threads(int threads, int64_t out) {
    int nt = threads < 1 ? 1 : threads > MAX_THREADS ? MAX_THREADS : threads;
    const int64_t tiles = (out + 7) / 8; /* no point in more threads than 8-row ranges */
    return nt > tiles ? (int)tiles : nt;
}

static int run(const layer_t *L, const float *x, int64_t M, const int32_t *perm, float *y, int threads) {
    ensure_init();
    job_t J;
    int rc = job_prepare(&J, L, x, M, perm, y);
    if (rc == 0 && M > 0) {
        run_parallel(run_task, &J, clamp_threads(threads, L->out));
        rc = atomic_load(&J.err);
    }
    job_free(&J);
    return rc;
}

/* Several layers on the same input in one pool dispatch: each thread runs its share of
 * every layer (the split inside a layer is the same as for a single call, so results
 * are bit-identical to separate calls). */
typedef struct { job_t *jobs; int n; } batch_t;

static void batch_task(void *ctx, int tid, int nt) {
    batch_t *B = ctx;
    for (int i = 0; i < B->n; i++) run_task(&B->jobs[i], tid, nt);
}

#define MAX_BATCH 8

static layer_t make_layer(int fmt, int K, int64_t in, int64_t out, int64_t G, const uint8_t *data,
                          const uint16_t *scale, const uint16_t *zero) {
    layer_t L = {.fmt = fmt, .K = K, .in = in, .out = out, .G = G, .data = data, .scale = scale, .zero = zero};
    L.ng = G > 0 ? in / G : 0;
    L.rb = fmt == FMT_SIGN ? (in + 7) / 8 : fmt == FMT_TERNARY ? (in + 4) / 5 : (in * K + 7) / 8;
    return L;
}

int salomi_sign_matmul(const float *x, int64_t M, int64_t in, int64_t out, const uint8_t *bits,
                       const uint16_t *scale, int64_t group, float *y, int threads) {
    layer_t L = make_layer(FMT_SIGN, 1, in, out, group, bits, scale, NULL);
    return run(&L, x, M, NULL, y, threads);
}

int salomi_ternary_matmul(const float *x, int64_t M, int64_t in, int64_t out, const uint8_t *trits,
                          const uint16_t *scale, int64_t group, float *y, int threads) {
    layer_t L = make_layer(FMT_TERNARY, 0, in, out, group, trits, scale, NULL);
    return run(&L, x, M, NULL, y, threads);
}

int salomi_grid_matmul(const float *x, int64_t M, int64_t in, int64_t out, const uint8_t *codes, int bits,
                       const uint16_t *scale, const uint16_t *zero, int64_t group, const int32_t *perm,
                       float *y, int threads) {
    if (bits < 1 || bits > 8) return -1;
    layer_t L = make_layer(FMT_GRID, bits, in, out, group, codes, scale, zero);
    return run(&L, x, M, perm, y, threads);
}

int salomi_matmul_batch(const salomi_matmul_op *ops, int n, const float *x, int64_t M, int threads) {
    ensure_init();
    if (!ops || n < 1 || n > MAX_BATCH) return -1;
    layer_t L[MAX_BATCH];
    job_t J[MAX_BATCH];
    int rc = 0, prepared = 0;
    int64_t maxout = 0;
    for (int i = 0; i < n && rc == 0; i++) {
        const salomi_matmul_op *o = &ops[i];
        const int fmt = o->format == SALOMI_FMT_SIGN ? FMT_SIGN : o->format == SALOMI_FMT_TERNARY ? FMT_TERNARY
                        : o->format == SALOMI_FMT_GRID ? FMT_GRID : -1;
        if (fmt < 0 || (fmt == FMT_GRID && (o->bits < 1 || o->bits > 8)) || o->in != ops[0].in) { rc = -1; break; }
        L[i] = make_layer(fmt, fmt == FMT_SIGN ? 1 : fmt == FMT_GRID ? o->bits : 0, o->in, o->out, o->group, o->data,
                          o->scale, fmt == FMT_GRID ? o->zero : NULL);
        rc = job_prepare(&J[i], &L[i], x, M, fmt == FMT_GRID ? o->perm : NULL, o->y);
        prepared = i + 1;
        if (o->out > maxout) maxout = o->out;
    }
    if (rc == 0 && M > 0) {
        batch_t B = {.jobs = J, .n = n};
        run_parallel(batch_task, &B, clamp_threads(threads, maxout));
        for (int i = 0; i < n && rc == 0; i++) rc = atomic_load(&J[i].err);
    }
    for (int i = 0; i < prepared; i++) job_free(&J[i]);
    return rc;
}
