/* salomi engine: native Llama forward pass (see engine.h for the API).
 *
 * Per layer:  h = x + o_proj(attn(rope(q(n(x))), rope(k(n(x))), v(n(x))))
 *             x' = h + down(silu(gate(n(h))) * up(n(h)))
 * with n = RMSNorm, grouped-query attention over a float32 KV cache, HF Llama rotary
 * convention (rotate_half: dims i and i + head_dim/2 form a pair).
 *
 * Why a native loop: through Hugging Face modules a 135M model spends most of a decode
 * step in Python/torch dispatch around ~250 small ops; here each op is a direct C call
 * and the parallel ones share the kernels' persistent pool (salomi_run_parallel).
 *
 * Matmuls by weight kind:
 *   sign / ternary / grid  -> salomi_*_matmul (kernels.c; fused GEMV for one token,
 *                             tiled GEMM for prefill)
 *   vq                     -> table lookup: per vector column v, LUT[v][c] =
 *                             dot(x[v*d:(v+1)*d], codebook[c]) for every codeword,
 *                             then y[r] = scale[r] * sum_v LUT[v][code[r][v]]
 *   fp16 / fp32            -> GEMV streaming 4 rows at a time (F16C widening), rows
 *                             split across the pool; the head (vocab x hidden) is the
 *                             largest matrix and is purely bandwidth bound.
 * Elementwise ops (norms, rope, SiLU, residuals) are O(hidden) per token and run on
 * the calling thread; attention is split over (token, head) pairs when large enough.
 */
#define _GNU_SOURCE
#include "engine.h"

#include "kernels.h"
#include "kernels_internal.h" /* salomi_h2f: the one portable fp16 -> float */

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#if defined(__x86_64__) || defined(__i386__)
#define ENG_X86 1
#include <immintrin.h>
#else
#define ENG_X86 0
#endif

#define CHUNK 64          /* tokens per prefill chunk: bounds activation memory */
#define MAX_POOL 64       /* matches kernels.c MAX_THREADS */
#define NPROF 11
#define KV16_MAX_HD 512   /* head_dim bound for a half KV cache (checked at create) */

enum { P_EMBED, P_NORM, P_QKV, P_ATTN, P_O, P_GATEUP, P_ACT, P_DOWN, P_HEAD, P_CALLS, P_ROT }; /* P_ROT: inside the others */

typedef struct {
    salomi_weight w;
    float *cb;            /* vq: codebook widened to float32 [k, d] (small; owned) */
    const float *cbt;     /* vq: the same transposed [d][k] (inside cb's allocation): 8 codewords per vector;
                           * sign tables: SIGN_CBT; ternary tables: [5][256] in cb */
    uint8_t *il;          /* int8 tables (act_i8): codes, 32 rows interleaved (owned): vq: bytes
                           * [ceil(out/32)][in/d][32]; sign: the row bytes [ceil(out/32)][in/8][32] */
    int64_t td, tk;       /* table layers: vector length and table entries (vq: d, k; sign: 4, 16; ternary: 5, 256) */
    int nib;              /* il holds two 4-bit codes per byte (sign: vector columns 2b, 2b+1) */
} weight_t;

struct salomi_engine {
    salomi_engine_config c;
    int64_t q_dim, kv_dim;
    weight_t *w;          /* 1 + 7L + 1 */
    const float *const *norms_in;
    const float **norms;  /* 2L + 1 (owned copy of the pointer array) */
    /* [L][n_kv_heads][max_seq][head_dim]: one kv head's keys for positions 0..t are one
     * contiguous run, so attention streams them sequentially (the cache is re-read from
     * DRAM every token: the weights streamed in between evict it). */
    void *kcache, *vcache; /* float32, or uint16 IEEE half with c.kv_f16 */
    int64_t len;          /* valid cache positions */
    /* activations for one chunk */
    float *x, *xn, *q, *k, *v, *att, *tmp, *g, *u;
    float *scores;        /* [threads][max_seq] */
    float *cosb, *sinb;   /* [CHUNK][head_dim/2] */
    float *rx;            /* rotated input of a +rot layer [CHUNK][max in] */
    float *rtmp;          /* one row of scratch for the rotation */
    float *lut;           /* vq tables, one per thread: [threads][lut_stride] */
    int64_t lut_stride;   /* max over vq layers of one tile's floats, rounded to a cache line */
    float *part;          /* int8 table layers: second-half sums of one dispatch [part_cap] */
    int64_t part_cap;
    float *lrt;           /* +lowrank: V x of one row [max rank] */
    int profile;
    double prof[NPROF];
    char err[256];
};

/* ------------------------------------------------------------------ helpers */

static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

/* SALOMI_ENGINE_PROFILE=cpu times the calling thread's CPU time instead of wall time:
 * stage costs then stay meaningful on a machine shared with other jobs (T=1 runs). */
static int g_prof_cpu = 0;
static double now_s(void) {
    struct timespec ts;
    clock_gettime(g_prof_cpu ? CLOCK_THREAD_CPUTIME_ID : CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void seterr(char *buf, int len, const char *fmt, ...) {
    if (!buf || len <= 0) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, (size_t)len, fmt, ap);
    va_end(ap);
}

/* Code v of a packed row (b <= 16 bits, LSB-first stream); never reads past rb bytes. */
static inline unsigned code_at(const uint8_t *row, int64_t rb, int64_t v, int b) {
    int64_t bit = v * b, byte = bit >> 3;
    uint32_t w = row[byte];
    if (byte + 1 < rb) w |= (uint32_t)row[byte + 1] << 8;
    if (byte + 2 < rb) w |= (uint32_t)row[byte + 2] << 16;
    return (w >> (bit & 7)) & ((1u << b) - 1u);
}

/* Bytes of one stored row of `in` weights: the file's packing, the one place it is spelled out
 * (bits: grid/vq code bits; d: vq vector length). */
static int64_t row_bytes(int kind, int64_t in, int bits, int64_t d) {
    switch (kind) {
    case SALOMI_W_SIGN: return (in + 7) / 8;
    case SALOMI_W_TERNARY: return (in + 4) / 5;
    case SALOMI_W_GRID: return (in * bits + 7) / 8;
    case SALOMI_W_VQ: return (in / d * bits + 7) / 8;
    case SALOMI_W_F16: return in * 2;
    default: return in * 4;
    }
}

static int64_t packed_row_bytes(const salomi_weight *w) { return row_bytes(w->kind, w->in, w->bits, w->vq_d); }

/* ------------------------------------------------------------------ AVX2 pieces */
#if ENG_X86
#define A2 __attribute__((target("avx2,fma,f16c")))
#define A2I static inline __attribute__((target("avx2,fma,f16c"), always_inline))
/* AVX-512 F/BW/VL (the ISA level "avx512"); A5V adds VBMI, used only after cpu_vbmi() */
#define A5 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")))
#define A5I static inline __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c"), always_inline))
#define A5V __attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi,avx2,fma,f16c")))
#define A5VI static inline __attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi,avx2,fma,f16c"), always_inline))

A2I float hsum8(__m256 v) {
    __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    a = _mm_add_ps(a, _mm_movehl_ps(a, a));
    a = _mm_add_ss(a, _mm_movehdup_ps(a));
    return _mm_cvtss_f32(a);
}

A2 static float dot_avx2(const float *a, const float *b, int64_t n) {
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
    }
    for (; i + 8 <= n; i += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    float s = hsum8(_mm256_add_ps(s0, s1));
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

A2 static void axpy_avx2(float *y, float a, const float *x, int64_t n) {
    __m256 va = _mm256_set1_ps(a);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
    for (; i < n; i++) y[i] += a * x[i];
}

/* y[o] = dot(W[o], x) for rows [o0, o1) of an fp16 matrix; in % 16 == 0. Bandwidth
 * bound (the 49152x576 head is 57 MB per token): rows are read as one sequential
 * stream with a software prefetch ~1 KB ahead, which measured ~1.7x faster here than
 * interleaving 4 row streams (the prefetcher then keeps the single stream saturated).
 * Four accumulators hide the FMA latency. Prefetches past the end never fault. */
A2 static void f16_gemv_avx2(const uint16_t *W, int64_t in, const float *x, int64_t o0, int64_t o1, float *y) {
    for (int64_t o = o0; o < o1; o++) {
        const uint16_t *w = W + o * in;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        int64_t j = 0;
        for (; j + 32 <= in; j += 32) {
            _mm_prefetch((const char *)(w + j) + 1024, _MM_HINT_T0);
            a0 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w + j))), _mm256_loadu_ps(x + j), a0);
            a1 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w + j + 8))), _mm256_loadu_ps(x + j + 8), a1);
            a2 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w + j + 16))), _mm256_loadu_ps(x + j + 16), a2);
            a3 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w + j + 24))), _mm256_loadu_ps(x + j + 24), a3);
        }
        if (j < in) { /* in % 32 == 16 */
            a0 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w + j))), _mm256_loadu_ps(x + j), a0);
            a1 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w + j + 8))), _mm256_loadu_ps(x + j + 8), a1);
        }
        y[o] = hsum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    }
}

/* exp(x) for 8 floats (Cephes expf polynomial, ~1 ulp over the clamped range): the
 * softmax and SiLU need tens of thousands of exps per token. */
A2I __m256 exp256(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
    __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

/* g[i] = silu(g[i]) * u[i] */
A2 static void silu_mul_avx2(float *g, const float *u, int64_t n) {
    int64_t i = 0;
    const __m256 one = _mm256_set1_ps(1.0f);
    for (; i + 8 <= n; i += 8) {
        __m256 x = _mm256_loadu_ps(g + i);
        __m256 den = _mm256_add_ps(one, exp256(_mm256_sub_ps(_mm256_setzero_ps(), x)));
        _mm256_storeu_ps(g + i, _mm256_mul_ps(_mm256_div_ps(x, den), _mm256_loadu_ps(u + i)));
    }
    for (; i < n; i++) g[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}

/* Cache element i of a float32 (h16 = 0) or IEEE-half (h16 = 1) KV cache; h16 is a constant
 * at every call site, so each instantiation has plain loads. */
A2I __m256 kv_ld8(const void *p, int64_t i, int h16) {
    return h16 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)p + i)))
               : _mm256_loadu_ps((const float *)p + i);
}

/* One query head over ctxlen cached positions (hd % 8 == 0; K/V rows `stride` elements apart). Scores for 8 positions
 * are reduced together with a horizontal-add tree (one reduction per 8 dots instead
 * of one per dot), then a vectorized softmax, then out = sum_t p_t V[t]. */
A2I void attn_head_body(const float *q, const void *K, const void *V, int64_t stride, int64_t ctxlen, int64_t hd,
                        float scale, float *sc, float *o, const int h16) {
    const __m256 vs = _mm256_set1_ps(scale);
    int64_t t = 0;
    for (; t + 8 <= ctxlen; t += 8) {
        __m256 a[8];
        for (int u = 0; u < 8; u++) {
            const int64_t k = (t + u) * stride;
            __m256 acc = _mm256_mul_ps(_mm256_loadu_ps(q), kv_ld8(K, k, h16));
            for (int64_t j = 8; j < hd; j += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + j), kv_ld8(K, k + j, h16), acc);
            a[u] = acc;
        }
        __m256 h01 = _mm256_hadd_ps(a[0], a[1]), h23 = _mm256_hadd_ps(a[2], a[3]);
        __m256 h45 = _mm256_hadd_ps(a[4], a[5]), h67 = _mm256_hadd_ps(a[6], a[7]);
        __m256 h0 = _mm256_hadd_ps(h01, h23), h1 = _mm256_hadd_ps(h45, h67);
        __m256 r = _mm256_add_ps(_mm256_permute2f128_ps(h0, h1, 0x20), _mm256_permute2f128_ps(h0, h1, 0x31));
        _mm256_storeu_ps(sc + t, _mm256_mul_ps(r, vs));
    }
    for (; t < ctxlen; t++) { /* as dot_avx2 (hd % 8 == 0) */
        __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
        int64_t j = 0;
        for (; j + 16 <= hd; j += 16) {
            s0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + j), kv_ld8(K, t * stride + j, h16), s0);
            s1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + j + 8), kv_ld8(K, t * stride + j + 8, h16), s1);
        }
        if (j < hd) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + j), kv_ld8(K, t * stride + j, h16), s0);
        sc[t] = hsum8(_mm256_add_ps(s0, s1)) * scale;
    }
    float mx = -INFINITY;
    for (t = 0; t < ctxlen; t++) mx = sc[t] > mx ? sc[t] : mx;
    __m256 vm = _mm256_set1_ps(mx), vsum = _mm256_setzero_ps();
    for (t = 0; t + 8 <= ctxlen; t += 8) {
        __m256 ex = exp256(_mm256_sub_ps(_mm256_loadu_ps(sc + t), vm));
        _mm256_storeu_ps(sc + t, ex);
        vsum = _mm256_add_ps(vsum, ex);
    }
    float sum = hsum8(vsum);
    for (; t < ctxlen; t++) sum += (sc[t] = expf(sc[t] - mx));
    const float inv = 1.0f / sum;
    /* out = sum_t p_t V[t], 64 columns at a time held in 8 registers: 8 independent
     * FMA chains and no load/store of the output per position. */
    int64_t j0 = 0;
    for (; j0 + 64 <= hd; j0 += 64) {
        __m256 acc[8];
        for (int u = 0; u < 8; u++) acc[u] = _mm256_setzero_ps();
        for (t = 0; t < ctxlen; t++) {
            const __m256 p = _mm256_set1_ps(sc[t]);
            const int64_t v = t * stride + j0;
            for (int u = 0; u < 8; u++) acc[u] = _mm256_fmadd_ps(p, kv_ld8(V, v + 8 * u, h16), acc[u]);
        }
        const __m256 vi = _mm256_set1_ps(inv);
        for (int u = 0; u < 8; u++) _mm256_storeu_ps(o + j0 + 8 * u, _mm256_mul_ps(acc[u], vi));
    }
    if (j0 < hd) {
        memset(o + j0, 0, sizeof(float) * (size_t)(hd - j0));
        for (t = 0; t < ctxlen; t++) { /* as axpy_avx2 (hd - j0 is a multiple of 8) */
            const __m256 va = _mm256_set1_ps(sc[t] * inv);
            for (int64_t j = j0; j < hd; j += 8)
                _mm256_storeu_ps(o + j, _mm256_fmadd_ps(va, kv_ld8(V, t * stride + j, h16), _mm256_loadu_ps(o + j)));
        }
    }
}

A2 static void attn_head_avx2(const float *q, const void *K, const void *V, int64_t stride, int64_t ctxlen, int64_t hd,
                              float scale, float *sc, float *o, int h16) {
    if (h16) attn_head_body(q, K, V, stride, ctxlen, hd, scale, sc, o, 1);
    else attn_head_body(q, K, V, stride, ctxlen, hd, scale, sc, o, 0);
}

