/* int8-activation GEMV / small-M kernels for the sign, ternary and 2-, 4- and 8-bit grid formats
 * (salomi_sign_matmul_i8, salomi_ternary_matmul_i8, salomi_grid_matmul_i8; API in kernels.h).
 *
 * Why: the float kernels of kernels.c decode every 1-2-bit weight to a float and FMA
 * it, which is compute bound far below memory bandwidth. Here the activation row is
 * quantized once per call to int8 and the dot products run in integer SIMD, where one
 * instruction handles 16-32 weights (bitnet.cpp / llama.cpp TQ style; a T-MAC table
 * lookup needs the weights re-laid out across rows, which the packed format is not).
 *
 * Activation quantization (documented contract, mirrored by tests/test_kernels_lut.py):
 *   block = the weight's scale group g (G columns; G = in gives one scale per row),
 *   amax_g = max |x_j| over the group, sx_g = amax_g / 127,
 *   xq_j = round_half_even(x_j * (127 / amax_g)) in [-127, 127]  (all-zero group: 0).
 * Using the weight group as the block costs nothing: a float multiply per group is
 * already needed for the weight scale. Error vs the float kernel per output:
 *   |y - y_float| <= sum_g |s_g| * sx_g / 2 * sum_{j in g} |q_j - z_g|  (+ float rounding),
 * (w_j = s_g (q_j - z_g)), i.e. at most amax_g / 254 per unit of |w|. Non-finite activations give NaN outputs.
 *
 * Integer formulation (exact, any summation order gives the same integers):
 *   sign:    w = s (2b - 1), b in {0,1}:  sum_j x_j w_j = s sx (2 sum_j b_j xq_j - X_g)
 *   ternary: w = s (t - 1), t in {0,1,2}: sum_j x_j w_j = s sx (sum_j t_j xq_j - X_g)
 *   grid2:   w = s (q - z), q in {0..3}:  sum_j x_j w_j = s sx sum_j q_j xq_j - s z (sx X_g)
 *   grid4:   w = s (q - z), q in {0..15}:  as grid2 (codes are unsigned, maddubs takes them as they are)
 *   grid8:   w = s (q - z), q in {0..255}: with q' = q - 128 (int8),
 *            sum_j x_j w_j = s sx sum_j q'_j xq_j - s (z - 128) (sx X_g)
 * with X_g = sum_{j in g} xq_j (row independent: one per-row correction, or for the
 * sign planes layout the starting value of the integer accumulator).
 * Ternary bytes hold 5 base-3 digits t_k = f_k - 3 f_{k+1}, f_k = floor(byte / 3^k),
 * so sum_k t_k x_k = sum_k f_k (x_k - 3 x_{k-1}) (x_{-1} = 0): the activations are
 * transformed once per call and the weights need only four exact mulhi divisions
 * (f_k = mulhi(byte, ceil(2^16 / 3^k)), exact for bytes < 256), no digit extraction.
 *
 * Layouts (activations are re-laid out once per call to match the weight bytes):
 *  - sign, G in {32, 64, 128} or a multiple of 256 (the usual case): bit planes. A
 *    256-column chunk is 32 weight bytes; plane k holds the activations of bit k of each
 *    byte, so per plane one 16-bit shift + and + maddubs handles 32 weights (no byte
 *    shuffles, one weight load per 256 columns per row), and each int32 lane (32 columns)
 *    lies in one group, so the group scales are applied per lane with one FMA per chunk.
 *    The accumulator starts at -sum xq, so it directly holds sum (2b - 1) xq.
 *  - grid2 (G in {16, 32, 64, 128} or a multiple of 128, required): the same with 4
 *    planes of 2-bit codes per 128-column chunk; the zero point enters per int32 lane
 *    (16 columns) as - s z (sx X_lane), one more FMA per chunk.
 *  - grid8 (G % 32 == 0, required): the weight bytes are the codes, the activations are
 *    the plain xq row. Per 32 columns: q' = byte ^ 0x80, maddubs(|q'|, sign(xq, q')) (the
 *    llama.cpp q8 trick: |q'| <= 128 and |xq| <= 127, so a pair sum <= 32512 never
 *    saturates), madd with ones; int32 lane l holds columns [4l, 4l+4) of each 32-column
 *    chunk, all in one group, and the group scale is applied per group with one FMA.
 *  - grid4 (G % 32 == 0 and in % 64 == 0, required): a 64-column chunk is 32 weight bytes;
 *    the activations are re-laid per chunk as its 32 even columns (low nibbles) then its 32
 *    odd columns (high nibbles), so per row and chunk: one load, and / shift+and, two
 *    maddubs (|pair| <= 2 * 15 * 127), one add, one madd: int32 lane l holds columns
 *    [8l, 8l + 8). A group of G >= 64 sums its chunks in int32 and takes one FMA with the
 *    broadcast group scale; otherwise (G = 32, 96, ...) a chunk's lanes 0-3 and 4-7 may lie in
 *    two groups: one FMA per chunk with both scales. Zero point: one correction per group, as grid8.
 *  - otherwise ("slots"): for each group the activations are copied into slots that line
 *    up with whole weight bytes: the group's bytes [b0, b1) (a byte that straddles a
 *    group edge belongs to both groups, with the other group's columns zeroed) padded
 *    to whole SIMD chunks with zeros (32 columns for sign, 16 bytes for ternary). So any
 *    G works with one inner loop.
 * Weight bytes read past a group or row meet zero activations; loads that would leave
 * the weight buffer read a zero-padded copy instead (no out-of-bounds reads).
 *
 * Why not T-MAC tables: a pshufb lookup applies one 16-entry table (one group of 4
 * activations) to 32 indices, which must then be 32 different rows' nibbles for the same
 * columns, i.e. weights interleaved across rows; the packed format is row-major, and
 * transposing it on the fly costs more than the shift/and/maddubs decode above.
 *
 * Float part and determinism: the AVX2 and scalar paths compute the same integers per
 * lane (int32 lane l of a chunk = sign planes columns [32l, 32l+32), grid2 columns
 * [16l, 16l+16), sign slots
 * columns [4l, 4l+4), ternary slots [2l, 2l+2)) and then the same float operations in
 * the same order (per-lane fma with the group scale, the same horizontal sum, the same
 * correction), so forcing the scalar ISA gives bit-identical results. AVX-512 with VNNI
 * has its own grid4 / grid8 kernels (the output head; see "AVX-512 VNNI" below), bit-identical
 * too; the other formats use the AVX2 ones.
 */
#define _GNU_SOURCE
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"
#include "kernels_internal.h"

#if defined(__x86_64__) || defined(__i386__)
#define LUT_X86 1
#include <immintrin.h>
#else
#define LUT_X86 0
#endif

#define MAX_THREADS 64
#define SIGN_CB 4    /* weight bytes per sign chunk: 32 columns = one __m256i of int8 activations */
#define TERN_CB 16   /* weight bytes per ternary chunk: 16 int16 lanes, 80 columns */
#define TERN_PLANES 5
#define SIGN_FLUSH 64 /* sign chunks per int16 accumulator flush: 64 * 2 * 127 < 32767 */

enum { LFMT_SIGN, LFMT_TERNARY, LFMT_GRID2, LFMT_GRID4, LFMT_GRID8 };
/* AVX-512 VNNI grid4 / grid8 kernel shapes (see k512_mode); K5_NONE = the AVX2 kernels.
 * grid4: G % 128 == 0, G == 64, G == 32; grid8: K5_G64 for any G % 64 == 0, G == 32; grid2: K5_G2 for G <= 128. */
enum { K5_NONE, K5_G128, K5_G64, K5_G32, K5_G2 };

/* Where a group's weight bytes and activation slots are. */
typedef struct {
    int64_t b0;    /* first weight byte of the group in a row */
    int64_t nch;   /* chunks (SIGN_CB / TERN_CB bytes each) */
    int64_t nsafe; /* leading chunks whose full load stays inside the row */
    int64_t off;   /* offset of the group's slots in a quantized activation row (elements) */
} gmeta_t;

typedef struct {
    int fmt;
    int64_t in, out, G, ng, ngp, rb; /* ngp = ng rounded up to 8 (padded per-group arrays) */
    const uint8_t *data;
    const uint16_t *scale;
    const uint16_t *zero; /* grid2 only */
    int64_t M;
    const gmeta_t *gm;
    const void *xs;   /* M rows of slots: int8 (sign) or int16 (ternary), stride xstride */
    int64_t xstride;
    const float *gs;  /* [M][ngp] float multiplier of the integer group sum: 2 sx (sign) or sx */
    const float *xc;  /* [M][ngp] sx_g * X_g, 0 in the padding: the per-row correction */
    int planes;       /* sign bit-plane layout (see sign_planes_ok) */
    int64_t nchunk;   /* planes: 256-column chunks per row */
    const float *gsv; /* planes: [M][nchunk][8] gs of the group of each int32 lane, 0 past in */
    int lane_g[8];    /* planes: group of int32 lane l relative to the chunk's first group (32 l / G) */
    int nhalf;        /* planes: groups per chunk: ccols / G, or 1 */
    int64_t ccols;    /* planes: columns per chunk (256 sign, 128 grid2); int32 lanes hold ccols / 8 */
    const float *xsv; /* grid2: [M][nchunk][8] sx_g * sum of the activations of each lane */
    float *y;
    int isa;
    int k512;         /* grid4 / grid8: the AVX-512 kernel's shape, K5_NONE = AVX2 / scalar */
    const int32_t *xz; /* grid8 AVX-512: [M][nzu][16] accumulator starting values, -128 sum xq per lane */
    int64_t nzu;
} ljob_t;

static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
static inline int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }
static inline int64_t roundup(int64_t a, int64_t m) { return (a + m - 1) / m * m; }

/* ------------------------------------------------------------------ per-call preparation */

/* Group byte ranges and slot offsets. Sign: byte b = columns [8b, 8b+8); ternary: [5b, 5b+5). */
static int64_t plan_groups(const ljob_t *J, gmeta_t *gm) {
    const int64_t cpb = J->fmt == LFMT_SIGN ? 8 : 5, cb = J->fmt == LFMT_SIGN ? SIGN_CB : TERN_CB;
    const int64_t per_chunk = J->fmt == LFMT_SIGN ? 32 : TERN_CB * TERN_PLANES; /* slot elements per chunk */
    int64_t off = 0;
    for (int64_t g = 0; g < J->ng; g++) {
        int64_t b0 = g * J->G / cpb, b1 = ((g + 1) * J->G + cpb - 1) / cpb;
        gm[g].b0 = b0;
        gm[g].nch = (b1 - b0 + cb - 1) / cb;
        gm[g].nsafe = max64(0, min64(gm[g].nch, (J->rb - b0) / cb));
        gm[g].off = off;
        off += gm[g].nch * per_chunk;
    }
    return off;
}

/* Quantize one group of activations to int8 (see the header comment); returns
 * sum_j xq_j, sets *amax and *bad (any inf / NaN). Portable version. */
