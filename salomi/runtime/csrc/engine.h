/* salomi engine: a native Llama-family decoder over packed (and float) weights.
 *
 * One call runs the whole forward pass for n tokens (embedding -> blocks -> final norm
 * -> head) with a float32 KV cache, so the caller pays Python once per token, not per
 * op. Packed projections go through the kernels of kernels.h (sign / ternary / grid)
 * or the table-lookup kernel for "vq" in engine.c; float matrices (fp16 / fp32) use
 * engine.c's own GEMV/GEMM. All parallel work runs on the kernels' thread pool.
 *
 * The engine never copies the weights: every pointer must stay valid (and unchanged)
 * until salomi_engine_free. Sizes are checked at create time against the declared
 * shapes (data_bytes / scale_len etc.), and vq codes are checked to be < k.
 */
#ifndef SALOMI_ENGINE_H
#define SALOMI_ENGINE_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum {
    SALOMI_W_F32 = 0,     /* data float32 [out, in] */
    SALOMI_W_F16 = 1,     /* data IEEE fp16 bits [out, in] */
    SALOMI_W_SIGN = 2,    /* kernels.h layouts; scale fp16 [out, in/group] */
    SALOMI_W_TERNARY = 3,
    SALOMI_W_GRID = 4,    /* + zero fp16 [out, in/group], bits, optional perm int32 [in] */
    SALOMI_W_VQ = 5,      /* codes [out, ceil(in/d*b/8)] b = max(1, ceil(log2 k)), codebook fp16 [k, d], scale fp16 [out] */
};

/* One projection (or the embedding / head). Field use depends on kind. */
typedef struct {
    int32_t kind;
    int32_t bits;           /* grid: bits per code (1..8); vq: bits per code (1..16) */
    int64_t out, in;
    int64_t group;          /* sign / ternary / grid */
    int64_t vq_d, vq_k;     /* vq */
    const void *data;       /* see kind */
    int64_t data_bytes;     /* byte size of data (checked) */
    const uint16_t *scale;  /* fp16 bits */
    int64_t scale_len;      /* elements (checked) */
    const uint16_t *zero;   /* grid: fp16 bits, scale_len elements */
    const int32_t *perm;    /* grid: NULL or int32 [in] */
    const uint16_t *codebook; /* vq: fp16 bits [k, d] */
    const float *bias;      /* NULL or float32 [out] */
    /* "+rot": W = U^T Q V with Q the layer above; V = H_in diag(rot_s_in) / sqrt(in),
     * U likewise over out. H is the Kronecker product of rot_nb_* blocks of orders
     * rot_f_*[i] (<= 64 each, product = in / out); rot_m_* holds the blocks row-major,
     * concatenated. rot = 0: no rotation (the rot_* fields are ignored). Layers whose
     * rot_s_in / rot_m_in pointers are equal share one input rotation. */
    int32_t rot;
    int32_t rot_nb_in, rot_nb_out;
    int32_t rot_f_in[8], rot_f_out[8];
    const float *rot_s_in, *rot_s_out;  /* float32 +-1 [in], [out] */
    const float *rot_m_in, *rot_m_out;  /* float32 sum f^2 */
    /* 1: run this layer with the int8-activation kernel (lut.c; sign, ternary, 2-bit grid
     * with a supported group; the kernel's error bound applies). 0: float kernels. */
    int32_t act_i8;
    /* "+lowrank": y += diag(lr_us) U diag(lr_vs) V x' with U int8 [out][lr_rank], V int8
     * [lr_rank][in] and fp16 scales lr_us [out], lr_vs [lr_rank]. lr_rot_inside = 1
     * ("BASE+lowrank+rot"): x' is the rotated input and the term is added before U^T;
     * 0 ("BASE+rot+lowrank" or no rotation): x' = x, added to the layer's output. lr_rank = 0: none. */
    int32_t lr_rank, lr_rot_inside;
    const int8_t *lr_u, *lr_v;
    const uint16_t *lr_us, *lr_vs;
} salomi_weight;

typedef struct {
    int32_t n_layers, hidden, n_heads, n_kv_heads, head_dim, intermediate, vocab;
    int32_t max_seq;        /* KV cache length (positions 0 .. max_seq-1) */
    int32_t threads;        /* pool threads used per parallel op (>= 1) */
    float rms_eps;
    float attn_scale;       /* softmax scale, usually head_dim^-0.5 */
    float rope_factor;      /* HF "attention_scaling": cos/sin are multiplied by it (1 by default) */
    const float *inv_freq;  /* float32 [head_dim/2], exactly as the HF rotary embedding computes it */
    int32_t kv_f16;         /* 1: KV cache in IEEE half (round to nearest even; half the bytes attention reads
                             * per token, as llama.cpp's default f16 cache); 0: float32 (exact) */
} salomi_engine_config;