A2 static void f16_to_f32_avx2(const uint16_t *h, float *f, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(f + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + i))));
    for (; i < n; i++) f[i] = _cvtsh_ss(h[i]);
}
#endif

static float dot_scalar(const float *a, const float *b, int64_t n) {
    float p[8] = {0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int t = 0; t < 8; t++) p[t] += a[i + t] * b[i + t];
    float s = ((p[0] + p[4]) + (p[1] + p[5])) + ((p[2] + p[6]) + (p[3] + p[7]));
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

static inline int use_avx2(void) {
#if ENG_X86
    return salomi_get_isa() >= SALOMI_ISA_AVX2;
#else
    return 0;
#endif
}

/* The int8 table kernels' 64-row path: the AVX-512 level (F, BW, VL) selected; VQ codes
 * also need VBMI (byte permutes), checked separately so an AVX-512 CPU without it keeps
 * the 64-row sign tables and the AVX2 vq tables. */
static inline int use_avx512(void) {
#if ENG_X86
    return salomi_get_isa() >= SALOMI_ISA_AVX512;
#else
    return 0;
#endif
}

static int cpu_vbmi(void) { return (salomi_cpu_ext() & SALOMI_EXT_VBMI) != 0; }

static inline float dot(const float *a, const float *b, int64_t n, int avx2) {
#if ENG_X86
    if (avx2) return dot_avx2(a, b, n);
#endif
    (void)avx2;
    return dot_scalar(a, b, n);
}

static inline void axpy(float *y, float a, const float *x, int64_t n, int avx2) {
#if ENG_X86
    if (avx2) { axpy_avx2(y, a, x, n); return; }
#endif
    (void)avx2;
    for (int64_t i = 0; i < n; i++) y[i] += a * x[i];
}

static void f16_row(const uint16_t *h, float *f, int64_t n, int avx2) {
#if ENG_X86
    if (avx2) { f16_to_f32_avx2(h, f, n); return; }
#endif
    (void)avx2;
    for (int64_t i = 0; i < n; i++) f[i] = salomi_h2f(h[i]);
}

/* ------------------------------------------------------------------ float matmul */

typedef struct {
    const salomi_weight *w;
    const float *x;
    int64_t M;
    float *y;
    int avx2;
    int err;
} fjob_t;

/* Row range of an nt-way split, 8-row aligned so threads never share a cache line of y. */
static void split_rows(int64_t n, int tid, int nt, int64_t *o0, int64_t *o1) {
    int64_t per = ((n + nt - 1) / nt + 7) / 8 * 8;
    *o0 = min64(n, tid * per);
    *o1 = min64(n, *o0 + per);
}

static void float_task(void *ctx, int tid, int nt) {
    fjob_t *J = ctx;
    const salomi_weight *w = J->w;
    const int64_t in = w->in, out = w->out;
    int64_t o0, o1;
    split_rows(out, tid, nt, &o0, &o1);
    if (o0 >= o1) return;
#if ENG_X86
    if (J->M == 1 && J->avx2 && w->kind == SALOMI_W_F16 && in % 16 == 0) {
        f16_gemv_avx2(w->data, in, J->x, o0, o1, J->y);
        return;
    }
#endif
    /* General path: widen one weight row at a time (fp16) and dot it with every
     * activation row, so the weight is read once per call whatever M is. */
    float *row = NULL;
    if (w->kind == SALOMI_W_F16) {
        row = malloc(sizeof(float) * (size_t)in);
        if (!row) { __atomic_store_n(&J->err, -2, __ATOMIC_RELAXED); return; } /* any thread may fail */
    }
    for (int64_t o = o0; o < o1; o++) {
        const float *wr;
        if (row) {
            f16_row((const uint16_t *)w->data + o * in, row, in, J->avx2);
            wr = row;
        } else {
            wr = (const float *)w->data + o * in;
        }
        for (int64_t m = 0; m < J->M; m++) J->y[m * out + o] = dot(wr, J->x + m * in, in, J->avx2);
    }
    free(row);
}

/* ------------------------------------------------------------------ vq table lookup */

/* A vq layer runs as a table lookup: L[v][c] = <x_v, codeword c> for each vector column v,
 * then y[o] = scale[o] * sum_v L[v][code(o, v)]. Each thread builds the table itself, one
 * column tile at a time (VQ_TILE floats, L1-sized), and sums that tile for its own rows:
 * no barrier between building and summing, no table line shared between cores, and the
 * lookups hit L1. Layers that share their input (q/k/v, gate/up) run in one dispatch. */
#define VQ_TILE 4096

typedef struct {
    const weight_t *W;  /* n layers with the same in, all reading x */
    int n;
    const float *x;     /* [M][in] */
    int64_t M;
    float *const *y;    /* n outputs, [M][out_i] each */
    float *lut;         /* [threads][lut_stride] */
    int64_t lut_stride;
    int avx2;
    int avx512;         /* int8 tables: 64 rows per instruction (AVX512BW; VQ codes also need VBMI) */
    int vbmi;
    float *part;        /* int8 table layers: the second column half's sums, [n][M][out_i] packed */
} vqjob_t;

/* Offset of layer i's half-1 sums in the part buffer. */
static int64_t vq8_part_offset(const vqjob_t *J, int i) {
    int64_t off = 0;
    for (int j = 0; j < i; j++) off += J->W[j].il ? J->M * J->W[j].w.out : 0;
    return off;
}

/* Vector columns per tile: a multiple of 4 (codes are decoded 4 at a time). */
static int64_t vq_tile_vectors(const salomi_weight *w) {
    const int64_t t = VQ_TILE / w->vq_k / 4 * 4, nv = w->in / w->vq_d;
    return min64(nv, t < 4 ? 4 : t);
}

/* LUT row of one 4-vector x for codewords [c0, k): L[c] = sum_t cbt[t][c] x[t], accumulated
 * over t in order with one FMA each (the same association on both paths). */
static void lut_row4(const float *cbt, int64_t k, int64_t c0, const float *x, float *L) {
    for (int64_t c = c0; c < k; c++) {
        float a = cbt[c] * x[0];
        a = fmaf(cbt[k + c], x[1], a);
        a = fmaf(cbt[2 * k + c], x[2], a);
        L[c] = fmaf(cbt[3 * k + c], x[3], a);
    }
}

#if ENG_X86
A2 static void lut_row4_avx2(const float *cbt, int64_t k, const float *x, float *L) {
    const __m256 x0 = _mm256_set1_ps(x[0]), x1 = _mm256_set1_ps(x[1]), x2 = _mm256_set1_ps(x[2]), x3 = _mm256_set1_ps(x[3]);
    int64_t c = 0;
    for (; c + 8 <= k; c += 8) {
        __m256 a = _mm256_mul_ps(_mm256_loadu_ps(cbt + c), x0);
        a = _mm256_fmadd_ps(_mm256_loadu_ps(cbt + k + c), x1, a);
        a = _mm256_fmadd_ps(_mm256_loadu_ps(cbt + 2 * k + c), x2, a);
        _mm256_storeu_ps(L + c, _mm256_fmadd_ps(_mm256_loadu_ps(cbt + 3 * k + c), x3, a));
    }
    lut_row4(cbt, k, c, x, L);
}
#endif

/* The table of vector columns [v0, v1) into L[(v - v0) * k + c]. */
static void vq_build(const weight_t *W, const float *x, int64_t v0, int64_t v1, float *L, int avx2) {
    const int64_t d = W->td, k = W->tk;
    for (int64_t v = v0; v < v1; v++, L += k) {
        const float *xs = x + v * d;
        if (d == 4) { /* the common case: codebook transposed, 8 codewords per AVX2 step */
#if ENG_X86
            if (avx2) { lut_row4_avx2(W->cbt, k, xs, L); continue; }
#endif
            lut_row4(W->cbt, k, 0, xs, L);
        } else {
            const float *cb = W->cb;
            for (int64_t c = 0; c < k; c++, cb += d) L[c] = dot(cb, xs, d, avx2);
        }
    }
}

/* Codes v .. v+3 of a row of b-bit codes for b in {4, 6, 8}, v % 4 == 0 (whole bytes). */
static inline void codes4(const uint8_t *row, int64_t v, int b, unsigned c[4]) {
    if (b == 8) {
        c[0] = row[v], c[1] = row[v + 1], c[2] = row[v + 2], c[3] = row[v + 3];
    } else if (b == 6) { /* 4 codes = 3 bytes, LSB first */
        const uint8_t *p = row + v / 4 * 3;
        const uint32_t u = (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16;
        c[0] = u & 63, c[1] = (u >> 6) & 63, c[2] = (u >> 12) & 63, c[3] = u >> 18;
    } else { /* 4 */
        const uint8_t b0 = row[v / 2], b1 = row[v / 2 + 1];
        c[0] = b0 & 15, c[1] = b0 >> 4, c[2] = b1 & 15, c[3] = b1 >> 4;
    }
}

/* Adds tile [v0, v1) of R consecutive rows from o (R = 4 or 1) into y: the sum is latency
 * bound (a dependent add per lookup), so the rows run side by side with 4 chains each. */
static inline __attribute__((always_inline)) void vq_rows(const salomi_weight *w, const float *L, int64_t v0, int64_t v1,
                                                          int64_t o, const int R, float *y) {
    const int64_t k = w->vq_k, rb = packed_row_bytes(w);
    const int b = w->bits;
    const int64_t v4 = b == 8 || b == 6 || b == 4 ? v0 + (v1 - v0) / 4 * 4 : v0;
    float a[4][4] = {{0}};
    for (int64_t v = v0; v < v4; v += 4) {
        const float *Lv = L + (v - v0) * k;
        for (int r = 0; r < R; r++) {
            unsigned c[4];
            codes4(w->data + (o + r) * rb, v, b, c);
            a[r][0] += Lv[c[0]], a[r][1] += Lv[k + c[1]], a[r][2] += Lv[2 * k + c[2]], a[r][3] += Lv[3 * k + c[3]];
        }
    }
    for (int r = 0; r < R; r++) {
        const uint8_t *row = w->data + (o + r) * rb;
        for (int64_t v = v4; v < v1; v++) a[r][v & 3] += L[(v - v0) * k + code_at(row, rb, v, b)];
        y[o + r] += (a[r][0] + a[r][1]) + (a[r][2] + a[r][3]);
    }
}

static void vq8_layer(const vqjob_t *J, const weight_t *W, const float *x, float *y, float *y1, int tid, int nt);

static void vq_task(void *ctx, int tid, int nt) {
    const vqjob_t *J = ctx;
    float *L = J->lut + tid * J->lut_stride;
    for (int64_t m = 0; m < J->M; m++) {
        for (int i = 0; i < J->n; i++) {
            const weight_t *W = &J->W[i];
            const salomi_weight *w = &W->w;
            float *y = J->y[i] + m * w->out;
            if (W->il) {
                float *y1 = J->part + vq8_part_offset(J, i) + m * w->out;
                vq8_layer(J, W, J->x + m * w->in, y, y1, tid, nt);
                continue;
            }
            const int64_t nv = w->in / w->vq_d, tv = vq_tile_vectors(w);
            int64_t o0, o1;
            split_rows(w->out, tid, nt, &o0, &o1);
            if (o0 >= o1) continue;
            memset(y + o0, 0, sizeof(float) * (size_t)(o1 - o0));
            for (int64_t v0 = 0; v0 < nv; v0 += tv) {
                const int64_t v1 = min64(nv, v0 + tv);
                vq_build(W, J->x + m * w->in, v0, v1, L, J->avx2);
                int64_t o = o0;
                for (; o + 4 <= o1; o += 4) vq_rows(w, L, v0, v1, o, 4, y);
                for (; o < o1; o++) vq_rows(w, L, v0, v1, o, 1, y);
            }
            for (int64_t o = o0; o < o1; o++) y[o] *= salomi_h2f(w->scale[o]);
        }
    }
}

/* --- int8 tables (activations="int8"): 32 rows per vector instruction (64 with AVX-512).
 * The float table of VQ8_BLOCK vector columns is quantized to int8 with one scale per
 * block (round to nearest even; |error| <= scale/2 per lookup) and stored as one run of
 * vq8_tsz(k) bytes per vector column (entries past k are zero). AVX2 indexes it 16 entries
 * at a time (vpshufb on the low 4 code bits for 32 rows, the higher bits picking a 16-entry
 * piece by a blend tree); AVX-512 looks up 64 rows at once (vpshufb for 16 entries, VBMI's
 * vpermb / vpermi2b for up to 128, two of them and a blend on bit 7 for 256). Pairs of
 * columns are summed to int16 (maddubs; a block of <= 32 columns cannot overflow), then each
 * block enters the row's float sum as fma(scale, (float)sum, acc): the scalar twin does the
 * same operations, so every path gives identical bits. */
#ifndef VQ8_PREFETCH
#define VQ8_PREFETCH 2048
#endif
#define VQ8_BLOCK 32 /* vector columns per table scale: a block's flush (int16 -> float FMA) is paid once per 32 */
static int64_t vq8_tables(int64_t k) { int64_t t = 1; while (t * 16 < k) t *= 2; return t; }
static int64_t vq8_tsz(int64_t k) { return 16 * vq8_tables(k); } /* table bytes per vector column */
/* Scratch per thread, in floats, 64-byte multiple: one block's float table [B][k], the
 * scale of every block, and the int8 tables of all nv vector columns [nv][tsz] (64-byte
 * aligned): every table is built before any row is read, so each 32-row group then streams
 * its codes once, front to back. */
static int64_t vq8_scratch_floats(int64_t k, int64_t nv) {
    const int64_t B = VQ8_BLOCK, nblk = (nv + B - 1) / B;
    return (B * k + nblk + 16 + (nv * vq8_tsz(k) + 3) / 4 + 15) / 16 * 16;
}

#if ENG_X86
/* 16 floats of F times inv, rounded to nearest even, as int8 into t[0..15]. */
A2I void vq8_quant16(const float *F, __m256 inv, int8_t *t) {
    const __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(F), inv));
    const __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(F + 8), inv));
    const __m256i p8 = _mm256_packs_epi16(_mm256_packs_epi32(a, b), _mm256_setzero_si256());
    /* 32-bit units of p8: a0-3 b0-3 0 0 | a4-7 b4-7 0 0 -> a0-3 a4-7 b0-3 b4-7 */
    const __m256i o = _mm256_permutevar8x32_epi32(p8, _mm256_setr_epi32(0, 4, 1, 5, 0, 4, 1, 5));
    _mm_storeu_si128((__m128i *)t, _mm256_castsi256_si128(o));
}

/* nv tables of k % 16 == 0 entries, tsz bytes each (the rest zero). */
A2 static void vq8_quant_avx2(const float *F, int64_t nv, int64_t k, int64_t tsz, float inv, int8_t *T) {
    for (int64_t v = 0; v < nv; v++, F += k, T += tsz) {
        int64_t j = 0;
        for (; j < k / 16; j++) vq8_quant16(F + 16 * j, _mm256_set1_ps(inv), T + 16 * j);
        memset(T + 16 * j, 0, (size_t)(tsz - 16 * j));
    }
}