static int32_t quant_group_scalar(const float *xg, int64_t G, int8_t *q, float *amax_out, int *bad_out) {
    float amax = 0.0f;
    int bad = 0;
    for (int64_t j = 0; j < G; j++) {
        const float a = fabsf(xg[j]);
        bad |= !(a <= 3.4e38f); /* inf or NaN */
        amax = a > amax ? a : amax;
    }
    *amax_out = amax, *bad_out = bad;
    if (!(amax > 0.0f) || bad) {
        for (int64_t j = 0; j < G; j++) q[j] = 0;
        return 0;
    }
    const float inv = 127.0f / amax;
    int32_t X = 0;
    for (int64_t j = 0; j < G; j++) {
        /* |x * inv| <= 127 (+ rounding): adding 1.5 * 2^23 rounds to an integer, half to
         * even, exactly like nearbyintf in the default mode (and cvtps2dq) without a call */
        float v = (xg[j] * inv + 12582912.0f) - 12582912.0f;
        v = v > 127.0f ? 127.0f : v < -127.0f ? -127.0f : v;
        q[j] = (int8_t)v;
        X += q[j];
    }
    return X;
}

#if LUT_X86
__attribute__((target("avx2,fma,f16c"))) static int32_t quant_group_avx2(const float *xg, int64_t G, int8_t *q,
                                                                         float *amax_out, int *bad_out) {
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff)), big = _mm256_set1_ps(3.4e38f);
    __m256 mx = _mm256_setzero_ps(), badv = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 8 <= G; j += 8) {
        const __m256 a = _mm256_and_ps(_mm256_loadu_ps(xg + j), absmask);
        badv = _mm256_or_ps(badv, _mm256_cmp_ps(a, big, _CMP_NLE_UQ)); /* a > big or NaN */
        mx = _mm256_max_ps(mx, a);                                     /* max is exact: any order */
    }
    float m8[8];
    _mm256_storeu_ps(m8, mx);
    float amax = 0.0f;
    int bad = _mm256_movemask_ps(badv) != 0;
    for (int l = 0; l < 8; l++) amax = m8[l] > amax ? m8[l] : amax;
    for (; j < G; j++) {
        const float a = fabsf(xg[j]);
        bad |= !(a <= 3.4e38f);
        amax = a > amax ? a : amax;
    }
    *amax_out = amax, *bad_out = bad;
    if (!(amax > 0.0f) || bad) {
        for (int64_t j = 0; j < G; j++) q[j] = 0;
        return 0;
    }
    const float inv = 127.0f / amax;
    const __m256 vinv = _mm256_set1_ps(inv);
    const __m256i lo = _mm256_set1_epi32(-127), hi = _mm256_set1_epi32(127);
    __m256i Xv = _mm256_setzero_si256();
    for (j = 0; j + 8 <= G; j += 8) {
        /* cvtps2dq rounds half to even (default MXCSR), same as the scalar formula */
        __m256i r = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xg + j), vinv));
        r = _mm256_min_epi32(_mm256_max_epi32(r, lo), hi);
        Xv = _mm256_add_epi32(Xv, r);
        __m128i p = _mm_packs_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
        _mm_storel_epi64((__m128i *)(q + j), _mm_packs_epi16(p, p));
    }
    int32_t x8[8], X = 0;
    _mm256_storeu_si256((__m256i *)x8, Xv);
    for (int l = 0; l < 8; l++) X += x8[l];
    for (; j < G; j++) {
        float v = (xg[j] * inv + 12582912.0f) - 12582912.0f;
        v = v > 127.0f ? 127.0f : v < -127.0f ? -127.0f : v;
        q[j] = (int8_t)v;
        X += q[j];
    }
    return X;
}
#endif

/* Ternary slots of one group: plane k of the slot of byte b holds x_k - 3 x_{k-1} for
 * the columns 5b + k inside the group (0 for columns of other groups). */
static void ternary_slots(const int8_t *xq, int64_t lo, int64_t hi, const gmeta_t *m, int16_t *s) {
    memset(s, 0, sizeof(int16_t) * (size_t)(m->nch * TERN_CB * TERN_PLANES));
    const int64_t b1 = (hi + 4) / 5;
    for (int64_t b = m->b0; b < b1; b++) {
        const uint64_t slot = (uint64_t)(b - m->b0);
        int16_t *d = s + (slot / TERN_CB) * TERN_CB * TERN_PLANES + slot % TERN_CB;
        int prev = 0;
        for (int k = 0; k < TERN_PLANES; k++) {
            const int64_t col = 5 * b + k;
            const int xk = (col >= lo && col < hi) ? xq[col] : 0;
            d[k * TERN_CB] = (int16_t)(xk - 3 * prev);
            prev = xk;
        }
    }
}

/* Sign bit-plane layout, used when every int32 lane (32 columns) of a 256-column chunk
 * lies in one group: G in {32, 64, 128} or a multiple of 256. A chunk is 32 weight bytes;
 * plane k holds the activations of bit k of each byte (column 8i + k for byte i), so
 * one 16-bit shift + and extracts 32 weights of one plane and maddubs multiplies them
 * with that plane's activations: no per-byte shuffles, one weight load per 256 columns. */
static int sign_planes_ok(int64_t G) { return G == 32 || G == 64 || G == 128 || G % 256 == 0; }

/* Chunk c of the planes layout: 8 planes x 32 int8 (plane k, byte i = column 256c + 8i + k)
 * then 16 int16 = minus the sum of the activations of each 16 columns: the accumulator
 * starts there, so the kernel directly sums sum_j (2 b_j - 1) xq_j (no correction pass). */
#define PLANE_CHUNK 288

#if LUT_X86
/* ch[k * 32 + i] = src[8 i + k] for i < 32, k < 8 (bytes): the plane transpose, in
 * registers. Vector r holds rows i = 4r..4r+3; two in-lane byte shuffles and a qword
 * permute turn it into 8 dwords "rows 4r..4r+3 of column k", then an 8x8 dword
 * transpose gathers column k of all rows. Pure data movement: same bytes as the loop. */
__attribute__((target("avx2"))) static void transpose_32x8_avx2(const int8_t *src, int8_t *ch) {
    const __m256i pair = _mm256_setr_epi8(0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15, /* words (a_k, b_k) */
                                          0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15);
    const __m256i quad = _mm256_setr_epi8(0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15, /* dwords (W_k, U_k) */
                                          0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15);
    __m256i R[8], t[8], u[8];
    for (int r = 0; r < 8; r++) {
        __m256i v = _mm256_shuffle_epi8(_mm256_loadu_si256((const __m256i *)(src + 32 * r)), pair);
        v = _mm256_permute4x64_epi64(v, 0xD8); /* qwords 0,2,1,3: lane 0 = k 0..3, lane 1 = k 4..7 */
        R[r] = _mm256_shuffle_epi8(v, quad);   /* dword k = rows 4r..4r+3 of column k */
    }
    for (int r = 0; r < 8; r += 2) {
        t[r] = _mm256_unpacklo_epi32(R[r], R[r + 1]);
        t[r + 1] = _mm256_unpackhi_epi32(R[r], R[r + 1]);
    }
    for (int r = 0; r < 8; r += 4) {
        u[r] = _mm256_unpacklo_epi64(t[r], t[r + 2]);
        u[r + 1] = _mm256_unpackhi_epi64(t[r], t[r + 2]);
        u[r + 2] = _mm256_unpacklo_epi64(t[r + 1], t[r + 3]);
        u[r + 3] = _mm256_unpackhi_epi64(t[r + 1], t[r + 3]);
    }
    for (int k = 0; k < 4; k++) { /* u[k]: column k (lane 0) and k + 4 (lane 1) of rows 0..15 */
        _mm256_storeu_si256((__m256i *)(ch + 32 * k), _mm256_permute2x128_si256(u[k], u[k + 4], 0x20));
        _mm256_storeu_si256((__m256i *)(ch + 32 * (k + 4)), _mm256_permute2x128_si256(u[k], u[k + 4], 0x31));
    }
}
#endif

static void sign_planes_row(const ljob_t *J, const int8_t *xq, const float *gs, int8_t *planes, float *gsv) {
    const int64_t in = J->in, G = J->G; /* locals: the int8 stores below may alias *J */
    for (int64_t c = 0; c < J->nchunk; c++) {
        const int n = (int)min64(256, in - 256 * c); /* valid columns of this chunk */
        int8_t pad[256];
        const int8_t *xc = xq + 256 * c;
        if (n < 256) { /* last chunk: zero padded, so the loops below have fixed bounds */
            memset(pad, 0, sizeof pad);
            memcpy(pad, xc, (size_t)n);
            xc = pad;
        }
        int8_t *ch = planes + c * PLANE_CHUNK;
        int16_t xneg[16];
#if LUT_X86
        if (J->isa >= SALOMI_ISA_AVX2) transpose_32x8_avx2(xc, ch);
        else
#endif
            for (int k = 0; k < 8; k++)
                for (int i = 0; i < 32; i++) ch[k * 32 + i] = xc[8 * i + k];
        for (int j = 0; j < 16; j++) {
            int sum = 0;
            for (int t = 16 * j; t < 16 * j + 16; t++) sum += xc[t];
            xneg[j] = (int16_t)-sum;
        }
        memcpy(ch + 256, xneg, sizeof xneg);
        for (int l = 0; l < 8; l++) {
            const int64_t col = c * 256 + 32 * l;
            gsv[c * 8 + l] = col < in ? 0.5f * gs[col / G] : 0.0f; /* gs = 2 sx: exact halving */
        }
    }
}

/* grid2 planes layout: a 128-column chunk is 32 code bytes (4 codes each); plane k
 * (k = 0..3) holds the activations of code k of each byte (column 128c + 4i + k).
 * int32 lane l covers columns [128c + 16l, +16); xsv = sx * sum of its activations
 * (for the zero point term s z sx X). Needs G in {16, 32, 64, 128} or G % 128 == 0. */
#define GRID_CHUNK 128

static int grid2_planes_ok(int64_t G) { return G % 16 == 0 && (128 % G == 0 || G % 128 == 0); }

static void grid2_planes_row(const ljob_t *J, const int8_t *xq, const float *gs, int8_t *planes, float *gsv,
                             float *xsv) {
    const int64_t in = J->in, G = J->G; /* locals: the int8 stores below may alias *J */
    for (int64_t c = 0; c < J->nchunk; c++) {
        const int n = (int)min64(128, in - 128 * c);
        int8_t pad[128];
        const int8_t *xc = xq + 128 * c;
        if (n < 128) { /* last chunk: zero padded, so the loops below have fixed bounds */
            memset(pad, 0, sizeof pad);
            memcpy(pad, xc, (size_t)n);
            xc = pad;
        }
        int8_t *ch = planes + c * GRID_CHUNK;
        for (int k = 0; k < 4; k++)
            for (int i = 0; i < 32; i++) ch[k * 32 + i] = xc[4 * i + k];
        for (int l = 0; l < 8; l++) { /* G % 16 == 0: a lane inside the row is inside one group */
            const int64_t col = c * 128 + 16 * l;
            int32_t X = 0;
            for (int t = 16 * l; t < 16 * l + 16; t++) X += xc[t];
            gsv[c * 8 + l] = col < in ? gs[col / G] : 0.0f;
            xsv[c * 8 + l] = col < in ? gs[col / G] * (float)X : 0.0f;
        }
    }
}

/* Quantize one activation row group by group and write its slots, the per-group
 * multipliers gs and corrections xc. Every ISA produces the same integers. */