typedef struct salomi_engine salomi_engine;

/* weights: 1 + 7*n_layers + 1 entries: embed_tokens, then per layer q, k, v, o, gate,
 * up, down, then the head (the caller passes the embedding again when tied).
 * norms: 2*n_layers + 1 float32 [hidden] pointers: per layer input_layernorm,
 * post_attention_layernorm, then the final norm.
 * Returns NULL on error and writes a one-line reason into err (errlen bytes). */
salomi_engine *salomi_engine_create(const salomi_engine_config *cfg, const salomi_weight *weights,
                                    const float *const *norms, char *err, int errlen);
void salomi_engine_free(salomi_engine *e);
void salomi_engine_reset(salomi_engine *e); /* forget the KV cache (O(1)) */

/* Run n tokens at positions pos0 .. pos0+n-1 (the cache must hold pos0 entries:
 * pos0 <= current length; pos0 < length rewinds). logits: all_logits ? float32
 * [n, vocab] : float32 [vocab] for the last token. Returns 0, or -1 (bad argument:
 * token id or position out of range; see salomi_engine_error), -2 (out of memory),
 * -3 (a kernel failed). */
int salomi_engine_forward(salomi_engine *e, const int32_t *tokens, int64_t n, int64_t pos0, float *logits,
                          int all_logits);
int64_t salomi_engine_length(const salomi_engine *e); /* positions held in the KV cache */
const char *salomi_engine_error(const salomi_engine *e);

/* Int8 tables (T-MAC), the kernel the engine runs when act_i8 is set for sign layers with one
 * scale per row (group == in) and in % 8 == 0, and for ternary layers with one scale per row
 * (kind = SALOMI_W_SIGN / SALOMI_W_TERNARY; salomi_tables_ok). The row bytes are re-laid once
 * (salomi_tables_layout; salomi_tables_bytes(kind, out, in) bytes, as many bits per weight as
 * the file). A code covers one vector column: sign, 4 weight columns (one nibble, two codes
 * per byte; nv = in/4); ternary, 5 weight columns (the file's byte, five trits; nv =
 * ceil(in/5), the last vector's missing columns read as zero). The nv vector columns form two
 * halves, [0, h) and [h, nv) with h = nv/4*2; each half is laid [ceil(out/32)][its bytes per
 * row][32] (row o's byte b of the half at [o/32][b][o%32], padding rows zero), half 1 after
 * half 0. Per call, for each block of vector columns counted from its half's start (32
 * vectors for sign, 8 for ternary), the table of every vector column (sign: the 16 sums
 * +-x0 +-x1 +-x2 +-x3; ternary: the 243 sums of {-1,0,+1} x0..x4, trit j of the byte weighting
 * x_j, zero-padded to 256 entries) is built in float32 (a mul, then one FMA per further column
 * in order) and quantized to int8 with one scale (max |entry| / 127, round to nearest even;
 * |error| <= scale / 2 per lookup), and 32 rows (64 on AVX-512; ternary needs VBMI for that)
 * are looked up per instruction; within a half, integer block sums enter each row's float sum
 * with one FMA in block order; y = (half 0 + half 1) * row scale. Two threads take one half
 * each (both build only their half's tables). Scalar, AVX2 and AVX-512 give identical bits for
 * any thread count. Returns 0, -1 (bad argument), -2 (out of memory). */
int salomi_tables_ok(int kind, int64_t in, int64_t group);
int64_t salomi_tables_bytes(int kind, int64_t out, int64_t in);
int salomi_tables_layout(int kind, const void *data, int64_t out, int64_t in, uint8_t *il);
int salomi_tables_matmul(int kind, const float *x, int64_t M, int64_t in, int64_t out, const uint8_t *il,
                         const uint16_t *scale, float *y, int threads);

/* Profile (only collected when SALOMI_ENGINE_PROFILE=1 at create): cumulative seconds
 * per stage into out[0..n): embed, norms, qkv, rope+attention, o_proj, gate/up, act,
 * down, head, calls, then the +rot transforms (time already inside the projection stages).
 * Returns how many were written. */
int salomi_engine_profile(const salomi_engine *e, double *out, int n);

#ifdef __cplusplus
}
#endif
#endif