A2 static float absmax_avx2(const float *F, int64_t n) { /* n % 8 == 0; a max is exact in any order */
    const __m256 mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256 m = _mm256_setzero_ps();
    for (int64_t i = 0; i < n; i += 8) m = _mm256_max_ps(m, _mm256_and_ps(_mm256_loadu_ps(F + i), mask));
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
}
#endif

#if ENG_X86
/* One vector's float table, entries [0, k / 8 * 8) (tables_build_any does the rest). */
A2 static int64_t tables_row_avx2(const float *cbt, int64_t k, int64_t d, const float *x, float *L) {
    int64_t c = 0;
    for (; c + 8 <= k; c += 8) {
        __m256 a = _mm256_mul_ps(_mm256_loadu_ps(cbt + c), _mm256_set1_ps(x[0]));
        for (int64_t t = 1; t < d; t++) a = _mm256_fmadd_ps(_mm256_loadu_ps(cbt + t * k + c), _mm256_set1_ps(x[t]), a);
        _mm256_storeu_ps(L + c, a);
    }
    return c;
}

A5 static int64_t tables_row_avx512(const float *cbt, int64_t k, int64_t d, const float *x, float *L) {
    int64_t c = 0;
    for (; c + 16 <= k; c += 16) {
        __m512 a = _mm512_mul_ps(_mm512_loadu_ps(cbt + c), _mm512_set1_ps(x[0]));
        for (int64_t t = 1; t < d; t++) a = _mm512_fmadd_ps(_mm512_loadu_ps(cbt + t * k + c), _mm512_set1_ps(x[t]), a);
        _mm512_storeu_ps(L + c, a);
    }
    return c;
}
#endif

/* Quantizes the float table of vector columns [v0, v1) into int8 tables of vq8_tsz(k)
 * bytes each. Returns the block's scale. */
#if ENG_X86
A5 static float vq8_tables_build_avx512(const float *cbt, int64_t k, const float *x, int64_t nv, float *F, int8_t *T,
                                       int64_t tsz);
#endif

/* Float tables of vector columns [v0, v1) for any d (ternary: d = 5, and in % 5 may be
 * nonzero: the last vector's missing columns read as zero): per entry a mul, then one FMA per
 * further column in order - for d = 4 exactly lut_row4's operations. */
static void tables_build_any(const weight_t *W, const float *x, int64_t v0, int64_t v1, float *F, int avx2, int avx512) {
    const int64_t d = W->td, k = W->tk, in = W->w.in;
    float pad[16];
    for (int64_t v = v0; v < v1; v++, F += k) {
        const float *xs = x + v * d;
        if ((v + 1) * d > in) { /* only ternary (d = 5): vq rows are whole vectors (in % d == 0) */
            for (int64_t t = 0; t < d; t++) pad[t] = v * d + t < in ? xs[t] : 0.f;
            xs = pad;
        }
        int64_t c = 0;
#if ENG_X86
        if (avx512) c = tables_row_avx512(W->cbt, k, d, xs, F);
        else if (avx2) c = tables_row_avx2(W->cbt, k, d, xs, F);
#endif
        (void)avx2, (void)avx512;
        for (; c < k; c++) {
            float a = W->cbt[c] * xs[0];
            for (int64_t t = 1; t < d; t++) a = fmaf(W->cbt[t * k + c], xs[t], a);
            F[c] = a;
        }
    }
}

static float vq8_tables_build(const weight_t *W, const float *x, int64_t v0, int64_t v1, float *F, int8_t *T, int avx2,
                              int avx512) {
    const int64_t k = W->tk, tsz = vq8_tsz(k), n = (v1 - v0) * k;
#if ENG_X86
    if (avx512 && W->td == 4 && k % 16 == 0) return vq8_tables_build_avx512(W->cbt, k, x + v0 * 4, v1 - v0, F, T, tsz);
#endif
    if (W->td == 4) vq_build(W, x, v0, v1, F, avx2);
    else tables_build_any(W, x, v0, v1, F, avx2, avx512);
    float m = 0.f;
#if ENG_X86
    const int simd = avx2 && k % 16 == 0;
    if (simd) m = absmax_avx2(F, n);
    else
#endif
        for (int64_t i = 0; i < n; i++) m = fmaxf(m, fabsf(F[i]));
    const float inv = m > 0.f ? 127.f / m : 0.f;
#if ENG_X86
    if (simd) { /* the same rounding as lrintf (nearest even, the default mode) */
        vq8_quant_avx2(F, v1 - v0, k, tsz, inv, T);
        return m / 127.f;
    }
#endif
    memset(T, 0, (size_t)((v1 - v0) * tsz));
    for (int64_t v = 0; v < v1 - v0; v++)
        for (int64_t c = 0; c < k; c++) T[v * tsz + c] = (int8_t)lrintf(F[v * k + c] * inv);
    return m / 127.f;
}

static void vq8_group_scalar(const uint8_t *il, int nib, int64_t v0, int64_t v1, const int8_t *T, int64_t tsz,
                             float scale, float acc[32]) {
    for (int r = 0; r < 32; r++) {
        int32_t s = 0;
        for (int64_t v = v0; v < v1; v++) {
            const unsigned c = nib ? (il[v / 2 * 32 + r] >> (4 * (v & 1))) & 15 : il[v * 32 + r];
            s += T[(v - v0) * tsz + c];
        }
        acc[r] = fmaf(scale, (float)s, acc[r]);
    }
}

#if ENG_X86
/* 32 lookups: code bytes c in the table t of nt 16-entry pieces (levels = log2 nt). */
A2I __m256i vq8_lookup(__m256i c, const int8_t *t, int64_t nt) {
    const __m256i lo = _mm256_and_si256(c, _mm256_set1_epi8(15));
    __m256i r[16];
    for (int64_t j = 0; j < nt; j++)
        r[j] = _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(t + j * 16))), lo);
    for (int bit = 4, n = (int)nt; n > 1; bit++, n /= 2) {
        /* code bit `bit` to each byte's sign bit, which is all blendv reads (the 16-bit shift
         * carries low-byte bits only into the high byte's low bits) */
        const __m256i sel = _mm256_slli_epi16(c, 7 - bit);
        for (int j = 0; j < n / 2; j++) r[j] = _mm256_blendv_epi8(r[2 * j], r[2 * j + 1], sel);
    }
    return r[0];
}

/* acc[r] = fma(scale, sum of row r, acc[r]); lo16 / hi16 hold rows 0-7,16-23 / 8-15,24-31. */
A2I void vq8_flush(__m256i lo16, __m256i hi16, float scale, float acc[32]) {
    const __m256 s = _mm256_set1_ps(scale);
    const __m128i q[4] = {_mm256_castsi256_si128(lo16), _mm256_castsi256_si128(hi16),
                          _mm256_extracti128_si256(lo16, 1), _mm256_extracti128_si256(hi16, 1)};
    for (int i = 0; i < 4; i++) { /* rows 8i .. 8i+7 */
        const __m256 f = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(q[i]));
        _mm256_storeu_ps(acc + 8 * i, _mm256_fmadd_ps(s, f, _mm256_loadu_ps(acc + 8 * i)));
    }
}

/* The same as vq8_group_scalar for one 32-row group (acc in row order). */
A2 static void vq8_group_avx2(const uint8_t *il, int64_t v0, int64_t v1, const int8_t *T, int64_t nt,
                              float scale, float acc[32]) {
    const __m256i ones = _mm256_set1_epi8(1);
    __m256i lo16 = _mm256_setzero_si256(), hi16 = _mm256_setzero_si256();
    for (int64_t v = v0; v < v1; v += 2) {
        _mm_prefetch((const char *)(il + v * 32) + VQ8_PREFETCH, _MM_HINT_T0);
        const __m256i r0 = vq8_lookup(_mm256_loadu_si256((const __m256i *)(il + v * 32)), T + (v - v0) * nt * 16, nt);
        const __m256i r1 = v + 1 < v1 ? vq8_lookup(_mm256_loadu_si256((const __m256i *)(il + (v + 1) * 32)),
                                                   T + (v + 1 - v0) * nt * 16, nt)
                                      : _mm256_setzero_si256();
        /* rows 0-7,16-23 and 8-15,24-31, each as the pair (v, v+1) summed to int16 */
        lo16 = _mm256_add_epi16(lo16, _mm256_maddubs_epi16(ones, _mm256_unpacklo_epi8(r0, r1)));
        hi16 = _mm256_add_epi16(hi16, _mm256_maddubs_epi16(ones, _mm256_unpackhi_epi8(r0, r1)));
    }
    vq8_flush(lo16, hi16, scale, acc);
}

/* Sign tables (T-MAC): each byte of il holds the codes of vector columns 2b (low nibble) and
 * 2b + 1 (high nibble) for one of 32 rows: one load, two shuffles per 8 weight columns of 32
 * rows. v0 and v1 even (in % 8 == 0, blocks of 32 vectors). */
A2 static void vq8_group_nib_avx2(const uint8_t *il, int64_t v0, int64_t v1, const int8_t *T, float scale,
                                  float acc[32]) {
    const __m256i ones = _mm256_set1_epi8(1), low = _mm256_set1_epi8(15);
    __m256i lo16 = _mm256_setzero_si256(), hi16 = _mm256_setzero_si256();
    for (int64_t v = v0; v < v1; v += 2) {
        /* one stream per thread: a software prefetch ahead keeps it near memory bandwidth
         * (as grid8 in lut.c; prefetches never fault) */
        _mm_prefetch((const char *)(il + v / 2 * 32) + VQ8_PREFETCH, _MM_HINT_T0);
        const __m256i c = _mm256_loadu_si256((const __m256i *)(il + v / 2 * 32));
        const __m256i t = _mm256_loadu_si256((const __m256i *)(T + (v - v0) * 16)); /* tables v, v + 1 */
        const __m256i r0 = _mm256_shuffle_epi8(_mm256_permute2x128_si256(t, t, 0x00), _mm256_and_si256(c, low));
        const __m256i r1 = _mm256_shuffle_epi8(_mm256_permute2x128_si256(t, t, 0x11),
                                               _mm256_and_si256(_mm256_srli_epi16(c, 4), low));
        lo16 = _mm256_add_epi16(lo16, _mm256_maddubs_epi16(ones, _mm256_unpacklo_epi8(r0, r1)));
        hi16 = _mm256_add_epi16(hi16, _mm256_maddubs_epi16(ones, _mm256_unpackhi_epi8(r0, r1)));
    }
    vq8_flush(lo16, hi16, scale, acc);
}

/* --- the same 64 rows at a time (two 32-row groups of il, g and g + 1, side by side in one
 * zmm): AVX512BW for the sign tables, plus VBMI's byte permutes for vq codes. */

/* vq8_tables_build for d = 4, k % 16 == 0 (every vq int8 layer of the default recipes and the
 * sign tables): the table, its absmax in the same pass, then int8 with one saturating
 * narrow per 16 entries. Per entry the same mul + 3 FMAs, the same rounding: identical bytes. */
A5 static float vq8_tables_build_avx512(const float *cbt, int64_t k, const float *x, int64_t nv, float *F, int8_t *T,
                                       int64_t tsz) {
    __m512 mx = _mm512_setzero_ps();
    for (int64_t v = 0; v < nv; v++) {
        const float *xs = x + 4 * v;
        const __m512 x0 = _mm512_set1_ps(xs[0]), x1 = _mm512_set1_ps(xs[1]), x2 = _mm512_set1_ps(xs[2]),
                     x3 = _mm512_set1_ps(xs[3]);
        for (int64_t c = 0; c < k; c += 16) {
            __m512 a = _mm512_mul_ps(_mm512_loadu_ps(cbt + c), x0);
            a = _mm512_fmadd_ps(_mm512_loadu_ps(cbt + k + c), x1, a);
            a = _mm512_fmadd_ps(_mm512_loadu_ps(cbt + 2 * k + c), x2, a);
            a = _mm512_fmadd_ps(_mm512_loadu_ps(cbt + 3 * k + c), x3, a);
            _mm512_storeu_ps(F + v * k + c, a);
            mx = _mm512_max_ps(mx, _mm512_abs_ps(a));
        }
    }
    const float m = _mm512_reduce_max_ps(mx);
    const __m512 inv = _mm512_set1_ps(m > 0.f ? 127.f / m : 0.f);
    for (int64_t v = 0; v < nv; v++) {
        int64_t c = 0;
        for (; c < k; c += 16) { /* |values| <= 127: the saturating narrow only packs */
            const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(F + v * k + c), inv));
            _mm_storeu_si128((__m128i *)(T + v * tsz + c), _mm512_cvtsepi32_epi8(q));
        }
        if (c < tsz) memset(T + v * tsz + c, 0, (size_t)(tsz - c));
    }
    return m / 127.f;
}

/* 64 code bytes: 32 of group il0 (rows 0-31), then 32 of il1 (rows 32-63). */
A5I __m512i vq8_codes64(const uint8_t *il0, const uint8_t *il1, int64_t off) {
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(il0 + off))),
                              _mm256_loadu_si256((const __m256i *)(il1 + off)), 1);
}

/* A vector column's table of tsz bytes (a constant) in registers (1, 2 or 4 zmm), and 64
 * lookups of code bytes c in it: vpshufb for 16 entries, VBMI's vpermb up to 64, vpermi2b for
 * 128, two of them and a blend on code bit 7 for 256. */
typedef struct { __m512i t[4]; } vq8_treg;

A5VI vq8_treg vq8_tload(const int8_t *t, const int64_t tsz) {
    vq8_treg r;
    if (tsz == 16) r.t[0] = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)t));
    else if (tsz == 32) r.t[0] = _mm512_zextsi256_si512(_mm256_loadu_si256((const __m256i *)t));
    else r.t[0] = _mm512_loadu_si512(t);
    r.t[1] = tsz >= 128 ? _mm512_loadu_si512(t + 64) : r.t[0];
    r.t[2] = tsz == 256 ? _mm512_loadu_si512(t + 128) : r.t[0];
    r.t[3] = tsz == 256 ? _mm512_loadu_si512(t + 192) : r.t[0];
    return r;
}

A5VI __m512i vq8_tlookup(__m512i c, const vq8_treg *r, const int64_t tsz) {
    if (tsz == 16) return _mm512_shuffle_epi8(r->t[0], c);
    if (tsz <= 64) return _mm512_permutexvar_epi8(c, r->t[0]);
    const __m512i a = _mm512_permutex2var_epi8(r->t[0], c, r->t[1]);
    if (tsz == 128) return a;
    return _mm512_mask_blend_epi8(_mm512_movepi8_mask(c), a, _mm512_permutex2var_epi8(r->t[2], c, r->t[3]));
}