static void quantize_row(const ljob_t *J, const gmeta_t *gm, const float *x, void *slots, float *gs, float *xc,
                         float *gsv, float *xsv, int8_t *xq) {
    const int64_t G = J->G;
    for (int64_t g = 0; g < J->ng; g++) {
        float amax;
        int bad;
        int32_t X;
#if LUT_X86
        if (J->isa >= SALOMI_ISA_AVX2) X = quant_group_avx2(x + g * G, G, xq + g * G, &amax, &bad);
        else
#endif
            X = quant_group_scalar(x + g * G, G, xq + g * G, &amax, &bad);
        const float sx = bad ? NAN : amax / 127.0f;
        gs[g] = J->fmt == LFMT_SIGN ? 2.0f * sx : sx;
        xc[g] = sx * (float)X;
    }
    for (int64_t g = J->ng; g < J->ngp; g++) gs[g] = 0.0f, xc[g] = 0.0f;
    if (J->fmt == LFMT_GRID8) {
        memcpy(slots, xq, (size_t)J->in);
        return;
    }
    if (J->fmt == LFMT_GRID4) { /* in % 64 == 0: per 64-column chunk, even columns then odd ones */
        int8_t *sl = slots;
        for (int64_t c = 0; c < J->in; c += 64)
            for (int i = 0; i < 32; i++) sl[c + i] = xq[c + 2 * i], sl[c + 32 + i] = xq[c + 2 * i + 1];
        return;
    }
    if (J->fmt == LFMT_GRID2) {
        grid2_planes_row(J, xq, gs, slots, gsv, xsv);
        return;
    }
    if (J->planes) {
        sign_planes_row(J, xq, gs, slots, gsv);
        return;
    }

    for (int64_t g = 0; g < J->ng; g++) {
        const int64_t lo = g * G; /* the group's columns are [lo, lo + G) */
        if (J->fmt == LFMT_SIGN) {
            int8_t *s = (int8_t *)slots + gm[g].off;
            const int64_t c0 = 8 * gm[g].b0, n = gm[g].nch * 32; /* slot i = column c0 + i */
            memset(s, 0, (size_t)n);
            memcpy(s + (lo - c0), xq + lo, (size_t)G);
        } else {
            ternary_slots(xq, lo, lo + G, &gm[g], (int16_t *)slots + gm[g].off);
        }
    }
}

/* ------------------------------------------------------------------ float epilogue (shared) */

/* y = hsum(yv) - sum_g s_g xc_g with the lane order of the AVX2 path (hsum8 of kernels.c
 * and an 8-lane fma over groups). Scalar fmaf = the hardware FMA: both correctly rounded. */
static float hsum8_ref(const float v[8]) {
    return ((v[0] + v[4]) + (v[2] + v[6])) + ((v[1] + v[5]) + (v[3] + v[7]));
}

static float correction_ref(const uint16_t *sc, const float *xc, int64_t ng) {
    float cv[8] = {0};
    for (int64_t g = 0; g < ng; g++) cv[g % 8] = fmaf(salomi_h2f(sc[g]), xc[g], cv[g % 8]);
    return hsum8_ref(cv);
}

/* ------------------------------------------------------------------ portable path */

static inline uint8_t wbyte(const uint8_t *row, int64_t rb, int64_t b) { return b < rb ? row[b] : 0; }

static void sign_row_scalar(const ljob_t *J, const int8_t *xs, const float *gs, const float *xc, int64_t o,
                            float *y) {
    const uint8_t *row = J->data + o * J->rb;
    const uint16_t *sc = J->scale + o * J->ng;
    float yv[8] = {0};
    for (int64_t g = 0; g < J->ng; g++) {
        const gmeta_t *m = &J->gm[g];
        const int8_t *x = xs + m->off;
        int32_t a[8] = {0};
        for (int64_t c = 0; c < m->nch; c++)
            for (int i = 0; i < 32; i++) {
                const int b = (wbyte(row, J->rb, m->b0 + c * SIGN_CB + i / 8) >> (i % 8)) & 1;
                a[i / 4] += b * x[c * 32 + i];
            }
        const float s2 = salomi_h2f(sc[g]) * gs[g];
        for (int l = 0; l < 8; l++) yv[l] = fmaf(s2, (float)a[l], yv[l]);
    }
    y[o] = hsum8_ref(yv) - correction_ref(sc, xc, J->ng);
}

/* Planes layout, portable: int32 lane l of chunk c = columns [256c + 32l, +32), summing
 * (2b - 1) xq (the kernel's 2 * sum b xq - sum xq, exact in integers). */
static void sign_planes_row_scalar(const ljob_t *J, const int8_t *xs, const float *gsv, int64_t o, float *y) {
    const uint8_t *row = J->data + o * J->rb;
    const uint16_t *sc = J->scale + o * J->ng;
    float yv[8] = {0};
    for (int64_t c = 0; c < J->nchunk; c++) {
        const int8_t *ch = xs + c * PLANE_CHUNK;
        for (int l = 0; l < 8; l++) {
            int32_t a = 0;
            for (int i = 4 * l; i < 4 * l + 4; i++) { /* bytes of the lane */
                const int b = wbyte(row, J->rb, 32 * c + i);
                for (int k = 0; k < 8; k++) a += (2 * ((b >> k) & 1) - 1) * ch[k * 32 + i];
            }
            const int64_t col = c * 256 + 32 * l;
            const float sw = col < J->in ? salomi_h2f(sc[col / J->G]) : 0.0f;
            yv[l] = fmaf(sw * gsv[c * 8 + l], (float)a, yv[l]);
        }
    }
    y[o] = hsum8_ref(yv);
}

/* grid2, portable: int32 lane l of chunk c = columns [128c + 16l, +16). The float sums run
 * on 16 lanes, even chunks on 0-7 and odd ones on 8-15 (the AVX-512 kernel's two chunks per
 * zmm), added lane by lane at the end: every ISA follows this order. */
static void grid2_row_scalar(const ljob_t *J, const int8_t *xs, const float *gsv, const float *xsv, int64_t o,
                             float *y) {
    const uint8_t *row = J->data + o * J->rb;
    const uint16_t *sc = J->scale + o * J->ng, *zr = J->zero + o * J->ng;
    float yv[16] = {0};
    for (int64_t c = 0; c < J->nchunk; c++) {
        const int8_t *ch = xs + c * GRID_CHUNK;
        for (int l = 0; l < 8; l++) {
            int32_t a = 0;
            for (int i = 4 * l; i < 4 * l + 4; i++) {
                const int b = wbyte(row, J->rb, 32 * c + i);
                for (int k = 0; k < 4; k++) a += ((b >> (2 * k)) & 3) * ch[k * 32 + i];
            }
            const int64_t col = c * 128 + 16 * l;
            const float sw = col < J->in ? salomi_h2f(sc[col / J->G]) : 0.0f;
            const float z = col < J->in ? salomi_h2f(zr[col / J->G]) : 0.0f;
            float *v = yv + (c & 1) * 8 + l;
            *v = fmaf(sw * gsv[c * 8 + l], (float)a, *v);
            *v = fmaf(-(sw * z), xsv[c * 8 + l], *v);
        }
    }
    float t[8];
    for (int l = 0; l < 8; l++) t[l] = yv[l] + yv[8 + l];
    y[o] = hsum8_ref(t);
}

/* grid8 / grid4 correction sum_g s_g (z_g - zoff) xc_g (zoff 128 / 0), lanes as correction_ref;
 * shared by both paths. */
static float correction8(const uint16_t *sc, const uint16_t *zr, const float *xc, int64_t ng, float zoff) {
    float cv[8] = {0};
    for (int64_t g = 0; g < ng; g++)
        cv[g % 8] = fmaf(salomi_h2f(sc[g]) * (salomi_h2f(zr[g]) - zoff), xc[g], cv[g % 8]);
    return hsum8_ref(cv);
}

/* grid4, portable: int32 lane l of a 64-column chunk = its columns [8l, 8l+8); slot i of a
 * chunk is column 2i (i < 32) or 2(i - 32) + 1. */
static void grid4_row_scalar(const ljob_t *J, const int8_t *xs, const float *gs, const float *xc, int64_t o,
                             float *y) {
    const uint8_t *row = J->data + o * J->rb;
    const uint16_t *sc = J->scale + o * J->ng, *zr = J->zero + o * J->ng;
    const int64_t G = J->G, nch = J->in / 64;
    float yv[8] = {0};
    int32_t a[8] = {0};
    for (int64_t c = 0; c < nch; c++) {
        const int8_t *xe = xs + 64 * c, *xo = xe + 32;
        for (int i = 0; i < 32; i++) {
            const int b = row[32 * c + i];
            a[i / 4] += (b & 15) * xe[i] + (b >> 4) * xo[i];
        }
        if (G % 64) { /* lanes 0-3 and 4-7 lie in the groups of columns 64c and 64c + 32 */
            const int64_t g0 = 64 * c / G, g1 = (64 * c + 32) / G;
            const float s0 = salomi_h2f(sc[g0]) * gs[g0], s1 = salomi_h2f(sc[g1]) * gs[g1];
            for (int l = 0; l < 8; l++) yv[l] = fmaf(l < 4 ? s0 : s1, (float)a[l], yv[l]), a[l] = 0;
        } else if ((64 * (c + 1)) % G == 0) {
            const int64_t g = 64 * c / G;
            const float s = salomi_h2f(sc[g]) * gs[g];
            for (int l = 0; l < 8; l++) yv[l] = fmaf(s, (float)a[l], yv[l]), a[l] = 0;
        }
    }
    y[o] = hsum8_ref(yv) - correction8(sc, zr, xc, J->ng, 0.0f);
}

/* grid8, portable: int32 lane l of a 32-column chunk = its columns [4l, 4l+4). */
static void grid8_row_scalar(const ljob_t *J, const int8_t *xs, const float *gs, const float *xc, int64_t o,
                             float *y) {
    const uint8_t *row = J->data + o * J->rb;
    const uint16_t *sc = J->scale + o * J->ng, *zr = J->zero + o * J->ng;
    float yv[8] = {0};
    for (int64_t g = 0; g < J->ng; g++) {
        int32_t a[8] = {0};
        for (int64_t j = g * J->G; j < (g + 1) * J->G; j++) a[(j % 32) / 4] += ((int)row[j] - 128) * xs[j];
        const float s = salomi_h2f(sc[g]) * gs[g];
        for (int l = 0; l < 8; l++) yv[l] = fmaf(s, (float)a[l], yv[l]);
    }
    y[o] = hsum8_ref(yv) - correction8(sc, zr, xc, J->ng, 128.0f);
}