/* 64 lookups in one vector column's table t (loaded for this column only). */
A5VI __m512i vq8_lookup64(__m512i c, const int8_t *t, const int64_t tsz) {
    const vq8_treg r = vq8_tload(t, tsz);
    return vq8_tlookup(c, &r, tsz);
}

/* acc[r] = fma(scale, sum of row r, acc[r]) for 64 rows; 128-bit lane i of lo16 / hi16
 * holds rows 16i..16i+7 / 16i+8..16i+15 (the unpack order). */
A5I void vq8_flush64(__m512i lo16, __m512i hi16, float scale, float acc[64]) {
    const __m512 s = _mm512_set1_ps(scale);
    const __m512i q[2] = {_mm512_permutex2var_epi64(lo16, _mm512_setr_epi64(0, 1, 8, 9, 2, 3, 10, 11), hi16),
                          _mm512_permutex2var_epi64(lo16, _mm512_setr_epi64(4, 5, 12, 13, 6, 7, 14, 15), hi16)};
    for (int i = 0; i < 4; i++) { /* rows 16i .. 16i+15 */
        const __m256i h = i & 1 ? _mm512_extracti64x4_epi64(q[i / 2], 1) : _mm512_castsi512_si256(q[i / 2]);
        const __m512 f = _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(h));
        _mm512_storeu_ps(acc + 16 * i, _mm512_fmadd_ps(s, f, _mm512_loadu_ps(acc + 16 * i)));
    }
}

/* vq8_group_scalar for np group pairs at once (np = 1: 64 rows; 4: 256 rows), il0 the first
 * group's codes and gs the bytes from one group to the next (0: a lone last group beside itself).
 * The pairs share each column's table registers (a 256-entry table is 4 zmm, read once per
 * np * 64 rows), and with np = 4 the thread reads 8 code streams at once. acc[64 j ..] holds pair
 * j's rows; every pair's sums and flush are the same whatever np: the same bits. */
A5VI void vq8_groups_body(const uint8_t *il0, int64_t gs, const int np, int64_t v0, int64_t v1, const int8_t *T,
                         const int64_t tsz, float scale, float *acc) {
    const __m512i ones = _mm512_set1_epi8(1);
    __m512i lo16[4], hi16[4];
    for (int j = 0; j < np; j++) lo16[j] = hi16[j] = _mm512_setzero_si512();
    for (int64_t v = v0; v < v1; v += 2) {
        const int has1 = v + 1 < v1;
        const vq8_treg ta = vq8_tload(T + (v - v0) * tsz, tsz), tb = vq8_tload(T + (v + has1 - v0) * tsz, tsz);
        for (int j = 0; j < np; j++) {
            const uint8_t *g0 = il0 + 2 * j * gs, *g1 = g0 + gs;
            _mm_prefetch((const char *)(g0 + v * 32) + VQ8_PREFETCH, _MM_HINT_T0);
            _mm_prefetch((const char *)(g1 + v * 32) + VQ8_PREFETCH, _MM_HINT_T0);
            const __m512i r0 = vq8_tlookup(vq8_codes64(g0, g1, v * 32), &ta, tsz);
            const __m512i r1 = has1 ? vq8_tlookup(vq8_codes64(g0, g1, (v + 1) * 32), &tb, tsz) : _mm512_setzero_si512();
            lo16[j] = _mm512_add_epi16(lo16[j], _mm512_maddubs_epi16(ones, _mm512_unpacklo_epi8(r0, r1)));
            hi16[j] = _mm512_add_epi16(hi16[j], _mm512_maddubs_epi16(ones, _mm512_unpackhi_epi8(r0, r1)));
        }
    }
    for (int j = 0; j < np; j++) vq8_flush64(lo16[j], hi16[j], scale, acc + 64 * j);
}

A5VI void vq8_groups_tsz(const uint8_t *il0, int64_t gs, const int np, int64_t v0, int64_t v1, const int8_t *T,
                        int64_t tsz, float scale, float *acc) {
    switch (tsz) { /* a constant table size per loop */
    case 16: vq8_groups_body(il0, gs, np, v0, v1, T, 16, scale, acc); break;
    case 32: vq8_groups_body(il0, gs, np, v0, v1, T, 32, scale, acc); break;
    case 64: vq8_groups_body(il0, gs, np, v0, v1, T, 64, scale, acc); break;
    case 128: vq8_groups_body(il0, gs, np, v0, v1, T, 128, scale, acc); break;
    default: vq8_groups_body(il0, gs, np, v0, v1, T, 256, scale, acc); break;
    }
}

A5V static void vq8_group8_avx512(const uint8_t *il0, int64_t gs, int64_t v0, int64_t v1, const int8_t *T,
                                 int64_t tsz, float scale, float acc[256]) {
    vq8_groups_tsz(il0, gs, 4, v0, v1, T, tsz, scale, acc);
}

A5V static void vq8_group2_avx512(const uint8_t *il0, const uint8_t *il1, int64_t v0, int64_t v1, const int8_t *T,
                                 int64_t tsz, float scale, float acc[64]) {
    vq8_groups_tsz(il0, il1 - il0, 1, v0, v1, T, tsz, scale, acc);
}

/* vq8_groups_body for nibble codes (16-entry tables, two vector columns per code byte; AVX512BW
 * only). */
A5I void vq8_groups_nib(const uint8_t *il0, int64_t gs, const int np, int64_t v0, int64_t v1, const int8_t *T,
                        float scale, float *acc) {
    const __m512i ones = _mm512_set1_epi8(1), low = _mm512_set1_epi8(15);
    __m512i lo16[4], hi16[4];
    for (int j = 0; j < np; j++) lo16[j] = hi16[j] = _mm512_setzero_si512();
    for (int64_t v = v0; v < v1; v += 2) {
        const int8_t *t = T + (v - v0) * 16;
        const __m512i ta = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)t)),
                      tb = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(t + 16)));
        for (int j = 0; j < np; j++) {
            const uint8_t *g0 = il0 + 2 * j * gs, *g1 = g0 + gs;
            _mm_prefetch((const char *)(g0 + v / 2 * 32) + VQ8_PREFETCH, _MM_HINT_T0);
            _mm_prefetch((const char *)(g1 + v / 2 * 32) + VQ8_PREFETCH, _MM_HINT_T0);
            const __m512i c = vq8_codes64(g0, g1, v / 2 * 32);
            const __m512i r0 = _mm512_shuffle_epi8(ta, _mm512_and_si512(c, low));
            const __m512i r1 = _mm512_shuffle_epi8(tb, _mm512_and_si512(_mm512_srli_epi16(c, 4), low));
            lo16[j] = _mm512_add_epi16(lo16[j], _mm512_maddubs_epi16(ones, _mm512_unpacklo_epi8(r0, r1)));
            hi16[j] = _mm512_add_epi16(hi16[j], _mm512_maddubs_epi16(ones, _mm512_unpackhi_epi8(r0, r1)));
        }
    }
    for (int j = 0; j < np; j++) vq8_flush64(lo16[j], hi16[j], scale, acc + 64 * j);
}

A5 static void vq8_group2_nib_avx512(const uint8_t *il0, const uint8_t *il1, int64_t v0, int64_t v1, const int8_t *T,
                                     float scale, float acc[64]) {
    vq8_groups_nib(il0, il1 - il0, 1, v0, v1, T, scale, acc);
}

A5 static void vq8_group8_nib_avx512(const uint8_t *il0, int64_t gs, int64_t v0, int64_t v1, const int8_t *T,
                                     float scale, float acc[256]) {
    vq8_groups_nib(il0, gs, 4, v0, v1, T, scale, acc);
}
#endif

/* int8 table layers split their vector columns in two halves [0, h) and [h, nv), h = nv / 4 * 2,
 * whatever the thread count (so the bits never depend on it), each cut into blocks of
 * VQ8_BLOCK from its own start: a part builds only its half's tables and sums that half for
 * its rows, so two threads build half the tables each instead of all of them, and
 * y = (half 0 + half 1) * scale once both are done (vq8_finish). */
static int64_t vq8_half(int64_t nv) { return nv / 4 * 2; } /* even: the halves of nibble codes stay on whole bytes */

/* Byte of (row o, vector column v) in the codes of a table layer: each half is its own
 * [ceil(out/32)][the half's bytes per row][32] run (half 1 after half 0), so a thread
 * streams its half of every 32-row group front to back. nib: two 4-bit codes per byte
 * (vector columns 2b, 2b + 1). */
static int64_t il_half(int64_t out, int64_t nv, int nib, int part, int64_t *rowb) { /* returns the half's offset */
    const int64_t h = vq8_half(nv), n = part ? nv - h : h;
    *rowb = nib ? n / 2 : n;
    return part ? (out + 31) / 32 * (nib ? h / 2 : h) * 32 : 0;
}

static int64_t il_index(int64_t o, int64_t v, int64_t out, int64_t nv, int nib) {
    const int part = v >= vq8_half(nv);
    int64_t rowb;
    const int64_t base = il_half(out, nv, nib, part, &rowb), dv = v - (part ? vq8_half(nv) : 0);
    return base + ((o / 32) * rowb + (nib ? dv / 2 : dv)) * 32 + o % 32;
}

/* One half (part 0 or 1) of an int8-table layer for one activation row, groups [g0, g1): the
 * half's tables first, then per group (two groups side by side on AVX-512) every block in
 * order, each entering the row sums as one FMA; the unscaled sums go to y (an empty half:
 * zeros). */
static void vq8_part(const vqjob_t *J, const weight_t *W, const float *x, float *y, int part, int64_t g0, int64_t g1,
                     int tid) {
    const salomi_weight *w = &W->w;
    const int64_t k = W->tk, nv = (w->in + W->td - 1) / W->td, B = VQ8_BLOCK, ntab = vq8_tables(k), tsz = vq8_tsz(k);
    const int64_t h = vq8_half(nv), va = part ? h : 0, vb = part ? nv : h;
    int64_t rowb; /* this half's il bytes per row */
    const uint8_t *half = W->il + il_half(w->out, nv, W->nib, part, &rowb);
    if (g0 >= g1) return;
    float *F = J->lut + tid * J->lut_stride, *S = F + B * k;
    int8_t *T = (int8_t *)(((uintptr_t)(S + (nv + B - 1) / B) + 63) & ~(uintptr_t)63);
    for (int64_t v0 = va; v0 < vb; v0 += B)
        S[(v0 - va) / B] = vq8_tables_build(W, x, v0, min64(vb, v0 + B), F, T + (v0 - va) * tsz, J->avx2, J->avx512);
#if ENG_X86
    const int wide = J->avx512 && (W->nib || J->vbmi);
#else
    const int wide = 0;
#endif
    int64_t g = g0;
#if ENG_X86
    /* 8 groups per table read while 8 full groups remain; sign (nibble) codes only when a group's
     * half spans a page or more: eight streams then add memory-level parallelism, while on short
     * rows (576 columns: 1,152 bytes) they only scatter one sequential stream (head shape 12-16 ->
     * 11-12 GB/s in an A/B) */
    if (wide && (!W->nib || rowb * 32 >= 4096))
        for (; g + 8 <= g1 && (g + 8) * 32 <= w->out; g += 8) {
            const uint8_t *il = half + g * rowb * 32;
            float acc[256] = {0};
            for (int64_t v0 = va; v0 < vb; v0 += B) {
                const int64_t a = v0 - va, b = min64(vb, v0 + B) - va;
                if (W->nib) vq8_group8_nib_avx512(il, rowb * 32, a, b, T + a * tsz, S[a / B], acc);
                else vq8_group8_avx512(il, rowb * 32, a, b, T + a * tsz, tsz, S[a / B], acc);
            }
            memcpy(y + g * 32, acc, sizeof acc);
        }
#endif
    for (; g < g1; g += wide ? 2 : 1) {
        const int pair = wide && g + 1 < g1; /* a lone last group runs beside itself */
        const int64_t o0 = g * 32, n = min64(pair ? 64 : 32, w->out - o0);
        const uint8_t *il = half + g * rowb * 32, *il1 = pair ? il + rowb * 32 : il;
        float acc[64] = {0}; /* lanes past the last row of a partial group sum padding; never stored */
        for (int64_t v0 = va; v0 < vb; v0 += B) {
            const int64_t v1 = min64(vb, v0 + B);
            const int64_t a = v0 - va, b = v1 - va; /* columns within the half, as il is laid */
            const int8_t *Tb = T + a * tsz;
            const float sc = S[a / B];
#if ENG_X86
            if (wide && W->nib) vq8_group2_nib_avx512(il, il1, a, b, Tb, sc, acc);
            else if (wide) vq8_group2_avx512(il, il1, a, b, Tb, tsz, sc, acc);
            else if (J->avx2 && W->nib) vq8_group_nib_avx2(il, a, b, Tb, sc, acc);
            else if (J->avx2) vq8_group_avx2(il, a, b, Tb, ntab, sc, acc);
            else
#endif
                vq8_group_scalar(il, W->nib, a, b, Tb, tsz, sc, acc);
        }
        memcpy(y + o0, acc, sizeof(float) * (size_t)n);
    }
}

/* This thread's share of an int8-table layer: tasks (half, row range) = 2 x max(1, nt / 2),
 * task t on thread t % nt; half 1 writes to the job's part buffer. */
static void vq8_layer(const vqjob_t *J, const weight_t *W, const float *x, float *y, float *y1, int tid, int nt) {
    const int64_t groups = (W->w.out + 31) / 32, R = nt / 2 > 1 ? nt / 2 : 1, per = (groups + R - 1) / R;
    for (int64_t t = tid; t < 2 * R; t += nt) {
        const int64_t g0 = min64(groups, t / 2 * per);
        vq8_part(J, W, x, t % 2 ? y1 : y, (int)(t % 2), g0, min64(groups, g0 + per), tid);
    }
}

#if ENG_X86
A2 static void finish_avx2(float *y, const float *p, const uint16_t *scale, int64_t n) {
    int64_t o = 0;
    for (; o + 8 <= n; o += 8) { /* F16C widening is exact, as salomi_h2f: the same products */
        const __m256 s = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(scale + o)));
        _mm256_storeu_ps(y + o, _mm256_mul_ps(_mm256_add_ps(_mm256_loadu_ps(y + o), _mm256_loadu_ps(p + o)), s));
    }
    for (; o < n; o++) y[o] = (y[o] + p[o]) * salomi_h2f(scale[o]);
}
#endif

/* After the join: y = (half 0 + half 1) * scale for the int8-table layers of a job (on the
 * calling thread: a table head has 49152 rows, hence the vector loop). */