static void ternary_row_scalar(const ljob_t *J, const int16_t *xs, const float *gs, const float *xc, int64_t o,
                               float *y) {
    static const int pow3[TERN_PLANES] = {1, 3, 9, 27, 81};
    const uint8_t *row = J->data + o * J->rb;
    const uint16_t *sc = J->scale + o * J->ng;
    float yv[8] = {0};
    for (int64_t g = 0; g < J->ng; g++) {
        const gmeta_t *m = &J->gm[g];
        int32_t a[8] = {0};
        for (int64_t c = 0; c < m->nch; c++) {
            const int16_t *x = xs + m->off + c * TERN_CB * TERN_PLANES;
            for (int i = 0; i < TERN_CB; i++) {
                const int b = wbyte(row, J->rb, m->b0 + c * TERN_CB + i);
                for (int k = 0; k < TERN_PLANES; k++) a[i / 2] += (b / pow3[k]) * x[k * TERN_CB + i];
            }
        }
        const float s2 = salomi_h2f(sc[g]) * gs[g];
        for (int l = 0; l < 8; l++) yv[l] = fmaf(s2, (float)a[l], yv[l]);
    }
    y[o] = hsum8_ref(yv) - correction_ref(sc, xc, J->ng);
}

/* ------------------------------------------------------------------ AVX2 */
#if LUT_X86

#define A2 __attribute__((target("avx2,fma,f16c")))
#define A2I static inline __attribute__((target("avx2,fma,f16c"), always_inline))

A2I float hsum8_avx2(__m256 v) { /* same association as hsum8_ref */
    __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    a = _mm_add_ps(a, _mm_movehl_ps(a, a));
    a = _mm_add_ss(a, _mm_movehdup_ps(a));
    return _mm_cvtss_f32(a);
}

/* The correction with 8 groups per step (F16C converts 8 scales at once); the ragged
 * tail's scales are converted one by one, so no load ever passes the end of the scale
 * row. fma(0, 0, c) == c for the padding lanes (c is never -0), as in correction_ref. */
A2I float correction_avx2(const uint16_t *sc, const float *xc, int64_t ng) {
    __m256 cv = _mm256_setzero_ps();
    int64_t g = 0;
    for (; g + 8 <= ng; g += 8)
        cv = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(sc + g))), _mm256_loadu_ps(xc + g), cv);
    if (g < ng) { /* tail scales built in registers; lanes past ng: 0 * 0 (xc is zero padded to 8) */
        float f[8];
        for (int l = 0; l < 8; l++) f[l] = g + l < ng ? _cvtsh_ss(sc[g + l]) : 0.0f;
        const __m256 sv = _mm256_setr_ps(f[0], f[1], f[2], f[3], f[4], f[5], f[6], f[7]);
        cv = _mm256_fmadd_ps(sv, _mm256_loadu_ps(xc + g), cv);
    }
    return hsum8_avx2(cv);
}

/* out[i] = scale[g + i] * gs[g + i] for the 8 groups from g (zero past ng): one F16C
 * conversion per 8 groups instead of a scalar conversion per group. Same float product
 * as the scalar path (h2f is exact, one rounded multiply). */
A2I void scales8(const uint16_t *sc, int64_t g, int64_t ng, const float *gs, float out[8]) {
    if (g + 8 <= ng) {
        _mm256_storeu_ps(out, _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(sc + g))),
                                            _mm256_loadu_ps(gs + g)));
        return;
    }
    for (int i = 0; i < 8; i++) out[i] = g + i < ng ? _cvtsh_ss(sc[g + i]) * gs[g + i] : 0.0f;
}

/* 32 sign bits (4 bytes) -> 32 bytes of 0/1: byte i of the result = bit i. */
A2I __m256i sign_expand(uint32_t w) {
    const __m256i shuf = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, /* lane 0: bytes 0,1 */
                                          2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3); /* lane 1: bytes 2,3 */
    const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ull);
    __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32((int)w), shuf);
    return _mm256_min_epu8(_mm256_and_si256(v, bit), _mm256_set1_epi8(1));
}

/* R (1..4) consecutive output rows of one activation row. The activation chunk is
 * loaded once for the R rows; maddubs(0/1 bytes, int8 x) gives exact int16 pair sums
 * that are widened to int32 (madd with ones) every SIGN_FLUSH chunks and per group. */
A2I void sign_rows_avx2(const ljob_t *J, const int8_t *xs, const float *gs, const float *xc, int64_t o, const int R,
                        float *y) {
    const int64_t rb = J->rb, ng = J->ng;
    const __m256i one16 = _mm256_set1_epi16(1);
    const uint8_t *row[4];
    __m256 yv[4];
    for (int r = 0; r < R; r++) row[r] = J->data + (o + r) * rb, yv[r] = _mm256_setzero_ps();
    float s2[4][8] __attribute__((aligned(32)));
    for (int64_t g = 0; g < ng; g++) {
        if (g % 8 == 0)
            for (int r = 0; r < R; r++) scales8(J->scale + (o + r) * ng, g, ng, gs, s2[r]);
        const gmeta_t m = J->gm[g];
        const int8_t *x = xs + m.off;
        __m256i a16[4], a32[4];
        for (int r = 0; r < R; r++) a16[r] = a32[r] = _mm256_setzero_si256();
        /* whole chunks, widened to int32 every SIGN_FLUSH chunks (groups of up to
         * 64 * 32 columns never need the int32 accumulator inside the loop) */
        for (int64_t c0 = 0; c0 < m.nsafe; c0 += SIGN_FLUSH) {
            if (c0 > 0)
                for (int r = 0; r < R; r++)
                    a32[r] = _mm256_add_epi32(a32[r], _mm256_madd_epi16(a16[r], one16)), a16[r] = _mm256_setzero_si256();
            const int64_t c1 = min64(c0 + SIGN_FLUSH, m.nsafe);
            for (int64_t c = c0; c < c1; c++) {
                const __m256i xv = _mm256_loadu_si256((const __m256i *)(x + 32 * c));
                for (int r = 0; r < R; r++) {
                    uint32_t w;
                    memcpy(&w, row[r] + m.b0 + SIGN_CB * c, 4);
                    a16[r] = _mm256_add_epi16(a16[r], _mm256_maddubs_epi16(sign_expand(w), xv));
                }
            }
        }
        for (int64_t c = m.nsafe; c < m.nch; c++) { /* at most one chunk: the last bytes of the row */
            if (c > 0 && c % SIGN_FLUSH == 0)
                for (int r = 0; r < R; r++)
                    a32[r] = _mm256_add_epi32(a32[r], _mm256_madd_epi16(a16[r], one16)), a16[r] = _mm256_setzero_si256();
            const __m256i xv = _mm256_loadu_si256((const __m256i *)(x + 32 * c));
            for (int r = 0; r < R; r++) {
                uint32_t w = 0;
                memcpy(&w, row[r] + m.b0 + SIGN_CB * c, (size_t)(rb - (m.b0 + SIGN_CB * c)));
                a16[r] = _mm256_add_epi16(a16[r], _mm256_maddubs_epi16(sign_expand(w), xv));
            }
        }
        for (int r = 0; r < R; r++) {
            const __m256i t = _mm256_add_epi32(a32[r], _mm256_madd_epi16(a16[r], one16));
            yv[r] = _mm256_fmadd_ps(_mm256_broadcast_ss(&s2[r][g % 8]), _mm256_cvtepi32_ps(t), yv[r]);
        }
    }
    for (int r = 0; r < R; r++)
        y[o + r] = hsum8_avx2(yv[r]) - correction_avx2(J->scale + (o + r) * ng, xc, ng);
}

/* 16 ternary bytes -> int32 lanes += sum_k floor(b / 3^k) * x'_k (pairs of bytes per lane). */
A2I __m256i tern_chunk(__m256i acc, __m128i bytes, const __m256i x[TERN_PLANES]) {
    const __m256i b = _mm256_cvtepu8_epi16(bytes);
    const __m256i f1 = _mm256_mulhi_epu16(b, _mm256_set1_epi16(21846)); /* ceil(2^16/3)  */
    const __m256i f2 = _mm256_mulhi_epu16(b, _mm256_set1_epi16(7282));  /* ceil(2^16/9)  */
    const __m256i f3 = _mm256_mulhi_epu16(b, _mm256_set1_epi16(2428));  /* ceil(2^16/27) */
    const __m256i f4 = _mm256_mulhi_epu16(b, _mm256_set1_epi16(810));   /* ceil(2^16/81) */
    __m256i s = _mm256_add_epi32(_mm256_madd_epi16(b, x[0]), _mm256_madd_epi16(f1, x[1]));
    s = _mm256_add_epi32(s, _mm256_add_epi32(_mm256_madd_epi16(f2, x[2]), _mm256_madd_epi16(f3, x[3])));
    return _mm256_add_epi32(acc, _mm256_add_epi32(s, _mm256_madd_epi16(f4, x[4])));
}

A2I void ternary_rows_avx2(const ljob_t *J, const int16_t *xs, const float *gs, const float *xc, int64_t o,
                           const int R, float *y) {
    const int64_t rb = J->rb, ng = J->ng;
    const uint8_t *row[4];
    __m256 yv[4];
    for (int r = 0; r < R; r++) row[r] = J->data + (o + r) * rb, yv[r] = _mm256_setzero_ps();
    float s2[4][8] __attribute__((aligned(32)));
    for (int64_t g = 0; g < ng; g++) {
        if (g % 8 == 0)
            for (int r = 0; r < R; r++) scales8(J->scale + (o + r) * ng, g, ng, gs, s2[r]);
        const gmeta_t m = J->gm[g];
        __m256i a32[4];
        for (int r = 0; r < R; r++) a32[r] = _mm256_setzero_si256();
        for (int64_t c = 0; c < m.nch; c++) {
            const int16_t *xp = xs + m.off + c * TERN_CB * TERN_PLANES;
            __m256i xv[TERN_PLANES];
            for (int k = 0; k < TERN_PLANES; k++) xv[k] = _mm256_loadu_si256((const __m256i *)(xp + k * TERN_CB));
            if (c < m.nsafe) {
                for (int r = 0; r < R; r++)
                    a32[r] = tern_chunk(a32[r], _mm_loadu_si128((const __m128i *)(row[r] + m.b0 + TERN_CB * c)), xv);
            } else {
                for (int r = 0; r < R; r++) { /* last bytes of the row, from a zero-padded copy */
                    uint8_t t[TERN_CB] = {0};
                    memcpy(t, row[r] + m.b0 + TERN_CB * c, (size_t)(rb - (m.b0 + TERN_CB * c)));
                    a32[r] = tern_chunk(a32[r], _mm_loadu_si128((const __m128i *)t), xv);
                }
            }
        }
        for (int r = 0; r < R; r++) {
            yv[r] = _mm256_fmadd_ps(_mm256_broadcast_ss(&s2[r][g % 8]), _mm256_cvtepi32_ps(a32[r]), yv[r]);
        }
    }
    for (int r = 0; r < R; r++)
        y[o + r] = hsum8_avx2(yv[r]) - correction_avx2(J->scale + (o + r) * ng, xc, ng);
}

/* Scales of the groups of the 8 int32 lanes of a chunk whose first group is g0 (lane l:
 * group g0 + lane_g[l]), 0 past the row; loads only the groups that exist. */
A2I __m256 chunk_scales(const uint16_t *sc, const ljob_t *J, int64_t g0) {
    const __m256i idx = _mm256_loadu_si256((const __m256i *)J->lane_g);
    __m128i h;
    if (g0 + J->nhalf <= J->ng) { /* load exactly the groups that exist */
        uint32_t u;
        switch (J->nhalf) {
        case 8: h = _mm_loadu_si128((const __m128i *)(sc + g0)); break;
        case 4: h = _mm_loadl_epi64((const __m128i *)(sc + g0)); break;
        case 2: memcpy(&u, sc + g0, 4), h = _mm_cvtsi32_si128((int)u); break;
        default: h = _mm_cvtsi32_si128(sc[g0]); break;
        }
    } else { /* the row's last groups: built in registers (a copy through memory would stall
              * store-to-load forwarding on every row) */
        float f[8];
        for (int l = 0; l < 8; l++) {
            const int64_t g = g0 + J->lane_g[l];
            f[l] = g < J->ng ? _cvtsh_ss(sc[g]) : 0.0f;
        }
        return _mm256_setr_ps(f[0], f[1], f[2], f[3], f[4], f[5], f[6], f[7]);
    }
    return _mm256_permutevar8x32_ps(_mm256_cvtph_ps(h), idx);
}

/* Advance g0 (first group of a chunk) by one chunk without a division. */
static inline void next_chunk_group(const ljob_t *J, int64_t cpg, int64_t *g0, int64_t *cin) {
    if (J->G < J->ccols) *g0 += J->nhalf;
    else if (++*cin == cpg) *cin = 0, ++*g0;
}

A2I void sign_planes_rows_avx2(const ljob_t *J, const int8_t *xs, const float *gsv, int64_t o, const int R,
                               float *y) {
    const int64_t rb = J->rb, ng = J->ng;
    const __m256i two8 = _mm256_set1_epi8(2), one16 = _mm256_set1_epi16(1);
    const uint8_t *row[4];
    __m256 yv[4];
    for (int r = 0; r < R; r++) row[r] = J->data + (o + r) * rb, yv[r] = _mm256_setzero_ps();
    const int64_t cpg = J->G >= 256 ? J->G / 256 : 1; /* chunks per group when groups span chunks */
    int64_t g0 = 0, cin = 0;                              /* first group of chunk c, chunk index inside it */
    for (int64_t c = 0; c < J->nchunk; c++) {
        if (c > 0) next_chunk_group(J, cpg, &g0, &cin);
        const int8_t *xp = xs + PLANE_CHUNK * c;
        const __m256i xneg = _mm256_load_si256((const __m256i *)(xp + 256));
        const __m256 gv = _mm256_load_ps(gsv + 8 * c);
        for (int r = 0; r < R; r++) {
            __m256i v;
            /* bytes past the row belong to the next rows: they meet zero activations, so
             * they only need to be inside the weight buffer; near its end, read a copy */
            if ((o + r) * rb + 32 * c + 32 <= J->out * rb) v = _mm256_loadu_si256((const __m256i *)(row[r] + 32 * c));
            else {
                uint8_t t[32] = {0};
                memcpy(t, row[r] + 32 * c, (size_t)(rb - 32 * c));
                v = _mm256_loadu_si256((const __m256i *)t);
            }
            /* plane k = bit k of every byte, as 0 / 2 (a 16-bit shift moves bit k of both
             * bytes to bit 1 / 9); maddubs(2b, x) summed from -sum x gives sum (2b - 1) x.
             * Row by row, planes reloaded from L1: everything stays in registers. */
            __m256i acc = _mm256_add_epi16(
                xneg, _mm256_maddubs_epi16(_mm256_and_si256(_mm256_slli_epi16(v, 1), two8),
                                           _mm256_load_si256((const __m256i *)xp)));
            acc = _mm256_add_epi16(acc, _mm256_maddubs_epi16(_mm256_and_si256(v, two8),
                                                             _mm256_load_si256((const __m256i *)(xp + 32))));
#pragma GCC unroll 8
            for (int k = 2; k < 8; k++) {
                const __m256i b = _mm256_and_si256(_mm256_srli_epi16(v, k - 1), two8);
                acc = _mm256_add_epi16(acc, _mm256_maddubs_epi16(b, _mm256_load_si256((const __m256i *)(xp + 32 * k))));
            }
            const __m256 s2 = _mm256_mul_ps(chunk_scales(J->scale + (o + r) * ng, J, g0), gv);
            yv[r] = _mm256_fmadd_ps(s2, _mm256_cvtepi32_ps(_mm256_madd_epi16(acc, one16)), yv[r]);
        }
    }
    for (int r = 0; r < R; r++) y[o + r] = hsum8_avx2(yv[r]);
}

/* grid2: per plane k one 16-bit shift + and gives code k of every byte (0..3), maddubs
 * multiplies it with plane k's activations; the zero point enters per lane as
 * - s z (sx X) with one more FMA per chunk. */
A2I void grid2_rows_avx2(const ljob_t *J, const int8_t *xs, const float *gsv, const float *xsv, int64_t o,
                         const int R, float *y) {
    const int64_t rb = J->rb, ng = J->ng;
    const __m256i three8 = _mm256_set1_epi8(3), one16 = _mm256_set1_epi16(1);
    const uint8_t *row[4];
    __m256 yv[4][2]; /* even / odd chunks (grid2_row_scalar) */
    for (int r = 0; r < R; r++) row[r] = J->data + (o + r) * rb, yv[r][0] = yv[r][1] = _mm256_setzero_ps();
    const int64_t cpg = J->G >= 128 ? J->G / 128 : 1;
    int64_t g0 = 0, cin = 0;
    for (int64_t c = 0; c < J->nchunk; c++) {
        if (c > 0) next_chunk_group(J, cpg, &g0, &cin);
        const int8_t *xp = xs + GRID_CHUNK * c;
        const __m256i x0 = _mm256_load_si256((const __m256i *)xp), x1 = _mm256_load_si256((const __m256i *)(xp + 32));
        const __m256i x2 = _mm256_load_si256((const __m256i *)(xp + 64)), x3 = _mm256_load_si256((const __m256i *)(xp + 96));
        const __m256 gv = _mm256_load_ps(gsv + 8 * c), xv = _mm256_load_ps(xsv + 8 * c);
        for (int r = 0; r < R; r++) {
            __m256i v;
            if ((o + r) * rb + 32 * c + 32 <= J->out * rb) v = _mm256_loadu_si256((const __m256i *)(row[r] + 32 * c));
            else { /* near the end of the weight buffer */
                uint8_t t[32] = {0};
                memcpy(t, row[r] + 32 * c, (size_t)(rb - 32 * c));
                v = _mm256_loadu_si256((const __m256i *)t);
            }
            __m256i acc = _mm256_maddubs_epi16(_mm256_and_si256(v, three8), x0);
            acc = _mm256_add_epi16(acc, _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(v, 2), three8), x1));
            acc = _mm256_add_epi16(acc, _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(v, 4), three8), x2));
            acc = _mm256_add_epi16(acc, _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(v, 6), three8), x3));
            const __m256 sv = chunk_scales(J->scale + (o + r) * ng, J, g0);
            const __m256 zv = chunk_scales(J->zero + (o + r) * ng, J, g0);
            __m256 *yc = &yv[r][c & 1];
            *yc = _mm256_fmadd_ps(_mm256_mul_ps(sv, gv), _mm256_cvtepi32_ps(_mm256_madd_epi16(acc, one16)), *yc);
            *yc = _mm256_fnmadd_ps(_mm256_mul_ps(sv, zv), xv, *yc);
        }
    }
    for (int r = 0; r < R; r++) y[o + r] = hsum8_avx2(_mm256_add_ps(yv[r][0], yv[r][1]));
}

/* correction8 with F16C, 8 groups per step: lane l takes the groups g = l (mod 8) in
 * order, as in correction8, so both give the same float. */
A2I float correction8_avx2(const uint16_t *sc, const uint16_t *zr, const float *xc, int64_t ng, float zoff) {
    const __m256 vzoff = _mm256_set1_ps(zoff);
    __m256 cv = _mm256_setzero_ps();
    int64_t g = 0;
    for (; g + 8 <= ng; g += 8) {
        const __m256 s = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(sc + g)));
        const __m256 z = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(zr + g)));
        cv = _mm256_fmadd_ps(_mm256_mul_ps(s, _mm256_sub_ps(z, vzoff)), _mm256_loadu_ps(xc + g), cv);
    }
    if (g < ng) { /* padding lanes: s = z = 0 and xc = 0 add +-0, which leaves c as it is (a lane
                   * starts at +0 and a sum is never -0 after that) */
        uint16_t sp[8] = {0}, zp[8] = {0};
        memcpy(sp, sc + g, sizeof(uint16_t) * (size_t)(ng - g));
        memcpy(zp, zr + g, sizeof(uint16_t) * (size_t)(ng - g));
        const __m256 s = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)sp));
        const __m256 z = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)zp));
        cv = _mm256_fmadd_ps(_mm256_mul_ps(s, _mm256_sub_ps(z, vzoff)), _mm256_loadu_ps(xc + g), cv);
    }
    return hsum8_avx2(cv);
}

/* grid8: see the header comment; rows are whole 32-byte chunks (in % 32 == 0), so every
 * load stays inside the weight buffer. */
A2I void grid8_rows_avx2(const ljob_t *J, const int8_t *xs, const float *gs, const float *xc, int64_t o,
                         const int R, float *y) {
    const int64_t rb = J->rb, ng = J->ng, cpg = J->G / 32;
    const __m256i flip = _mm256_set1_epi8((char)0x80), one16 = _mm256_set1_epi16(1);
    const uint8_t *row[4];
    __m256 yv[4];
    for (int r = 0; r < R; r++) row[r] = J->data + (o + r) * rb, yv[r] = _mm256_setzero_ps();
    for (int64_t g = 0; g < ng; g++) {
        __m256i acc[4];
        for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_si256();
        for (int64_t c = g * cpg; c < (g + 1) * cpg; c++) {
            const __m256i xv = _mm256_load_si256((const __m256i *)(xs + 32 * c));
            for (int r = 0; r < R; r++) {
                /* rows are read as one stream (R consecutive rows); a software prefetch ~2 KB
                 * ahead keeps it at memory bandwidth (prefetches never fault) */
                _mm_prefetch((const char *)(row[r] + 32 * c) + 2048, _MM_HINT_T0);
                const __m256i q = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(row[r] + 32 * c)), flip);
                const __m256i p = _mm256_maddubs_epi16(_mm256_abs_epi8(q), _mm256_sign_epi8(xv, q));
                acc[r] = _mm256_add_epi32(acc[r], _mm256_madd_epi16(p, one16));
            }
        }
        for (int r = 0; r < R; r++) {
            const float s = _cvtsh_ss(J->scale[(o + r) * ng + g]) * gs[g];
            yv[r] = _mm256_fmadd_ps(_mm256_set1_ps(s), _mm256_cvtepi32_ps(acc[r]), yv[r]);
        }
    }
    for (int r = 0; r < R; r++)
        y[o + r] = hsum8_avx2(yv[r]) - correction8_avx2(J->scale + (o + r) * ng, J->zero + (o + r) * ng, xc, ng, 128.0f);
}