static void vq8_finish(const vqjob_t *J) {
    const float *p = J->part;
    for (int i = 0; i < J->n; i++) {
        const salomi_weight *w = &J->W[i].w;
        if (!J->W[i].il) continue;
        for (int64_t m = 0; m < J->M; m++, p += w->out) {
            float *y = J->y[i] + m * w->out;
#if ENG_X86
            if (J->avx2) { finish_avx2(y, p, w->scale, w->out); continue; }
#endif
            for (int64_t o = 0; o < w->out; o++) y[o] = (y[o] + p[o]) * salomi_h2f(w->scale[o]);
        }
    }
}

/* One dispatch for n layers sharing x. int8 table layers need room for their second halves'
 * sums (vq8_finish): rows go in batches that fit the part buffer (all of a prefill chunk for
 * the block layers; a few rows at a time for a table head). */
static void run_vq(salomi_engine *e, const weight_t *W, int n, const float *x, int64_t M, float *const *y) {
    int64_t need = 0;
    for (int i = 0; i < n; i++) need += W[i].il ? W[i].w.out : 0;
    const int64_t mb = need ? (e->part_cap / need > 0 ? min64(M, e->part_cap / need) : 1) : M;
    for (int64_t m0 = 0; m0 < M; m0 += mb) {
        float *ys[4];
        for (int i = 0; i < n && i < 4; i++) ys[i] = y[i] + m0 * W[i].w.out;
        vqjob_t J = {.W = W, .n = n, .x = x + m0 * W[0].w.in, .M = min64(mb, M - m0), .y = ys, .lut = e->lut,
                     .lut_stride = e->lut_stride, .avx2 = use_avx2(), .avx512 = use_avx512(), .vbmi = cpu_vbmi(),
                     .part = e->part};
        salomi_run_parallel(vq_task, &J, e->c.threads);
        if (need) vq8_finish(&J);
    }
}

/* --- sign tables (T-MAC; activations="int8", engine.h): a 4-column sign pattern is a code
 * of the codebook {-1, +1}^4 (bit t of the nibble = sign of column 4v + t), so the vq int8
 * table path above runs a per-row-scale sign layer, with the row bytes re-laid 32 rows side
 * by side (1 bit per weight) and two codes per byte. */
static const float SIGN_CBT[64] = { /* transposed [t][c]: +1 where bit t of c is set */
    -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1,
    -1, -1, 1, 1, -1, -1, 1, 1, -1, -1, 1, 1, -1, -1, 1, 1,
    -1, -1, -1, -1, 1, 1, 1, 1, -1, -1, -1, -1, 1, 1, 1, 1,
    -1, -1, -1, -1, -1, -1, -1, -1, 1, 1, 1, 1, 1, 1, 1, 1};

static void sign_tables_weight(weight_t *W) { W->td = 4, W->tk = 16, W->nib = 1, W->cbt = SIGN_CBT; }

/* --- ternary tables: a per-row-scale ternary layer is a vq layer with d = 5 whose code is the
 * file's byte itself (five trits, sum t_j 3^j, trit 1 = zero), over the codebook of the 243
 * patterns {-1, 0, +1}^5, padded with zero entries to 256 (so a corrupt byte > 242 reads 0):
 * 1.6 bits per weight in memory, as in the file; on AVX-512 two vpermi2b and a blend look up 64
 * rows. cbt: 5 x 256 floats. */
#define TERN_K 256
static void ternary_tables_weight(weight_t *W, float *cbt) {
    for (int64_t c = 0; c < TERN_K; c++)
        for (int64_t t = 0, p = 1; t < 5; t++, p *= 3) cbt[t * TERN_K + c] = c < 243 ? (float)((c / p) % 3) - 1.f : 0.f;
    W->td = 5, W->tk = TERN_K, W->nib = 0, W->cbt = cbt;
}

int salomi_tables_ok(int kind, int64_t in, int64_t group) {
    if (kind == SALOMI_W_SIGN) return in > 0 && group == in && in % 8 == 0;
    return kind == SALOMI_W_TERNARY && in > 0 && group == in;
}

/* Table columns per row: a sign table covers 4 weights (two per file byte), a ternary one the 5 of a byte. */
static int64_t tables_nv(int kind, int64_t in) { return kind == SALOMI_W_SIGN ? in / 4 : (in + 4) / 5; }
static int64_t tables_row_bytes(int kind, int64_t in) { return row_bytes(kind, in, 0, 1); }

int64_t salomi_tables_bytes(int kind, int64_t out, int64_t in) { return (out + 31) / 32 * 32 * tables_row_bytes(kind, in); }

int salomi_tables_layout(int kind, const void *data, int64_t out, int64_t in, uint8_t *il) {
    if (!data || !il || out < 1 || !salomi_tables_ok(kind, in, in)) return -1;
    const int sign = kind == SALOMI_W_SIGN;
    const int64_t nb = tables_row_bytes(kind, in), nv = tables_nv(kind, in);
    memset(il, 0, (size_t)salomi_tables_bytes(kind, out, in));
    for (int64_t o = 0; o < out; o++)
        for (int64_t b = 0; b < nb; b++)
            il[il_index(o, sign ? 2 * b : b, out, nv, sign)] = ((const uint8_t *)data)[o * nb + b];
    return 0;
}

int salomi_tables_matmul(int kind, const float *x, int64_t M, int64_t in, int64_t out, const uint8_t *il,
                         const uint16_t *scale, float *y, int threads) {
    if (!x || !il || !scale || !y || M < 0 || out < 1 || !salomi_tables_ok(kind, in, in)) return -1;
    if (M == 0) return 0;
    const int nt = threads < 1 ? 1 : threads > MAX_POOL ? MAX_POOL : threads;
    weight_t W = {.w = {.kind = kind, .out = out, .in = in, .group = in, .scale = scale}, .il = (uint8_t *)il};
    float cbt[5 * TERN_K];
    if (kind == SALOMI_W_SIGN) sign_tables_weight(&W);
    else ternary_tables_weight(&W, cbt);
    const int64_t stride = vq8_scratch_floats(W.tk, tables_nv(kind, in));
    float *lut = aligned_alloc(64, sizeof(float) * (size_t)(nt * stride));
    if (!lut) return -2;
    float *part = malloc(sizeof(float) * (size_t)(M * out));
    if (!part) { free(lut); return -2; }
    float *ys[1] = {y};
    vqjob_t J = {.W = &W, .n = 1, .x = x, .M = M, .y = ys, .lut = lut, .lut_stride = stride, .avx2 = use_avx2(),
                 .avx512 = use_avx512(), .vbmi = cpu_vbmi(), .part = part};
    salomi_run_parallel(vq_task, &J, nt);
    vq8_finish(&J);
    free(lut);
    free(part);
    return 0;
}

/* ------------------------------------------------------------------ dispatch */

static void add_bias(const salomi_weight *w, int64_t M, float *y) {
    if (w->bias)
        for (int64_t m = 0; m < M; m++)
            for (int64_t o = 0; o < w->out; o++) y[m * w->out + o] += w->bias[o];
}

/* ------------------------------------------------------------------ +rot */

/* In place on each of M rows of length n: forward y = H (s * x) / sqrt(n), inverse
 * y = s * (H^T x) / sqrt(n), H = kron(blocks) applied axis by axis on x viewed as
 * [f_0][f_1]...[f_{nb-1}] (row-major), as salomi.quantizers.rotation.transform does.
 * Power-of-two blocks are Sylvester matrices (check_rot verifies it), so they run as
 * in-place Walsh-Hadamard butterflies, O(log f) adds per element instead of f MACs;
 * the 12/20 Paley blocks run dense. Both loops walk contiguous runs of the inner axes
 * so the compiler vectorises them. `tmp` holds n floats. */
#define ROT_INLINE static inline __attribute__((always_inline))
ROT_INLINE void rot_axis_dense_n(float *y, int64_t outer, int64_t fa, const int64_t inner, const float *m,
                                 int inverse, float *tmp) {
    for (int64_t o = 0; o < outer; o++) {
        float *base = y + o * fa * inner;
        for (int64_t i = 0; i < fa; i++) {
            float *dst = tmp + i * inner;
            for (int64_t q = 0; q < inner; q++) dst[q] = 0.f;
            for (int64_t k = 0; k < fa; k++) {
                const float c = inverse ? m[k * fa + i] : m[i * fa + k];
                const float *src = base + k * inner;
                for (int64_t q = 0; q < inner; q++) dst[q] += c * src[q];
            }
        }
        memcpy(base, tmp, sizeof(float) * (size_t)(fa * inner));
    }
}

/* a literal `inner` lets the compiler turn the short inner runs of late axes into fixed-width vectors */
ROT_INLINE void rot_axis_dense(float *y, int64_t outer, int64_t fa, int64_t inner, const float *m, int inverse,
                               float *tmp) {
    if (inner == 4) rot_axis_dense_n(y, outer, fa, 4, m, inverse, tmp);
    else if (inner == 2) rot_axis_dense_n(y, outer, fa, 2, m, inverse, tmp);
    else if (inner == 1) rot_axis_dense_n(y, outer, fa, 1, m, inverse, tmp);
    else rot_axis_dense_n(y, outer, fa, inner, m, inverse, tmp);
}

/* butterflies at distance h over the whole row: pairs never straddle an [outer] slice
 * because every slice (fa * inner floats) is a multiple of 2h */
ROT_INLINE void walsh_level(float *y, int64_t n, const int64_t h) {
    for (int64_t b = 0; b < n; b += 2 * h) {
        float *lo = y + b, *hi = y + b + h;
        for (int64_t j = 0; j < h; j++) {
            const float a = lo[j], c = hi[j];
            lo[j] = a + c;
            hi[j] = a - c;
        }
    }
}

ROT_INLINE void rot_axis_walsh(float *y, int64_t outer, int64_t fa, int64_t inner) {
    const int64_t n = outer * fa * inner;
    for (int64_t h = inner; h < fa * inner; h *= 2) {
        if (h == 1) walsh_level(y, n, 1);
        else if (h == 2) walsh_level(y, n, 2);
        else if (h == 4) walsh_level(y, n, 4);
        else walsh_level(y, n, h);
    }
}

static int is_pow2(int64_t f) { return f > 1 && (f & (f - 1)) == 0; }

#if ENG_X86
/* One butterfly level at distance h < 16 inside a zmm of 16 consecutive floats: the partner
 * lane (index xor h) by an in-lane permute or a 128-bit lane shuffle; lanes with bit h clear
 * get lo + hi, the others lo - hi - walsh_level's a + c and a - c, the same floats. */
A5I __m512 walsh_lanes(__m512 v, int64_t h) {
    __m512 p;
    __mmask16 hi;
    if (h == 1) p = _mm512_permute_ps(v, 0xB1), hi = 0xAAAA;
    else if (h == 2) p = _mm512_permute_ps(v, 0x4E), hi = 0xCCCC;
    else if (h == 4) p = _mm512_shuffle_f32x4(v, v, 0xB1), hi = 0xF0F0;
    else p = _mm512_shuffle_f32x4(v, v, 0x4E), hi = 0xFF00;
    return _mm512_mask_sub_ps(_mm512_add_ps(v, p), hi, p, v);
}

/* rot_axis_walsh's levels h = inner, 2 inner, .. < fa * inner over a row of n % 16 == 0 floats,
 * in the same order: the levels below 16 in registers in one pass, the others 16 lanes at a time.
 * inner must be a power of two (a file may order a power-of-two block before a Paley one, e.g.
 * 48 = 4 x 12 gives inner 12: rot_axis_walsh runs those). */
A5 static void rot_axis_walsh_avx512(float *y, int64_t n, int64_t inner, int64_t fa) {
    const int64_t top = fa * inner;
    int64_t h = inner;
    if (h < 16) {
        const int64_t hs = top < 16 ? top : 16;
        for (int64_t i = 0; i < n; i += 16) {
            __m512 v = _mm512_loadu_ps(y + i);
            for (int64_t l = h; l < hs; l *= 2) v = walsh_lanes(v, l);
            _mm512_storeu_ps(y + i, v);
        }
        h = hs;
    }
    for (; h < top; h *= 2)
        for (int64_t b = 0; b < n; b += 2 * h)
            for (int64_t j = 0; j < h; j += 16) {
                const __m512 a = _mm512_loadu_ps(y + b + j), c = _mm512_loadu_ps(y + b + h + j);
                _mm512_storeu_ps(y + b + j, _mm512_add_ps(a, c));
                _mm512_storeu_ps(y + b + h + j, _mm512_sub_ps(a, c));
            }
}
#endif

#if ENG_X86
/* Dense axes of the shapes the default model has (576 = 12x12x4, 1536 = 12x128, 192 = 12x16), with
 * the accumulators in registers (the plain loop reloads and stores dst for every k): inner 4 puts
 * two output rows side by side in one 8-wide FMA, coefficients [m_ik x4 | m_i+1,k x4] against a
 * broadcast of src_k, for 8 outer slices at a time; inner % 16 == 0 keeps 16 floats of dst in two
 * registers across k. Every element is fma(c, src, acc) over k in order from 0, as the plain loop
 * compiled with FMA contraction. Returns 0 when the shape is not one of these. */
A2 static int rot_axis_dense_avx2(float *y, int64_t outer, int64_t fa, int64_t inner, const float *m, int inverse,
                                  float *tmp) {
    if (inner == 4 && fa % 2 == 0) {
        for (int64_t o0 = 0; o0 < outer; o0 += 8) {
            const int no = (int)min64(8, outer - o0);
            for (int64_t i = 0; i < fa; i += 2) {
                __m256 acc[8];
                for (int t = 0; t < 8; t++) acc[t] = _mm256_setzero_ps();
                for (int64_t k = 0; k < fa; k++) {
                    const float c0 = inverse ? m[k * fa + i] : m[i * fa + k];
                    const float c1 = inverse ? m[k * fa + i + 1] : m[(i + 1) * fa + k];
                    const __m256 cv = _mm256_set_m128(_mm_set1_ps(c1), _mm_set1_ps(c0));
                    for (int t = 0; t < no; t++)
                        acc[t] = _mm256_fmadd_ps(cv, _mm256_broadcast_ps((const __m128 *)(y + ((o0 + t) * fa + k) * 4)), acc[t]);
                }
                for (int t = 0; t < no; t++) _mm256_storeu_ps(tmp + ((o0 + t) * fa + i) * 4, acc[t]);
            }
        }
        memcpy(y, tmp, sizeof(float) * (size_t)(outer * fa * 4));
        return 1;
    }
    if (inner % 16 == 0) {
        for (int64_t o = 0; o < outer; o++) {
            float *base = y + o * fa * inner;
            for (int64_t i = 0; i < fa; i++)
                for (int64_t q = 0; q < inner; q += 16) {
                    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
                    for (int64_t k = 0; k < fa; k++) {
                        const __m256 c = _mm256_set1_ps(inverse ? m[k * fa + i] : m[i * fa + k]);
                        a0 = _mm256_fmadd_ps(c, _mm256_loadu_ps(base + k * inner + q), a0);
                        a1 = _mm256_fmadd_ps(c, _mm256_loadu_ps(base + k * inner + q + 8), a1);
                    }
                    _mm256_storeu_ps(tmp + i * inner + q, a0);
                    _mm256_storeu_ps(tmp + i * inner + q + 8, a1);
                }
            memcpy(base, tmp, sizeof(float) * (size_t)(fa * inner));
        }
        return 1;
    }
    return 0;
}
#endif