/* grid4: see the header comment; in % 64 == 0, so every 32-byte load stays inside the row. */
A2I void grid4_rows_avx2(const ljob_t *J, const int8_t *xs, const float *gs, const float *xc, int64_t o,
                         const int R, float *y) {
    const int64_t rb = J->rb, ng = J->ng, G = J->G, nch = J->in / 64;
    const __m256i low = _mm256_set1_epi8(15), one16 = _mm256_set1_epi16(1);
    const uint8_t *row[4];
    __m256 yv[4];
    __m256i acc[4];
    for (int r = 0; r < R; r++) row[r] = J->data + (o + r) * rb, yv[r] = _mm256_setzero_ps(), acc[r] = _mm256_setzero_si256();
    for (int64_t c = 0; c < nch; c++) {
        const __m256i xe = _mm256_load_si256((const __m256i *)(xs + 64 * c));
        const __m256i xo = _mm256_load_si256((const __m256i *)(xs + 64 * c + 32));
        for (int r = 0; r < R; r++) {
            _mm_prefetch((const char *)(row[r] + 32 * c) + 2048, _MM_HINT_T0);
            const __m256i b = _mm256_loadu_si256((const __m256i *)(row[r] + 32 * c));
            const __m256i lo = _mm256_and_si256(b, low), hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), low);
            const __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, xe), _mm256_maddubs_epi16(hi, xo));
            acc[r] = _mm256_add_epi32(acc[r], _mm256_madd_epi16(p, one16));
        }
        if (G % 64) { /* see grid4_row_scalar */
            const int64_t g0 = 64 * c / G, g1 = (64 * c + 32) / G;
            for (int r = 0; r < R; r++) {
                const uint16_t *sc = J->scale + (o + r) * ng;
                const __m256 s = _mm256_set_m128(_mm_set1_ps(_cvtsh_ss(sc[g1]) * gs[g1]),
                                                 _mm_set1_ps(_cvtsh_ss(sc[g0]) * gs[g0]));
                yv[r] = _mm256_fmadd_ps(s, _mm256_cvtepi32_ps(acc[r]), yv[r]);
                acc[r] = _mm256_setzero_si256();
            }
        } else if ((64 * (c + 1)) % G == 0) {
            const int64_t g = 64 * c / G;
            for (int r = 0; r < R; r++) {
                const float s = _cvtsh_ss(J->scale[(o + r) * ng + g]) * gs[g];
                yv[r] = _mm256_fmadd_ps(_mm256_set1_ps(s), _mm256_cvtepi32_ps(acc[r]), yv[r]);
                acc[r] = _mm256_setzero_si256();
            }
        }
    }
    for (int r = 0; r < R; r++)
        y[o + r] = hsum8_avx2(yv[r]) - correction8_avx2(J->scale + (o + r) * ng, J->zero + (o + r) * ng, xc, ng, 0.0f);
}

A2 static void rows_avx2(const ljob_t *J, const void *xs, const float *gs, const float *xc, int64_t o0, int64_t o1,
                         float *y) {
    int64_t o = o0;
    if (J->fmt == LFMT_GRID8) {
        for (; o + 4 <= o1; o += 4) grid8_rows_avx2(J, xs, gs, xc, o, 4, y);
        for (; o < o1; o++) grid8_rows_avx2(J, xs, gs, xc, o, 1, y);
    } else if (J->fmt == LFMT_GRID4) {
        for (; o + 4 <= o1; o += 4) grid4_rows_avx2(J, xs, gs, xc, o, 4, y);
        for (; o < o1; o++) grid4_rows_avx2(J, xs, gs, xc, o, 1, y);
    } else if (J->fmt == LFMT_GRID2) {
        const float *gsv = gs, *xsv = xc; /* the caller passes the per-lane arrays */
        for (; o + 4 <= o1; o += 4) grid2_rows_avx2(J, xs, gsv, xsv, o, 4, y);
        for (; o < o1; o++) grid2_rows_avx2(J, xs, gsv, xsv, o, 1, y);
    } else if (J->planes) {
        const float *gsv = gs; /* the caller passes gsv in place of gs for the planes layout */
        for (; o + 4 <= o1; o += 4) sign_planes_rows_avx2(J, xs, gsv, o, 4, y);
        for (; o < o1; o++) sign_planes_rows_avx2(J, xs, gsv, o, 1, y);
    } else if (J->fmt == LFMT_SIGN) {
        for (; o + 4 <= o1; o += 4) sign_rows_avx2(J, xs, gs, xc, o, 4, y);
        for (; o < o1; o++) sign_rows_avx2(J, xs, gs, xc, o, 1, y);
    } else {
        for (; o + 4 <= o1; o += 4) ternary_rows_avx2(J, xs, gs, xc, o, 4, y);
        for (; o < o1; o++) ternary_rows_avx2(J, xs, gs, xc, o, 1, y);
    }
}

/* ------------------------------------------------------------------ AVX-512 VNNI (grid2 / grid4 / grid8)
 *
 * vpdpbusd sums 4 u8 x s8 products into an int32 lane, which is exactly the scalar path's
 * lane (grid4: bytes [4l, 4l+4) of a 32-byte chunk, low nibbles with the even columns and
 * high ones with the odd; grid8: bytes [4l, 4l+4) with the plain xq), so one instruction
 * replaces maddubs + madd + add and nothing saturates. A zmm holds two 32-byte chunks:
 * int32 lanes 0-7 = the first chunk's lanes, 8-15 = the second's. The float part is the
 * scalar one: per group, yv[l] = fma(s_g gs_g, (float)a_g[l], yv[l]) in group order on 8
 * lanes, so two groups in one zmm take two ymm FMAs (low half first), and a group spanning
 * several zmm adds the halves in int32 (exact) before its one FMA.
 * grid8 codes are u8, so dpbusd gives sum q xq; sum (q - 128) xq = that - 128 sum xq, and
 * the -128 sum xq per lane depends only on the activations: computed once per call (xz)
 * and used as the accumulator's starting value.
 * Shapes covered (others use AVX2): grid4 G % 128 == 0, 64 or 32; grid8 G % 64 == 0 or 32; grid2 G <= 128. */

#define A5 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")))
#define A5I static inline __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c"), always_inline))

/* Software prefetch distance of the AVX-512 kernels: they need half the time per byte of the
 * AVX2 ones, so 2 KB ahead (AVX2) is less than one DRAM latency; 8 KB into L2 (T1: more misses
 * in flight than L1 allows) measured best on the head shape (Zen 4: grid8 ~8 -> ~17-21 GB/s). */
#define PF5 8192
#define RMAX5 8 /* grid4 / grid8 rows per AVX-512 pass, each from its own stretch of the thread's rows (rows_avx512) */

/* out[i] = scale[g + i] * gs[g + i] for the 16 groups from g, 0 past ng (masked loads: gs
 * is padded to 8 only). Same product as scales8 and the scalar path. */
A5I void scales16(const uint16_t *sc, int64_t g, int64_t ng, const float *gs, float *out) {
    const __mmask16 m = ng - g >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (ng - g)) - 1);
    const __m512 s = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, sc + g));
    _mm512_storeu_ps(out, _mm512_mul_ps(s, _mm512_maskz_loadu_ps(m, gs + g)));
}

/* correction8_avx2 with a masked tail load instead of a copy through memory (which costs
 * a memcpy call and a store-forwarding stall on every row); same lanes, same zeros. */
A5I float correction8_avx512(const uint16_t *sc, const uint16_t *zr, const float *xc, int64_t ng, float zoff) {
    const __m256 vzoff = _mm256_set1_ps(zoff);
    __m256 cv = _mm256_setzero_ps();
    for (int64_t g = 0; g < ng; g += 8) {
        const __mmask8 m = ng - g >= 8 ? (__mmask8)0xFF : (__mmask8)((1u << (ng - g)) - 1);
        const __m256 s = _mm256_cvtph_ps(_mm_maskz_loadu_epi16(m, sc + g));
        const __m256 z = _mm256_cvtph_ps(_mm_maskz_loadu_epi16(m, zr + g));
        cv = _mm256_fmadd_ps(_mm256_mul_ps(s, _mm256_sub_ps(z, vzoff)), _mm256_loadu_ps(xc + g), cv);
    }
    return hsum8_avx2(cv);
}

/* grid8 accumulator starting values of one activation row: per unit (a group for G % 64
 * == 0, a pair of groups for G == 32) 16 int32 lanes of -128 sum xq, lanes as the kernel's. */
A5 static void grid8_xz_avx512(const ljob_t *J, const int8_t *xs, int32_t *xz) {
    const __m512i ones = _mm512_set1_epi8(1), zero = _mm512_setzero_si512();
    if (J->k512 == K5_G64) { /* here: G % 64 == 0 */
        for (int64_t g = 0; g < J->ng; g++) {
            __m512i a = zero;
            for (int64_t j = g * J->G; j < (g + 1) * J->G; j += 64)
                a = _mm512_dpbusd_epi32(a, ones, _mm512_load_si512((const void *)(xs + j)));
            _mm512_store_si512((void *)(xz + 16 * g), _mm512_sub_epi32(zero, _mm512_slli_epi32(a, 7)));
        }
        return;
    }
    for (int64_t p = 0; 2 * p < J->ng; p++) { /* the last pair may hold one group: load only it */
        const __mmask64 m = 2 * p + 1 < J->ng ? ~(__mmask64)0 : (__mmask64)0xFFFFFFFFu;
        const __m512i a = _mm512_dpbusd_epi32(zero, ones, _mm512_maskz_loadu_epi8(m, xs + 64 * p));
        _mm512_store_si512((void *)(xz + 16 * p), _mm512_sub_epi32(zero, _mm512_slli_epi32(a, 7)));
    }
}

A5I void grid8_rows_avx512(const ljob_t *J, const int8_t *xs, const float *gs, const float *xc, const int32_t *xz,
                           int64_t o, const int64_t rs, const int R, float *y) {
    const int64_t rb = J->rb, ng = J->ng, G = J->G;
    const uint8_t *row[RMAX5];
    __m256 yv[RMAX5];
    float sb[RMAX5][16] __attribute__((aligned(64)));
    for (int r = 0; r < R; r++) row[r] = J->data + (o + r * rs) * rb, yv[r] = _mm256_setzero_ps();
    if (J->k512 == K5_G64) {
        for (int64_t g = 0; g < ng; g++) {
            if (g % 16 == 0)
                for (int r = 0; r < R; r++) scales16(J->scale + (o + r * rs) * ng, g, ng, gs, sb[r]);
            const __m512i z = _mm512_load_si512((const void *)(xz + 16 * g));
            __m512i acc[RMAX5];
            for (int r = 0; r < R; r++) acc[r] = z;
            for (int64_t j = g * G; j < (g + 1) * G; j += 64) {
                const __m512i xv = _mm512_load_si512((const void *)(xs + j));
                for (int r = 0; r < R; r++) {
                    /* one stream of R consecutive rows, prefetched PF5 ahead (prefetches never fault) */
                    _mm_prefetch((const char *)(row[r] + j) + PF5, _MM_HINT_T1);
                    acc[r] = _mm512_dpbusd_epi32(acc[r], _mm512_loadu_si512((const void *)(row[r] + j)), xv);
                }
            }
            for (int r = 0; r < R; r++) {
                const __m256i t = _mm256_add_epi32(_mm512_castsi512_si256(acc[r]), _mm512_extracti64x4_epi64(acc[r], 1));
                yv[r] = _mm256_fmadd_ps(_mm256_set1_ps(sb[r][g % 16]), _mm256_cvtepi32_ps(t), yv[r]);
            }
        }
    } else { /* G == 32: a zmm is groups g, g + 1; a last single group is loaded masked */
        for (int64_t g = 0; g < ng; g += 2) {
            if (g % 16 == 0)
                for (int r = 0; r < R; r++) scales16(J->scale + (o + r * rs) * ng, g, ng, gs, sb[r]);
            const int two = g + 1 < ng;
            const __mmask64 m = two ? ~(__mmask64)0 : (__mmask64)0xFFFFFFFFu;
            const __m512i xv = _mm512_maskz_loadu_epi8(m, xs + 32 * g), z = _mm512_load_si512((const void *)(xz + 8 * g));
            for (int r = 0; r < R; r++) {
                _mm_prefetch((const char *)(row[r] + 32 * g) + PF5, _MM_HINT_T1);
                const __m512 f = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(z, _mm512_maskz_loadu_epi8(m, row[r] + 32 * g), xv));
                yv[r] = _mm256_fmadd_ps(_mm256_set1_ps(sb[r][g % 16]), _mm512_castps512_ps256(f), yv[r]);
                if (two)
                    yv[r] = _mm256_fmadd_ps(_mm256_set1_ps(sb[r][g % 16 + 1]),
                                            _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(f), 1)), yv[r]);
            }
        }
    }
    for (int r = 0; r < R; r++)
        y[o + r * rs] = hsum8_avx2(yv[r]) - correction8_avx512(J->scale + (o + r * rs) * ng, J->zero + (o + r * rs) * ng, xc, ng, 128.0f);
}

/* grid4: the activation row is laid out per 64-column chunk as its 32 even columns then its
 * 32 odd ones; a zmm pair of chunks needs [even c, even c+1] and [odd c, odd c+1]: two
 * shuffles per 128 columns, shared by the R rows. A last single chunk (in % 128 == 64) is
 * loaded masked. */
A5I void grid4_rows_avx512(const ljob_t *J, const int8_t *xs, const float *gs, const float *xc, int64_t o,
                           const int64_t rs, const int R, float *y) {
    const int64_t rb = J->rb, ng = J->ng, G = J->G, nch = J->in / 64, npair = (nch + 1) / 2;
    const __m512i low = _mm512_set1_epi8(15), zero = _mm512_setzero_si512();
    const __m256i lo4 = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1), hi4 = _mm256_setr_epi32(2, 2, 2, 2, 3, 3, 3, 3);
    const int mode = J->k512;
    const int64_t ppg = mode == K5_G128 ? G / 128 : 1; /* pairs per flush */
    const uint8_t *row[RMAX5];
    __m256 yv[RMAX5];
    __m512i acc[RMAX5];
    float sb[RMAX5][16] __attribute__((aligned(64)));
    for (int r = 0; r < R; r++) row[r] = J->data + (o + r * rs) * rb, yv[r] = _mm256_setzero_ps(), acc[r] = zero;
    for (int64_t p = 0; p < npair; p++) {
        /* first group of the pair: its scales are in sb from the refresh every 16 groups
         * (a pair never straddles one: it holds 1, 2 or 4 groups starting at a multiple) */
        const int64_t g = mode == K5_G128 ? p / ppg : mode == K5_G64 ? 2 * p : 4 * p;
        if (g % 16 == 0 && (mode != K5_G128 || p % ppg == 0))
            for (int r = 0; r < R; r++) scales16(J->scale + (o + r * rs) * ng, g, ng, gs, sb[r]);
        const int two = 2 * p + 1 < nch;
        const __m512i a = _mm512_load_si512((const void *)(xs + 128 * p));
        const __m512i b = two ? _mm512_load_si512((const void *)(xs + 128 * p + 64)) : zero;
        const __m512i xe = _mm512_shuffle_i64x2(a, b, 0x44), xo = _mm512_shuffle_i64x2(a, b, 0xEE);
        const __mmask64 m = two ? ~(__mmask64)0 : (__mmask64)0xFFFFFFFFu;
        for (int r = 0; r < R; r++) {
            _mm_prefetch((const char *)(row[r] + 64 * p) + PF5, _MM_HINT_T1);
            const __m512i w = two ? _mm512_loadu_si512((const void *)(row[r] + 64 * p))
                                  : _mm512_maskz_loadu_epi8(m, row[r] + 64 * p);
            const __m512i wl = _mm512_and_si512(w, low), wh = _mm512_and_si512(_mm512_srli_epi16(w, 4), low);
            acc[r] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(acc[r], wl, xe), wh, xo);
        }
        if (mode == K5_G128) {
            if ((p + 1) % ppg) continue;
            for (int r = 0; r < R; r++) {
                const __m256i t = _mm256_add_epi32(_mm512_castsi512_si256(acc[r]), _mm512_extracti64x4_epi64(acc[r], 1));
                yv[r] = _mm256_fmadd_ps(_mm256_set1_ps(sb[r][g % 16]), _mm256_cvtepi32_ps(t), yv[r]);
                acc[r] = zero;
            }
        } else {
            for (int r = 0; r < R; r++) {
                const __m512 f = _mm512_cvtepi32_ps(acc[r]);
                const __m256 fl = _mm512_castps512_ps256(f);
                const __m256 fh = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(f), 1));
                acc[r] = zero;
                if (mode == K5_G64) { /* chunk c is group c */
                    yv[r] = _mm256_fmadd_ps(_mm256_set1_ps(sb[r][g % 16]), fl, yv[r]);
                    if (two) yv[r] = _mm256_fmadd_ps(_mm256_set1_ps(sb[r][g % 16 + 1]), fh, yv[r]);
                } else { /* G == 32: lanes 0-3 / 4-7 of chunk c are groups 2c / 2c + 1 */
                    const __m256 s = _mm256_castps128_ps256(_mm_load_ps(&sb[r][g % 16]));
                    yv[r] = _mm256_fmadd_ps(_mm256_permutevar8x32_ps(s, lo4), fl, yv[r]);
                    if (two) yv[r] = _mm256_fmadd_ps(_mm256_permutevar8x32_ps(s, hi4), fh, yv[r]);
                }
            }
        }
    }
    for (int r = 0; r < R; r++)
        y[o + r * rs] = hsum8_avx2(yv[r]) - correction8_avx512(J->scale + (o + r * rs) * ng, J->zero + (o + r * rs) * ng, xc, ng, 0.0f);
}

/* grid2 with G <= 128 (K5_G2): a zmm holds the 64 code bytes of chunks 2p and 2p + 1, the
 * activation planes of both side by side; per plane one shift + and, one dpbusd (the
 * scalar lanes: bytes [4l, 4l + 4) of a chunk, all four codes). The float part runs on the
 * 16 lanes of grid2_row_scalar (even chunk low, odd chunk high) with the same products: the
 * lane scales of the pair's 256 / G groups by one masked load + permute each for s and z. */
A5I void grid2_rows_avx512(const ljob_t *J, const int8_t *xs, const float *gsv, const float *xsv, int64_t o,
                           const int64_t rs, const int R, float *y) {
    const int64_t rb = J->rb, ng = J->ng, G = J->G, gpp = 256 / G, npair = (J->nchunk + 1) / 2;
    const __m512i three = _mm512_set1_epi8(3);
    __m512i lane = _mm512_setzero_si512();
    {
        int32_t li[16];
        for (int l = 0; l < 16; l++) li[l] = (int32_t)(16 * l / G);
        lane = _mm512_loadu_si512((const void *)li);
    }
    const uint8_t *row[4]; /* rows_avx512 runs grid2 at most 4 rows at a time */
    __m512 yv[4];
    for (int r = 0; r < R; r++) row[r] = J->data + (o + r * rs) * rb, yv[r] = _mm512_setzero_ps();
    for (int64_t p = 0; p < npair; p++) {
        const int two = 2 * p + 1 < J->nchunk;
        const __mmask16 fm = two ? (__mmask16)0xFFFF : (__mmask16)0x00FF;
        const int8_t *xa = xs + GRID_CHUNK * 2 * p, *xb = xa + GRID_CHUNK;
        __m512i xk[4];
        for (int k = 0; k < 4; k++) {
            const __m256i lo = _mm256_load_si256((const __m256i *)(xa + 32 * k));
            xk[k] = two ? _mm512_inserti64x4(_mm512_castsi256_si512(lo), _mm256_load_si256((const __m256i *)(xb + 32 * k)), 1)
                        : _mm512_zextsi256_si512(lo);
        }
        const __m512 gv = _mm512_maskz_loadu_ps(fm, gsv + 16 * p), xv = _mm512_maskz_loadu_ps(fm, xsv + 16 * p);
        const int64_t g0 = p * gpp, left = ng - g0 < gpp ? ng - g0 : gpp;
        const __mmask16 gm = (__mmask16)((1u << left) - 1u);
        const int64_t b0 = 64 * p, nb = rb - b0 < 64 ? rb - b0 : 64; /* this row's bytes of the pair */
        const __mmask64 bm = nb == 64 ? ~(__mmask64)0 : (((__mmask64)1 << nb) - 1);
        for (int r = 0; r < R; r++) {
            _mm_prefetch((const char *)(row[r] + b0) + PF5, _MM_HINT_T1);
            const __m512i w = _mm512_maskz_loadu_epi8(bm, row[r] + b0);
            __m512i a = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_and_si512(w, three), xk[0]);
            a = _mm512_dpbusd_epi32(a, _mm512_and_si512(_mm512_srli_epi16(w, 2), three), xk[1]);
            a = _mm512_dpbusd_epi32(a, _mm512_and_si512(_mm512_srli_epi16(w, 4), three), xk[2]);
            a = _mm512_dpbusd_epi32(a, _mm512_and_si512(_mm512_srli_epi16(w, 6), three), xk[3]);
            const uint16_t *sc = J->scale + (o + r * rs) * ng + g0, *zr = J->zero + (o + r * rs) * ng + g0;
            const __m512 sv = _mm512_permutexvar_ps(lane, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(gm, sc)));
            const __m512 zv = _mm512_permutexvar_ps(lane, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(gm, zr)));
            /* mask3: lanes of a missing odd chunk keep their sums, as in the scalar loop */
            yv[r] = _mm512_mask3_fmadd_ps(_mm512_mul_ps(sv, gv), _mm512_cvtepi32_ps(a), yv[r], fm);
            yv[r] = _mm512_mask3_fnmadd_ps(_mm512_mul_ps(sv, zv), xv, yv[r], fm);
        }
    }
    for (int r = 0; r < R; r++)
        y[o + r * rs] = hsum8_avx2(_mm256_add_ps(_mm512_castps512_ps256(yv[r]),
                                            _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(yv[r]), 1))));
}

/* R rows of grid4 or grid8 from row o, rs rows apart. */
A5I void grid48_rows_avx512(const ljob_t *J, const void *xs, const float *gs, const float *xc, const int32_t *xz,
                            int64_t o, int64_t rs, const int R, float *y) {
    if (J->fmt == LFMT_GRID8) grid8_rows_avx512(J, xs, gs, xc, xz, o, rs, R, y);
    else grid4_rows_avx512(J, xs, gs, xc, o, rs, R, y);
}