#if ENG_X86
/* rot_axis_dense_avx2 on zmm for the same shapes: inner 4 puts four output rows in one FMA
 * against a broadcast 4-vector of src_k; inner % 16 == 0 holds up to 4 x 16 floats of two
 * output rows in registers across k. The same fma(c, src, acc) per element over k in order
 * from 0: identical floats. */
A5 static int rot_axis_dense_avx512(float *y, int64_t outer, int64_t fa, int64_t inner, const float *m, int inverse,
                                    float *tmp) {
#define RC(i, k) (inverse ? m[(k) * fa + (i)] : m[(i) * fa + (k)])
    if (inner == 4 && fa % 4 == 0 && fa <= 20) { /* the Paley orders 12 and 20 */
        __m512 cvs[5][20]; /* [i / 4][k]: coefficients of rows i..i+3, each repeated 4 times, built once per call */
        for (int64_t i = 0; i < fa; i += 4)
            for (int64_t k = 0; k < fa; k++)
                cvs[i / 4][k] = _mm512_setr_ps(RC(i, k), RC(i, k), RC(i, k), RC(i, k), RC(i + 1, k), RC(i + 1, k),
                                               RC(i + 1, k), RC(i + 1, k), RC(i + 2, k), RC(i + 2, k), RC(i + 2, k),
                                               RC(i + 2, k), RC(i + 3, k), RC(i + 3, k), RC(i + 3, k), RC(i + 3, k));
        for (int64_t o0 = 0; o0 < outer; o0 += 8) {
            const int no = (int)min64(8, outer - o0);
            for (int64_t i = 0; i < fa; i += 4) {
                __m512 acc[8];
                for (int t = 0; t < 8; t++) acc[t] = _mm512_setzero_ps();
                for (int64_t k = 0; k < fa; k++) {
                    const __m512 cv = cvs[i / 4][k];
                    for (int t = 0; t < no; t++)
                        acc[t] = _mm512_fmadd_ps(cv, _mm512_broadcast_f32x4(_mm_loadu_ps(y + ((o0 + t) * fa + k) * 4)), acc[t]);
                }
                for (int t = 0; t < no; t++) _mm512_storeu_ps(tmp + ((o0 + t) * fa + i) * 4, acc[t]);
            }
        }
        memcpy(y, tmp, sizeof(float) * (size_t)(outer * fa * 4));
        return 1;
    }
    if (inner % 16 == 0 && fa % 2 == 0) {
        for (int64_t o = 0; o < outer; o++) {
            float *base = y + o * fa * inner;
            for (int64_t q0 = 0; q0 < inner; q0 += 64) {
                const int nq = (int)min64(4, (inner - q0) / 16);
                for (int64_t i = 0; i < fa; i += 2) {
                    __m512 a[2][4];
                    for (int qq = 0; qq < 4; qq++) a[0][qq] = a[1][qq] = _mm512_setzero_ps();
                    for (int64_t k = 0; k < fa; k++) {
                        const __m512 c0 = _mm512_set1_ps(RC(i, k)), c1 = _mm512_set1_ps(RC(i + 1, k));
                        for (int qq = 0; qq < nq; qq++) {
                            const __m512 src = _mm512_loadu_ps(base + k * inner + q0 + 16 * qq);
                            a[0][qq] = _mm512_fmadd_ps(c0, src, a[0][qq]);
                            a[1][qq] = _mm512_fmadd_ps(c1, src, a[1][qq]);
                        }
                    }
                    for (int qq = 0; qq < nq; qq++) {
                        _mm512_storeu_ps(tmp + i * inner + q0 + 16 * qq, a[0][qq]);
                        _mm512_storeu_ps(tmp + (i + 1) * inner + q0 + 16 * qq, a[1][qq]);
                    }
                }
            }
            memcpy(base, tmp, sizeof(float) * (size_t)(fa * inner));
        }
        return 1;
    }
#undef RC
    return 0;
}
#endif

ROT_INLINE void rot_apply_body(float *x, int64_t M, int64_t n, int nb, const int32_t *f, const float *s,
                               const float *mats, int inverse, float *tmp, int simd) { /* 0 / 1 AVX2 / 2 AVX-512 */
    const float sc = 1.0f / sqrtf((float)n);
    for (int64_t r = 0; r < M; r++) {
        float *y = x + r * n;
        if (!inverse)
            for (int64_t i = 0; i < n; i++) y[i] *= s[i];
        const float *m = mats;
        int64_t outer = 1;
        for (int a = 0; a < nb; a++) {
            const int64_t fa = f[a], inner = n / (outer * fa);
#if ENG_X86
            if (is_pow2(fa) && simd == 2 && n % 16 == 0 && (inner == 1 || is_pow2(inner)))
                rot_axis_walsh_avx512(y, n, inner, fa); /* every level a power of two: lanes or whole zmm */
            else
#endif
            if (is_pow2(fa)) rot_axis_walsh(y, outer, fa, inner);
#if ENG_X86
            else if (simd == 2 && rot_axis_dense_avx512(y, outer, fa, inner, m, inverse, tmp)) {}
            else if (simd && rot_axis_dense_avx2(y, outer, fa, inner, m, inverse, tmp)) {}
#endif
            else rot_axis_dense(y, outer, fa, inner, m, inverse, tmp);
            outer *= fa;
            m += fa * fa;
        }
        if (inverse)
            for (int64_t i = 0; i < n; i++) y[i] *= s[i] * sc;
        else
            for (int64_t i = 0; i < n; i++) y[i] *= sc;
    }
}

/* the same body compiled three times: AVX-512, AVX2+FMA (8-wide, fused) and the portable baseline */
static void rot_apply_base(float *x, int64_t M, int64_t n, int nb, const int32_t *f, const float *s,
                           const float *mats, int inverse, float *tmp) {
    rot_apply_body(x, M, n, nb, f, s, mats, inverse, tmp, 0);
}
#if ENG_X86
A2 static void rot_apply_avx2(float *x, int64_t M, int64_t n, int nb, const int32_t *f, const float *s,
                              const float *mats, int inverse, float *tmp) {
    rot_apply_body(x, M, n, nb, f, s, mats, inverse, tmp, 1);
}
A5 static void rot_apply_avx512(float *x, int64_t M, int64_t n, int nb, const int32_t *f, const float *s,
                                const float *mats, int inverse, float *tmp) {
    rot_apply_body(x, M, n, nb, f, s, mats, inverse, tmp, 2);
}
#endif

static void rot_apply(float *x, int64_t M, int64_t n, int nb, const int32_t *f, const float *s, const float *mats,
                      int inverse, float *tmp) {
#if ENG_X86
    if (use_avx512()) { rot_apply_avx512(x, M, n, nb, f, s, mats, inverse, tmp); return; }
    if (use_avx2()) { rot_apply_avx2(x, M, n, nb, f, s, mats, inverse, tmp); return; }
#endif
    rot_apply_base(x, M, n, nb, f, s, mats, inverse, tmp);
}

static const float *rot_in(salomi_engine *e, const salomi_weight *w, const float *x, int64_t M) {
    const double t = e->profile ? now_s() : 0.0;
    memcpy(e->rx, x, sizeof(float) * (size_t)(M * w->in));
    rot_apply(e->rx, M, w->in, w->rot_nb_in, w->rot_f_in, w->rot_s_in, w->rot_m_in, 0, e->rtmp);
    if (e->profile) e->prof[P_ROT] += now_s() - t;
    return e->rx;
}

static void rot_out(salomi_engine *e, const salomi_weight *w, float *y, int64_t M) {
    const double t = e->profile ? now_s() : 0.0;
    rot_apply(y, M, w->out, w->rot_nb_out, w->rot_f_out, w->rot_s_out, w->rot_m_out, 1, e->rtmp);
    if (e->profile) e->prof[P_ROT] += now_s() - t;
}

static int check_rot(const salomi_weight *w, const char *what, char *err, int errlen) {
    if (!w->rot) return 0;
    const int nb[2] = {w->rot_nb_in, w->rot_nb_out};
    const int32_t *f[2] = {w->rot_f_in, w->rot_f_out};
    const int64_t n[2] = {w->in, w->out};
    if (!w->rot_s_in || !w->rot_s_out || !w->rot_m_in || !w->rot_m_out) {
        seterr(err, errlen, "%s: +rot layer without signs or blocks (corrupt file?)", what);
        return -1;
    }
    for (int d = 0; d < 2; d++) {
        int64_t prod = 1;
        if (nb[d] < 1 || nb[d] > 8) { seterr(err, errlen, "%s: +rot with %d blocks (1..8)", what, nb[d]); return -1; }
        for (int i = 0; i < nb[d]; i++) {
            if (f[d][i] < 1 || f[d][i] > 64) { seterr(err, errlen, "%s: +rot block of order %d (1..64)", what, f[d][i]); return -1; }
            prod *= f[d][i];
        }
        if (prod != n[d]) { seterr(err, errlen, "%s: +rot blocks multiply to %lld, not %lld", what, (long long)prod, (long long)n[d]); return -1; }
        const float *m = d ? w->rot_m_out : w->rot_m_in;  /* rot_apply runs power-of-two blocks as butterflies */
        for (int a = 0; a < nb[d]; m += (int64_t)f[d][a] * f[d][a], a++) {
            const int64_t fa = f[d][a];
            if (!is_pow2(fa)) continue;
            for (int64_t i = 0; i < fa; i++)
                for (int64_t k = 0; k < fa; k++)
                    if (m[i * fa + k] != (__builtin_popcountll((unsigned long long)(i & k)) & 1 ? -1.f : 1.f)) {
                        seterr(err, errlen, "%s: +rot block of order %lld is not a Sylvester Hadamard matrix", what, (long long)fa);
                        return -1;
                    }
        }
    }
    return 0;
}

static int matmul_base(salomi_engine *e, const weight_t *W, const float *x, int64_t M, float *y);

/* y += diag(us) U diag(vs) V x per row ("+lowrank"; engine.h): R (in + out) multiply-adds,
 * a few percent of the base layer's work for the ranks the quantizer picks, so plain loops
 * on the calling thread. */
static void lowrank_add(const salomi_weight *w, const float *x, int64_t M, float *y, float *t) {
    const int64_t R = w->lr_rank, in = w->in, out = w->out;
    for (int64_t m = 0; m < M; m++, x += in, y += out) {
        for (int64_t r = 0; r < R; r++) {
            const int8_t *v = w->lr_v + r * in;
            float a[8] = {0};
            int64_t j = 0;
            for (; j + 8 <= in; j += 8)
                for (int l = 0; l < 8; l++) a[l] += (float)v[j + l] * x[j + l];
            float s = ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]));
            for (; j < in; j++) s += (float)v[j] * x[j];
            t[r] = s * salomi_h2f(w->lr_vs[r]);
        }
        for (int64_t o = 0; o < out; o++) {
            const int8_t *u = w->lr_u + o * R;
            float s = 0.f;
            for (int64_t r = 0; r < R; r++) s += (float)u[r] * t[r];
            y[o] += s * salomi_h2f(w->lr_us[o]);
        }
    }
}

/* What follows the base kernel of a layer whose input x was rotated into rx (rx == x
 * without +rot): the low-rank term inside the rotation, U^T, the bias, the outer one. */
static void finish_out(salomi_engine *e, const weight_t *W, const float *x, const float *rx, int64_t M, float *y) {
    const salomi_weight *w = &W->w;
    if (w->lr_rank && w->lr_rot_inside) lowrank_add(w, rx, M, y, e->lrt);
    if (w->rot) rot_out(e, w, y, M);
    add_bias(w, M, y);
    if (w->lr_rank && !w->lr_rot_inside) lowrank_add(w, x, M, y, e->lrt);
}

/* A +rot layer on an already rotated input rx (x: its unrotated input): the base kernel, the
 * low-rank term where it sits inside the rotation, U^T, the bias, an outer low-rank term. */
static int matmul_rotated(salomi_engine *e, const weight_t *W, const float *x, const float *rx, int64_t M, float *y) {
    weight_t plain = *W;
    plain.w.rot = 0;
    plain.w.bias = NULL;
    plain.w.lr_rank = 0;
    int rc = matmul_base(e, &plain, rx, M, y);
    if (rc) return rc;
    finish_out(e, W, x, rx, M, y);
    return 0;
}

static int matmul(salomi_engine *e, const weight_t *W, const float *x, int64_t M, float *y) {
    if (W->w.rot) return matmul_rotated(e, W, x, rot_in(e, &W->w, x, M), M, y);
    const int rc = matmul_base(e, W, x, M, y);
    if (!rc && W->w.lr_rank) lowrank_add(&W->w, x, M, y, e->lrt);
    return rc;
}

static int matmul_base(salomi_engine *e, const weight_t *W, const float *x, int64_t M, float *y) {
    const salomi_weight *w = &W->w;
    const int nt = e->c.threads;
    int rc = 0;
    switch (w->kind) {
    case SALOMI_W_SIGN:
        if (W->il) { run_vq(e, W, 1, x, M, &y); break; }
        rc = (w->act_i8 ? salomi_sign_matmul_i8 : salomi_sign_matmul)(x, M, w->in, w->out, w->data, w->scale, w->group, y, nt);
        break;
    case SALOMI_W_TERNARY:
        if (W->il) { run_vq(e, W, 1, x, M, &y); break; }
        rc = (w->act_i8 ? salomi_ternary_matmul_i8 : salomi_ternary_matmul)(x, M, w->in, w->out, w->data, w->scale, w->group, y, nt);
        break;
    case SALOMI_W_GRID:
        rc = (w->act_i8 ? salomi_grid_matmul_i8 : salomi_grid_matmul)(x, M, w->in, w->out, w->data, w->bits, w->scale, w->zero,
                                                                   w->group, w->perm, y, nt);
        break;
    case SALOMI_W_VQ: run_vq(e, W, 1, x, M, &y); break;
    default: {
        fjob_t J = {.w = w, .x = x, .M = M, .y = y, .avx2 = use_avx2(), .err = 0};
        salomi_run_parallel(float_task, &J, nt);
        rc = __atomic_load_n(&J.err, __ATOMIC_RELAXED);
    }
    }
    if (rc != 0) {
        snprintf(e->err, sizeof e->err, "kernel failed (%s) on a %lldx%lld layer", rc == -2 ? "out of memory" : "invalid argument",
                 (long long)w->out, (long long)w->in);
        return rc == -2 ? -2 : -3;
    }
    add_bias(w, M, y);
    return 0;
}

/* Projections that share their input (q/k/v, gate/up): when all are kernel formats,
 * one pool dispatch runs them all (saves a wake-up and a sync per projection). */