A5 static void rows_avx512(const ljob_t *J, const void *xs, const float *gs, const float *xc, const int32_t *xz,
                           int64_t o0, int64_t o1, float *y) {
    int64_t o = o0;
    if (J->fmt == LFMT_GRID2) { /* gs / xc are the per-lane arrays gsv / xsv; 4 adjacent rows per pass (8
                                 * strided rows measured slower: 47-60% -> 37-54% of the copy from DRAM) */
        for (; o + 4 <= o1; o += 4) grid2_rows_avx512(J, xs, gs, xc, o, 1, 4, y);
        for (; o < o1; o++) grid2_rows_avx512(J, xs, gs, xc, o, 1, 1, y);
        return;
    }
    /* grid4 / grid8: pass t takes rows o0 + t + j q (j < RMAX5), one row from each of RMAX5 equal
     * stretches of this thread's rows, so the thread streams RMAX5 separate regions at once (one
     * sequential stream per thread reaches only about half the copy bandwidth here; grid8 from
     * DRAM 70-71% -> 74-78%, head shape 59-60% -> 72-74% in an A/B). Rows are independent: the
     * same bits in any order. What is left (< RMAX5 rows) runs 4 and 1 at a time. */
    const int64_t q = (o1 - o0) / RMAX5;
    for (int64_t t = 0; t < q; t++) grid48_rows_avx512(J, xs, gs, xc, xz, o0 + t, q, RMAX5, y);
    for (o = o0 + q * RMAX5; o + 4 <= o1; o += 4) grid48_rows_avx512(J, xs, gs, xc, xz, o, 1, 4, y);
    for (; o < o1; o++) grid48_rows_avx512(J, xs, gs, xc, xz, o, 1, 1, y);
}
#endif /* LUT_X86 */

/* ------------------------------------------------------------------ driver */

static void lut_task(void *ctx, int tid, int nt) {
    const ljob_t *J = ctx;
    const int64_t per = roundup((J->out + nt - 1) / nt, 8); /* contiguous ranges, no shared lines in y */
    const int64_t o0 = tid * per, o1 = min64(J->out, o0 + per);
    const size_t esz = J->fmt == LFMT_TERNARY ? 2 : 1;
    for (int64_t m = 0; m < J->M && o0 < o1; m++) { /* small M: one pass over the rows per activation row */
        const void *xs = (const char *)J->xs + (size_t)(m * J->xstride) * esz;
        /* planes layouts take the per-lane arrays gsv (and xsv for grid2) instead of gs / xc */
        const float *gs = J->planes ? J->gsv + m * J->nchunk * 8 : J->gs + m * J->ngp;
        const float *xc = J->fmt == LFMT_GRID2 ? J->xsv + m * J->nchunk * 8 : J->xc + m * J->ngp;
        float *y = J->y + m * J->out;
#if LUT_X86
        if (J->k512) { rows_avx512(J, xs, gs, xc, J->xz ? J->xz + m * J->nzu * 16 : NULL, o0, o1, y); continue; }
        if (J->isa >= SALOMI_ISA_AVX2) { rows_avx2(J, xs, gs, xc, o0, o1, y); continue; }
#endif
        for (int64_t o = o0; o < o1; o++) {
            if (J->fmt == LFMT_GRID8) grid8_row_scalar(J, xs, gs, xc, o, y);
            else if (J->fmt == LFMT_GRID4) grid4_row_scalar(J, xs, gs, xc, o, y);
            else if (J->fmt == LFMT_GRID2) grid2_row_scalar(J, xs, gs, xc, o, y);
            else if (J->planes) sign_planes_row_scalar(J, xs, gs, o, y);
            else if (J->fmt == LFMT_SIGN) sign_row_scalar(J, xs, gs, xc, o, y);
            else ternary_row_scalar(J, xs, gs, xc, o, y);
        }
    }
}

/* The AVX-512 kernel's shape for a job, K5_NONE where it has none. The ISA level avx512
 * promises F/BW/VL only, so VNNI is checked here (a bit kernels.c probed once). */
static int k512_mode(int fmt, int64_t G, int isa) {
#if LUT_X86
    if (isa < SALOMI_ISA_AVX512 || (fmt != LFMT_GRID4 && fmt != LFMT_GRID8 && fmt != LFMT_GRID2)) return K5_NONE;
    if (!(salomi_cpu_ext() & SALOMI_EXT_VNNI)) return K5_NONE;
    if (fmt == LFMT_GRID2) return G <= 128 ? K5_G2 : K5_NONE;
    if (fmt == LFMT_GRID4) return G % 128 == 0 ? K5_G128 : G == 64 ? K5_G64 : G == 32 ? K5_G32 : K5_NONE;
    return G % 64 == 0 ? K5_G64 : G == 32 ? K5_G32 : K5_NONE;
#else
    (void)fmt, (void)G, (void)isa;
    return K5_NONE;
#endif
}

static int run_i8(int fmt, const float *x, int64_t M, int64_t in, int64_t out, const uint8_t *data,
                  const uint16_t *scale, const uint16_t *zero, int64_t G, const int32_t *perm, float *y,
                  int threads) {
    if (!x || !y || !data || !scale || M < 0 || in < 1 || out < 1 || G < 1 || in % G) return -1;
    if (fmt == LFMT_GRID2 && (!zero || !grid2_planes_ok(G))) return -1;
    if (fmt == LFMT_GRID8 && (!zero || G % 32)) return -1;
    if (fmt == LFMT_GRID4 && (!zero || G % 32 || in % 64)) return -1;
    if (in > (INT64_C(1) << 24)) return -1; /* keeps every int32 lane sum exact (|sum| < 2^31) */
    if (perm)
        for (int64_t j = 0; j < in; j++)
            if (perm[j] < 0 || perm[j] >= in) return -1;
    if (M == 0) return 0;
    ljob_t J = {.fmt = fmt, .in = in, .out = out, .G = G, .ng = in / G, .data = data, .scale = scale, .zero = zero,
                .M = M, .y = y};
    J.ngp = roundup(J.ng, 8);
    J.rb = fmt == LFMT_SIGN ? (in + 7) / 8 : fmt == LFMT_TERNARY ? (in + 4) / 5 : fmt == LFMT_GRID8 ? in : fmt == LFMT_GRID4 ? in / 2 : (in + 3) / 4;
    gmeta_t *gm = malloc(sizeof(gmeta_t) * (size_t)J.ng);
    if (!gm) return -2;
    J.gm = gm;
    J.planes = fmt == LFMT_GRID2 || (fmt == LFMT_SIGN && sign_planes_ok(G));
    J.ccols = fmt == LFMT_GRID2 ? 128 : 256;
    J.nchunk = (in + J.ccols - 1) / J.ccols;
    J.nhalf = G >= J.ccols ? 1 : (int)(J.ccols / G);
    for (int l = 0; l < 8; l++) J.lane_g[l] = G >= J.ccols ? 0 : (int)(J.ccols / 8 * l / G);
    J.xstride = fmt == LFMT_GRID8 || fmt == LFMT_GRID4 ? roundup(in, 64)
                : fmt == LFMT_GRID2 ? J.nchunk * GRID_CHUNK
                : J.planes        ? J.nchunk * PLANE_CHUNK
                                  : roundup(plan_groups(&J, gm), 64); /* 64-byte aligned rows */
    const size_t esz = fmt == LFMT_TERNARY ? 2 : 1;
    if (M > INT64_MAX / 8 / (J.xstride + J.ngp + in)) { free(gm); return -1; }
    void *xs = aligned_alloc(64, (size_t)roundup(M * J.xstride * (int64_t)esz, 64));
    float *gs = malloc(sizeof(float) * (size_t)(M * J.ngp)), *xc = malloc(sizeof(float) * (size_t)(M * J.ngp));
    int8_t *xq = malloc((size_t)in);
    const size_t nlane = sizeof(float) * (size_t)roundup(M * J.nchunk * 8, 16);
    float *gsv = J.planes ? aligned_alloc(64, nlane) : NULL;
    float *xsv = fmt == LFMT_GRID2 ? aligned_alloc(64, nlane) : NULL;
    float *xp = perm ? malloc(sizeof(float) * (size_t)in) : NULL; /* x permuted like the stored columns */
    J.isa = salomi_get_isa();
    J.k512 = k512_mode(fmt, G, J.isa);
    J.nzu = J.k512 == K5_G32 ? (J.ng + 1) / 2 : J.ng;
    int32_t *xz = fmt == LFMT_GRID8 && J.k512 ? aligned_alloc(64, sizeof(int32_t) * 16 * (size_t)(M * J.nzu)) : NULL;
    int rc = 0;
    if (!xs || !gs || !xc || !xq || (J.planes && !gsv) || (fmt == LFMT_GRID2 && !xsv) || (perm && !xp) ||
        (fmt == LFMT_GRID8 && J.k512 && !xz)) {
        rc = -2;
        goto done;
    }
    for (int64_t m = 0; m < M; m++) {
        const float *xr = x + m * in;
        if (perm) {
            for (int64_t j = 0; j < in; j++) xp[j] = xr[perm[j]]; /* stored column j is weight column perm[j] */
            xr = xp;
        }
        quantize_row(&J, gm, xr, (char *)xs + (size_t)(m * J.xstride) * esz, gs + m * J.ngp, xc + m * J.ngp,
                     gsv ? gsv + m * J.nchunk * 8 : NULL, xsv ? xsv + m * J.nchunk * 8 : NULL, xq);
#if LUT_X86
        if (xz) grid8_xz_avx512(&J, (const int8_t *)xs + m * J.xstride, xz + m * J.nzu * 16);
#endif
    }
    J.xs = xs, J.gs = gs, J.xc = xc, J.gsv = gsv, J.xsv = xsv, J.xz = xz;
    int nt = threads < 1 ? 1 : threads > MAX_THREADS ? MAX_THREADS : threads;
    if (nt > (out + 7) / 8) nt = (int)((out + 7) / 8); /* no point in more threads than 8-row ranges */
    salomi_run_parallel(lut_task, &J, nt);
done:
    free(xz), free(xp), free(xsv), free(gsv), free(xq), free(xc), free(gs), free(xs), free(gm);
    return rc;
}

int salomi_sign_matmul_i8(const float *x, int64_t M, int64_t in, int64_t out, const uint8_t *bits,
                          const uint16_t *scale, int64_t group, float *y, int threads) {
    return run_i8(LFMT_SIGN, x, M, in, out, bits, scale, NULL, group, NULL, y, threads);
}

int salomi_ternary_matmul_i8(const float *x, int64_t M, int64_t in, int64_t out, const uint8_t *trits,
                             const uint16_t *scale, int64_t group, float *y, int threads) {
    return run_i8(LFMT_TERNARY, x, M, in, out, trits, scale, NULL, group, NULL, y, threads);
}

int salomi_grid_matmul_i8(const float *x, int64_t M, int64_t in, int64_t out, const uint8_t *codes, int bits,
                          const uint16_t *scale, const uint16_t *zero, int64_t group, const int32_t *perm, float *y,
                          int threads) {
    if (bits != 2 && bits != 4 && bits != 8) return -1;
    return run_i8(bits == 8 ? LFMT_GRID8 : bits == 4 ? LFMT_GRID4 : LFMT_GRID2, x, M, in, out, codes, scale, zero, group, perm, y, threads);
}