static int matmul_group(salomi_engine *e, const weight_t *W, int n, const float *x, int64_t M, float *const *y) {
    salomi_matmul_op ops[4];
    int ok = n <= 4, shared = 1;
    const int rot = n > 0 && W[0].w.rot;
    for (int i = 0; i < n; i++) {
        const salomi_weight *w = &W[i].w;
        /* +rot: one input rotation when every layer uses the same one */
        if (w->rot != rot || (rot && (w->rot_s_in != W[0].w.rot_s_in || w->rot_m_in != W[0].w.rot_m_in ||
                                      w->in != W[0].w.in))) shared = 0;
    }
    for (int i = 0; ok && i < n; i++) {
        const salomi_weight *w = &W[i].w;
        if (!shared || w->act_i8) { ok = 0; break; }  /* no batched int8 kernel */
        int f = w->kind == SALOMI_W_SIGN ? SALOMI_FMT_SIGN : w->kind == SALOMI_W_TERNARY ? SALOMI_FMT_TERNARY
                : w->kind == SALOMI_W_GRID ? SALOMI_FMT_GRID : -1;
        if (f < 0) { ok = 0; break; }
        ops[i] = (salomi_matmul_op){.format = f, .bits = w->bits, .in = w->in, .out = w->out, .group = w->group,
                                    .data = w->data, .scale = w->scale, .zero = w->zero, .perm = w->perm, .y = y[i]};
    }
    int all_vq = shared; /* table layers: vq (float or int8 tables), sign and ternary with int8 tables */
    for (int i = 0; i < n; i++) all_vq &= W[i].w.kind == SALOMI_W_VQ || W[i].il != NULL;
    if (all_vq) {  /* one dispatch for all of them */
        const float *rx = rot ? rot_in(e, &W[0].w, x, M) : x;
        run_vq(e, W, n, rx, M, y);
        for (int i = 0; i < n; i++) finish_out(e, &W[i], x, rx, M, y[i]);
        return 0;
    }
    if (!ok && rot && shared) {  /* rotate x once, run each layer, unrotate each output */
        const float *rx = rot_in(e, &W[0].w, x, M);
        for (int i = 0; i < n; i++) {
            int rc = matmul_rotated(e, &W[i], x, rx, M, y[i]);
            if (rc) return rc;
        }
        return 0;
    }
    if (!ok) {
        for (int i = 0; i < n; i++) {
            int rc = matmul(e, &W[i], x, M, y[i]);
            if (rc) return rc;
        }
        return 0;
    }
    const float *rx = rot ? rot_in(e, &W[0].w, x, M) : x;
    int rc = salomi_matmul_batch(ops, n, rx, M, e->c.threads);
    if (rc != 0) {
        snprintf(e->err, sizeof e->err, "kernel failed (%s) on a batch of %d layers", rc == -2 ? "out of memory" : "invalid argument", n);
        return rc == -2 ? -2 : -3;
    }
    for (int i = 0; i < n; i++) finish_out(e, &W[i], x, rx, M, y[i]);
    return 0;
}

/* Row r of a weight as float32 (the embedding lookup, for any kind). */
static void weight_row(const weight_t *W, int64_t r, float *out, int avx2) {
    const salomi_weight *w = &W->w;
    const int64_t in = w->in, rb = packed_row_bytes(w);
    const uint8_t *row = (const uint8_t *)w->data + r * rb;
    switch (w->kind) {
    case SALOMI_W_F32: memcpy(out, (const float *)w->data + r * in, sizeof(float) * (size_t)in); break;
    case SALOMI_W_F16: f16_row((const uint16_t *)w->data + r * in, out, in, avx2); break;
    case SALOMI_W_SIGN: {
        const int64_t ng = in / w->group;
        for (int64_t j = 0; j < in; j++)
            out[j] = salomi_h2f(w->scale[r * ng + j / w->group]) * ((row[j >> 3] >> (j & 7)) & 1 ? 1.0f : -1.0f);
        break;
    }
    case SALOMI_W_TERNARY: {
        const int64_t ng = in / w->group;
        static const int pow3[5] = {1, 3, 9, 27, 81};
        for (int64_t j = 0; j < in; j++)
            out[j] = salomi_h2f(w->scale[r * ng + j / w->group]) * (float)((row[j / 5] / pow3[j % 5]) % 3 - 1);
        break;
    }
    case SALOMI_W_GRID: {
        const int64_t ng = in / w->group;
        for (int64_t j = 0; j < in; j++) {
            int64_t g = r * ng + j / w->group;
            float val = salomi_h2f(w->scale[g]) * ((float)code_at(row, rb, j, w->bits) - salomi_h2f(w->zero[g]));
            out[w->perm ? w->perm[j] : j] = val; /* stored column j is weight column perm[j] */
        }
        break;
    }
    case SALOMI_W_VQ: {
        const int64_t d = w->vq_d, nv = in / d;
        const float s = salomi_h2f(w->scale[r]);
        for (int64_t v = 0; v < nv; v++) {
            const float *cb = W->cb + (int64_t)code_at(row, rb, v, w->bits) * d;
            for (int64_t t = 0; t < d; t++) out[v * d + t] = cb[t] * s;
        }
        break;
    }
    }
}

/* ------------------------------------------------------------------ validation */

static int check_weight(const salomi_weight *w, int64_t out, int64_t in, const char *what, int64_t idx, char *err,
                        int errlen) {
#define FAIL(...) do { seterr(err, errlen, __VA_ARGS__); return -1; } while (0)
    if (w->out != out || w->in != in)
        FAIL("%s (weight %lld) is %lldx%lld, the config needs %lldx%lld", what, (long long)idx, (long long)w->out,
             (long long)w->in, (long long)out, (long long)in);
    if (!w->data) FAIL("%s (weight %lld) has no data", what, (long long)idx);
    int64_t ng = 0;
    switch (w->kind) {
    case SALOMI_W_F32: case SALOMI_W_F16: break;
    case SALOMI_W_GRID:
        if (w->bits < 1 || w->bits > 8) FAIL("%s: grid with %d bits (1..8 supported)", what, w->bits);
        if (!w->zero) FAIL("%s: grid layer without zero points", what);
        /* fall through */
    case SALOMI_W_SIGN: case SALOMI_W_TERNARY:
        if (w->group < 1 || in % w->group) FAIL("%s: group %lld does not divide %lld", what, (long long)w->group, (long long)in);
        ng = in / w->group;
        break;
    case SALOMI_W_VQ: {
        if (w->vq_d < 1 || in % w->vq_d || w->vq_k < 2 || w->vq_k > 65536) FAIL("%s: bad vq d/k", what);
        int b = 1;
        while ((1LL << b) < w->vq_k) b++;
        if (w->bits != b) FAIL("%s: vq with k=%lld needs %d-bit codes, got %d", what, (long long)w->vq_k, b, w->bits);
        if (!w->codebook) FAIL("%s: vq layer without a codebook", what);
        ng = 1;
        break;
    }
    default: FAIL("%s: unknown weight kind %d", what, w->kind);
    }
    if (w->data_bytes != packed_row_bytes(w) * out)
        FAIL("%s: data is %lld bytes, expected %lld", what, (long long)w->data_bytes, (long long)(packed_row_bytes(w) * out));
    if (ng && (!w->scale || w->scale_len != ng * out))
        FAIL("%s: scale has %lld entries, expected %lld", what, (long long)w->scale_len, (long long)(ng * out));
    if (w->kind == SALOMI_W_GRID && w->perm)
        for (int64_t j = 0; j < in; j++)
            if (w->perm[j] < 0 || w->perm[j] >= in) FAIL("%s: column permutation entry out of range (corrupt)", what);
    if (w->lr_rank < 0 || w->lr_rank > (out < in ? out : in) ||
        (w->lr_rank && (!w->lr_u || !w->lr_v || !w->lr_us || !w->lr_vs)))
        FAIL("%s: low-rank part of rank %d is malformed (1..%lld with all four tensors)", what, w->lr_rank,
             (long long)(out < in ? out : in));
    if (w->lr_rot_inside && !w->rot) FAIL("%s: low-rank part inside a rotation the layer does not have", what);
    if (w->kind == SALOMI_W_VQ) { /* every code must index the codebook: checked once here, not per token */
        const int64_t rb = packed_row_bytes(w), nv = in / w->vq_d;
        for (int64_t o = 0; o < out; o++)
            for (int64_t v = 0; v < nv; v++)
                if (code_at((const uint8_t *)w->data + o * rb, rb, v, w->bits) >= (unsigned)w->vq_k)
                    FAIL("%s: vq code >= codebook size %lld (corrupt)", what, (long long)w->vq_k);
    }
    return 0;
#undef FAIL
}

/* ------------------------------------------------------------------ create / free */

void salomi_engine_free(salomi_engine *e) {
    if (!e) return;
    if (e->w)
        for (int64_t i = 0; i < 7LL * e->c.n_layers + 2; i++) free(e->w[i].cb), free(e->w[i].il);
    free(e->w);
    free(e->norms);
    free(e->kcache); free(e->vcache);
    free(e->x); free(e->xn); free(e->q); free(e->k); free(e->v); free(e->att); free(e->tmp); free(e->g); free(e->u);
    free(e->scores); free(e->cosb); free(e->sinb); free(e->lut); free(e->part); free(e->lrt); free(e->rx); free(e->rtmp);
    free(e);
}

salomi_engine *salomi_engine_create(const salomi_engine_config *cfg, const salomi_weight *weights,
                                    const float *const *norms, char *err, int errlen) {
    if (!cfg || !weights || !norms) { seterr(err, errlen, "null argument"); return NULL; }
    const salomi_engine_config c = *cfg;
    if (c.n_layers < 1 || c.hidden < 1 || c.n_heads < 1 || c.n_kv_heads < 1 || c.head_dim < 2 || c.head_dim % 2 ||
        c.intermediate < 1 || c.vocab < 1 || c.max_seq < 1 || c.threads < 1 || !c.inv_freq ||
        c.n_heads % c.n_kv_heads || (c.kv_f16 != 0 && c.kv_f16 != 1)) {
        seterr(err, errlen, "invalid engine config (layers/heads/dims must be positive, heads divisible by kv heads)");
        return NULL;
    }
    if (c.kv_f16 && c.head_dim > KV16_MAX_HD) {
        seterr(err, errlen, "head_dim %d > %d: use a float32 KV cache (kv=float32)", c.head_dim, KV16_MAX_HD);
        return NULL;
    }
    salomi_engine *e = calloc(1, sizeof *e);
    if (!e) { seterr(err, errlen, "out of memory"); return NULL; }
    e->c = c;
    if (e->c.threads > MAX_POOL) e->c.threads = MAX_POOL;
    e->q_dim = (int64_t)c.n_heads * c.head_dim;
    e->kv_dim = (int64_t)c.n_kv_heads * c.head_dim;
    const int64_t L = c.n_layers, nw = 7 * L + 2, H = c.hidden, I = c.intermediate;
    e->w = calloc((size_t)nw, sizeof(weight_t));
    e->norms = calloc((size_t)(2 * L + 1), sizeof(float *));
    if (!e->w || !e->norms) goto oom;
    static const char *names[7] = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};
    for (int64_t i = 0; i < nw; i++) {
        const salomi_weight *w = &weights[i];
        int64_t out, in;
        char what[64];
        if (i == 0) { out = c.vocab, in = H; snprintf(what, sizeof what, "embed_tokens"); }
        else if (i == nw - 1) { out = c.vocab, in = H; snprintf(what, sizeof what, "lm_head"); }
        else {
            int64_t l = (i - 1) / 7, j = (i - 1) % 7;
            snprintf(what, sizeof what, "layers.%lld.%s", (long long)l, names[j]);
            const int64_t outs[7] = {e->q_dim, e->kv_dim, e->kv_dim, H, I, I, H};
            const int64_t ins[7] = {H, H, H, e->q_dim, H, H, I};
            out = outs[j], in = ins[j];
        }
        if (check_weight(w, out, in, what, i, err, errlen) || check_rot(w, what, err, errlen)) { salomi_engine_free(e); return NULL; }
        if (i == 0 && w->rot) { seterr(err, errlen, "embed_tokens: +rot embeddings are not supported; re-quantize without +rot on the embedding"); salomi_engine_free(e); return NULL; }
        e->w[i].w = *w;
        e->w[i].td = w->vq_d, e->w[i].tk = w->vq_k;
        if ((w->kind == SALOMI_W_SIGN || w->kind == SALOMI_W_TERNARY) && w->act_i8 && i != 0 &&
            salomi_tables_ok(w->kind, in, w->group)) {
            e->w[i].il = malloc((size_t)salomi_tables_bytes(w->kind, out, in));
            if (!e->w[i].il) goto oom;
            salomi_tables_layout(w->kind, w->data, out, in, e->w[i].il);
            if (w->kind == SALOMI_W_SIGN) sign_tables_weight(&e->w[i]);
            else {
                if (!(e->w[i].cb = malloc(sizeof(float) * 5 * TERN_K))) goto oom;
                ternary_tables_weight(&e->w[i], e->w[i].cb);
            }
            const int64_t s8 = vq8_scratch_floats(e->w[i].tk, tables_nv(w->kind, in));
            if (s8 > e->lut_stride) e->lut_stride = s8;
        }
        if (w->kind == SALOMI_W_VQ) {
            const int64_t n = w->vq_k * w->vq_d, lut = (vq_tile_vectors(w) * w->vq_k + 15) / 16 * 16;
            e->w[i].cb = malloc(sizeof(float) * (size_t)(2 * n));
            if (!e->w[i].cb) goto oom;
            float *cbt = e->w[i].cb + n;
            e->w[i].cbt = cbt;
            for (int64_t t = 0; t < n; t++) e->w[i].cb[t] = salomi_h2f(w->codebook[t]);
            for (int64_t c = 0; c < w->vq_k; c++)
                for (int64_t t = 0; t < w->vq_d; t++) cbt[t * w->vq_k + c] = e->w[i].cb[c * w->vq_d + t];
            if (lut > e->lut_stride) e->lut_stride = lut;
            if (w->act_i8) { /* int8 tables: codes re-laid as bytes, 32 rows side by side */
                if (w->vq_k > 256) { seterr(err, errlen, "%s: int8 vq tables need k <= 256 (got %lld); use activations=float", what, (long long)w->vq_k); salomi_engine_free(e); return NULL; }
                const int64_t nv = in / w->vq_d, groups = (out + 31) / 32, rb = packed_row_bytes(w);
                const int64_t s8 = vq8_scratch_floats(w->vq_k, nv);
                e->w[i].il = calloc((size_t)(groups * nv * 32), 1);
                if (!e->w[i].il) goto oom;
                for (int64_t o = 0; o < out; o++)
                    for (int64_t v = 0; v < nv; v++)
                        e->w[i].il[il_index(o, v, out, nv, 0)] = (uint8_t)code_at(w->data + o * rb, rb, v, w->bits);
                if (s8 > e->lut_stride) e->lut_stride = s8;
            }
        }
    }
    for (int64_t i = 0; i < 2 * L + 1; i++) {
        if (!norms[i]) { seterr(err, errlen, "norm weight %lld is missing", (long long)i); salomi_engine_free(e); return NULL; }
        e->norms[i] = norms[i];
    }
    /* calloc: untouched cache pages are never made resident, so a long max_seq costs
     * address space only until positions are actually used. */
    const size_t kvn = (size_t)L * (size_t)c.max_seq * (size_t)e->kv_dim;
    e->kcache = calloc(kvn, c.kv_f16 ? 2 : sizeof(float));
    e->vcache = calloc(kvn, c.kv_f16 ? 2 : sizeof(float));
    const int64_t wide = I > e->q_dim ? I : e->q_dim, maxin = wide > H ? wide : H;
    e->x = malloc(sizeof(float) * CHUNK * H);
    e->xn = malloc(sizeof(float) * CHUNK * maxin);
    e->q = malloc(sizeof(float) * CHUNK * e->q_dim);
    e->k = malloc(sizeof(float) * CHUNK * e->kv_dim);
    e->v = malloc(sizeof(float) * CHUNK * e->kv_dim);
    e->att = malloc(sizeof(float) * CHUNK * e->q_dim);
    e->tmp = malloc(sizeof(float) * CHUNK * H);
    e->g = malloc(sizeof(float) * CHUNK * I);
    e->u = malloc(sizeof(float) * CHUNK * I);
    e->scores = malloc(sizeof(float) * (size_t)e->c.threads * (size_t)c.max_seq);
    e->cosb = malloc(sizeof(float) * CHUNK * (size_t)(c.head_dim / 2));
    e->sinb = malloc(sizeof(float) * CHUNK * (size_t)(c.head_dim / 2));
    const int64_t widest = maxin > c.vocab ? maxin : c.vocab; /* any layer's in or out */
    e->rx = malloc(sizeof(float) * CHUNK * widest);
    e->rtmp = malloc(sizeof(float) * (size_t)widest);
    e->lut = e->lut_stride ? malloc(sizeof(float) * (size_t)e->c.threads * (size_t)e->lut_stride) : NULL;
    e->part_cap = CHUNK * (e->q_dim + 2 * e->kv_dim > 2 * I ? e->q_dim + 2 * e->kv_dim : 2 * I);
    e->part_cap = e->part_cap > CHUNK * H ? e->part_cap : CHUNK * H;
    e->part = malloc(sizeof(float) * (size_t)e->part_cap);
    e->lrt = malloc(sizeof(float) * (size_t)maxin); /* rank <= in <= maxin */
    if (!e->kcache || !e->vcache || !e->x || !e->xn || !e->q || !e->k || !e->v || !e->att || !e->tmp || !e->g ||
        !e->u || !e->scores || !e->cosb || !e->sinb || !e->rx || !e->rtmp || (e->lut_stride && !e->lut) || !e->part || !e->lrt)
        goto oom;
    const char *p = getenv("SALOMI_ENGINE_PROFILE");
    e->profile = p && *p && strcmp(p, "0") != 0;
    if (e->profile) g_prof_cpu = strcmp(p, "cpu") == 0;
    return e;
oom:
    seterr(err, errlen, "out of memory creating the engine (KV cache of %d positions; lower max_seq)", c.max_seq);
    salomi_engine_free(e);
    return NULL;
}

void salomi_engine_reset(salomi_engine *e) { if (e) e->len = 0; }
int64_t salomi_engine_length(const salomi_engine *e) { return e ? e->len : 0; }
const char *salomi_engine_error(const salomi_engine *e) { return e ? e->err : "null engine"; }

int salomi_engine_profile(const salomi_engine *e, double *out, int n) {
    if (!e || !out) return 0;
    int k = n < NPROF ? n : NPROF;
    for (int i = 0; i < k; i++) out[i] = e->prof[i];
    return k;
}

/* ------------------------------------------------------------------ forward */

static void rmsnorm(const float *x, const float *w, float *y, int64_t n, float eps) {
    double ss = 0.0; /* double: the mean of squares over hidden dims must not lose bits */
    for (int64_t i = 0; i < n; i++) ss += (double)x[i] * x[i];
    const float r = 1.0f / sqrtf((float)(ss / (double)n) + eps);
    for (int64_t i = 0; i < n; i++) y[i] = w[i] * (x[i] * r);
}

/* HF rotate_half: pairs (i, i + half). cos/sin are per (token, i). */
static void rope(float *v, int64_t nheads, int64_t hd, const float *cs, const float *sn) {
    const int64_t half = hd / 2;
    for (int64_t h = 0; h < nheads; h++) {
        float *a = v + h * hd;
        for (int64_t i = 0; i < half; i++) {
            float x1 = a[i], x2 = a[i + half];
            a[i] = x1 * cs[i] - x2 * sn[i];
            a[i + half] = x2 * cs[i] + x1 * sn[i];
        }
    }
}

typedef struct {
    salomi_engine *e;
    int64_t layer, n, pos0;
    int avx2;
} ajob_t;

/* Causal GQA for (token, head) pairs split across threads; scores in per-thread scratch. */
/* A cache row as float32: itself, or widened into buf (half cache). */
static inline const float *kv_row(const char *row, int64_t hd, int h16, float *buf) {
    if (!h16) return (const float *)row;
    for (int64_t j = 0; j < hd; j++) buf[j] = salomi_h2f(((const uint16_t *)row)[j]);
    return buf;
}

static void attn_task(void *ctx, int tid, int nt) {
    ajob_t *J = ctx;
    salomi_engine *e = J->e;
    const int64_t H = e->c.n_heads, hd = e->c.head_dim, rep = H / e->c.n_kv_heads, kvd = e->kv_dim;
    const int64_t pairs = J->n * H, per = (pairs + nt - 1) / nt;
    const int64_t p0 = min64(pairs, tid * per), p1 = min64(pairs, p0 + per);
    const int64_t ms = e->c.max_seq;
    const int h16 = e->c.kv_f16;
    const size_t esz = h16 ? 2 : 4;
    const char *K = (const char *)e->kcache + J->layer * ms * kvd * esz; /* + (kvh*ms + t)*hd elements */
    const char *V = (const char *)e->vcache + J->layer * ms * kvd * esz;
    float *sc = e->scores + (int64_t)tid * e->c.max_seq;
    float kr[KV16_MAX_HD]; /* portable path, half cache: one row widened */
    for (int64_t p = p0; p < p1; p++) {
        const int64_t i = p / H, h = p % H, kvh = h / rep, ctxlen = J->pos0 + i + 1;
        const float *q = e->q + i * e->q_dim + h * hd;
#if ENG_X86
        if (J->avx2 && hd % 8 == 0) {
            attn_head_avx2(q, K + kvh * ms * hd * esz, V + kvh * ms * hd * esz, hd, ctxlen, hd, e->c.attn_scale, sc,
                           e->att + i * e->q_dim + h * hd, h16);
            continue;
        }
#endif
        float mx = -INFINITY;
        for (int64_t t = 0; t < ctxlen; t++) {
            float s = dot(q, kv_row(K + (kvh * ms + t) * hd * esz, hd, h16, kr), hd, J->avx2) * e->c.attn_scale;
            sc[t] = s;
            if (s > mx) mx = s;
        }
        float sum = 0.0f;
        for (int64_t t = 0; t < ctxlen; t++) sum += (sc[t] = expf(sc[t] - mx));
        const float inv = 1.0f / sum;
        float *o = e->att + i * e->q_dim + h * hd;
        memset(o, 0, sizeof(float) * (size_t)hd);
        for (int64_t t = 0; t < ctxlen; t++) axpy(o, sc[t] * inv, kv_row(V + (kvh * ms + t) * hd * esz, hd, h16, kr), hd, J->avx2);
    }
}

#define PROF_START double t_ = e->profile ? now_s() : 0.0
#define PROF(slot)                                                                                                    \
    do {                                                                                                              \
        if (e->profile) { double t2_ = now_s(); e->prof[slot] += t2_ - t_; t_ = t2_; }                               \
    } while (0)
#define TRY(call)                                                                                                     \
    do {                                                                                                              \
        int rc_ = (call);                                                                                             \
        if (rc_) return rc_;                                                                                          \
    } while (0)

static int forward_chunk(salomi_engine *e, const int32_t *tok, int64_t n, int64_t pos0, float *logits, int want) {
    const salomi_engine_config *c = &e->c;
    const int64_t Hd = c->hidden, I = c->intermediate, hd = c->head_dim, half = hd / 2, kvd = e->kv_dim;
    const int avx2 = use_avx2();
    PROF_START;
    for (int64_t i = 0; i < n; i++) weight_row(&e->w[0], tok[i], e->x + i * Hd, avx2);
    for (int64_t i = 0; i < n; i++) /* rotary angles for this chunk's positions, float32 as HF */
        for (int64_t j = 0; j < half; j++) {
            float f = (float)(pos0 + i) * c->inv_freq[j];
            e->cosb[i * half + j] = cosf(f) * c->rope_factor;
            e->sinb[i * half + j] = sinf(f) * c->rope_factor;
        }
    PROF(P_EMBED);
    for (int64_t l = 0; l < c->n_layers; l++) {
        const weight_t *W = &e->w[1 + 7 * l];
        for (int64_t i = 0; i < n; i++) rmsnorm(e->x + i * Hd, e->norms[2 * l], e->xn + i * Hd, Hd, c->rms_eps);
        PROF(P_NORM);
        float *qkv[3] = {e->q, e->k, e->v};
        TRY(matmul_group(e, &W[0], 3, e->xn, n, qkv));
        PROF(P_QKV);
        const size_t esz = c->kv_f16 ? 2 : 4;
        char *Kl = (char *)e->kcache + l * c->max_seq * kvd * esz, *Vl = (char *)e->vcache + l * c->max_seq * kvd * esz;
        for (int64_t i = 0; i < n; i++) {
            rope(e->q + i * e->q_dim, c->n_heads, hd, e->cosb + i * half, e->sinb + i * half);
            rope(e->k + i * kvd, c->n_kv_heads, hd, e->cosb + i * half, e->sinb + i * half);
        }
        for (int64_t g = 0; g < c->n_kv_heads; g++) /* scatter this chunk's k/v rows into per-head runs */
            for (int64_t i = 0; i < n; i++) {
                const int64_t dst = (g * c->max_seq + pos0 + i) * hd;
                const float *k = e->k + i * kvd + g * hd, *v = e->v + i * kvd + g * hd;
                if (c->kv_f16) {
                    for (int64_t j = 0; j < hd; j++) {
                        ((uint16_t *)Kl)[dst + j] = salomi_f2h(k[j]);
                        ((uint16_t *)Vl)[dst + j] = salomi_f2h(v[j]);
                    }
                } else {
                    memcpy(Kl + dst * esz, k, sizeof(float) * (size_t)hd);
                    memcpy(Vl + dst * esz, v, sizeof(float) * (size_t)hd);
                }
            }
        ajob_t AJ = {.e = e, .layer = l, .n = n, .pos0 = pos0, .avx2 = avx2};
        /* threads only pay off when there is real work (pool wake-up is a few us) */
        int64_t work = n * c->n_heads * (pos0 + n);
        salomi_run_parallel(attn_task, &AJ, work >= 1024 ? c->threads : 1);
        PROF(P_ATTN);
        TRY(matmul(e, &W[3], e->att, n, e->tmp));
        for (int64_t t = 0; t < n * Hd; t++) e->x[t] += e->tmp[t];
        PROF(P_O);
        for (int64_t i = 0; i < n; i++) rmsnorm(e->x + i * Hd, e->norms[2 * l + 1], e->xn + i * Hd, Hd, c->rms_eps);
        PROF(P_NORM);
        float *gu[2] = {e->g, e->u};
        TRY(matmul_group(e, &W[4], 2, e->xn, n, gu));
        PROF(P_GATEUP);
#if ENG_X86
        if (avx2) silu_mul_avx2(e->g, e->u, n * I);
        else
#endif
            for (int64_t t = 0; t < n * I; t++) {
                float g = e->g[t];
                e->g[t] = g / (1.0f + expf(-g)) * e->u[t]; /* SiLU(gate) * up */
            }
        PROF(P_ACT);
        TRY(matmul(e, &W[6], e->g, n, e->tmp));
        for (int64_t t = 0; t < n * Hd; t++) e->x[t] += e->tmp[t];
        PROF(P_DOWN);
    }
    /* the KV entries of this chunk are written: later chunks may attend to them */
    e->len = pos0 + n;
    if (want == 0) return 0;
    const int64_t first = want == 2 ? 0 : n - 1, m = n - first;
    for (int64_t i = first; i < n; i++)
        rmsnorm(e->x + i * Hd, e->norms[2 * c->n_layers], e->xn + (i - first) * Hd, Hd, c->rms_eps);
    PROF(P_NORM);
    TRY(matmul(e, &e->w[7 * c->n_layers + 1], e->xn, m, logits));
    PROF(P_HEAD);
    return 0;
}

int salomi_engine_forward(salomi_engine *e, const int32_t *tokens, int64_t n, int64_t pos0, float *logits,
                          int all_logits) {
    if (!e) return -1;
    e->err[0] = 0;
    if (!tokens || !logits || n < 1) { snprintf(e->err, sizeof e->err, "need at least one token and an output buffer"); return -1; }
    if (pos0 < 0 || pos0 > e->len) {
        snprintf(e->err, sizeof e->err, "position %lld is past the %lld cached positions; reset() first",
                 (long long)pos0, (long long)e->len);
        return -1;
    }
    if (pos0 + n > e->c.max_seq) {
        snprintf(e->err, sizeof e->err, "%lld positions exceed the KV cache of %d; create the engine with a larger max_seq",
                 (long long)(pos0 + n), e->c.max_seq);
        return -1;
    }
    for (int64_t i = 0; i < n; i++)
        if (tokens[i] < 0 || tokens[i] >= e->c.vocab) {
            snprintf(e->err, sizeof e->err, "token id %d is outside the vocabulary of %d", tokens[i], e->c.vocab);
            return -1;
        }
    if (e->profile) e->prof[P_CALLS] += 1;
    e->len = pos0; /* entries past pos0 are overwritten from here on (also if a kernel fails) */
    for (int64_t off = 0; off < n; off += CHUNK) {
        const int64_t cnt = min64(CHUNK, n - off), last = off + cnt == n;
        float *out = all_logits ? logits + off * (int64_t)e->c.vocab : logits;
        int want = all_logits ? 2 : last ? 1 : 0;
        int rc = forward_chunk(e, tokens + off, cnt, pos0 + off, out, want);
        if (rc) return rc;
    }
    return 0;
}
