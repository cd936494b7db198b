/* salomi packed-weight matmul kernels: y[M, out] = x[M, in] @ W^T, W read straight
 * from the packed storage formats of salomi/quantizers/simple.py (never materialised
 * as a whole float matrix).
 *
 * Layouts (see salomi/packing/bits.py):
 *   sign    bits  uint8 [out, ceil(in/8)]   LSB-first, w = scale[o, j/G] * (bit ? +1 : -1)
 *   ternary trits uint8 [out, ceil(in/5)]   byte = sum_k t_k 3^k, w = scale[o, j/G] * (t - 1)
 *   grid    codes uint8 [out, ceil(in*K/8)] LSB-first K-bit stream per row,
 *           w = scale[o, g] * (q - zero[o, g]); optional perm: stored column j is
 *           weight column perm[j].
 * scale / zero are IEEE fp16 bit patterns [out, in/G]. x and y are float32, row-major,
 * contiguous. All functions return 0 on success, -1 on an invalid argument, -2 when
 * out of memory. Calls are thread safe (they are serialised on the internal pool).
 */
#ifndef SALOMI_KERNELS_H
#define SALOMI_KERNELS_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum { SALOMI_ISA_SCALAR = 0, SALOMI_ISA_AVX2 = 1, SALOMI_ISA_AVX512 = 2 };

int salomi_cpu_isa(void);            /* best ISA this CPU (and OS) supports */
int salomi_get_isa(void);            /* ISA the kernels currently use */
int salomi_set_isa(int isa);         /* force an ISA; -1 = default (SALOMI_ISA env or best). 0 ok, -1 unsupported */
const char *salomi_isa_name(int isa);

int salomi_sign_matmul(const float *x, int64_t M, int64_t in, int64_t out, const uint8_t *bits,
                       const uint16_t *scale, int64_t group, float *y, int threads);
int salomi_ternary_matmul(const float *x, int64_t M, int64_t in, int64_t out, const uint8_t *trits,
                          const uint16_t *scale, int64_t group, float *y, int threads);
/* perm may be NULL; otherwise int32 [in] with values in [0, in) (checked). */
int salomi_grid_matmul(const float *x, int64_t M, int64_t in, int64_t out, const uint8_t *codes, int bits,
                       const uint16_t *scale, const uint16_t *zero, int64_t group, const int32_t *perm,
                       float *y, int threads);

/* Several packed layers that read the same input x [M, in] (e.g. q/k/v, gate/up) in
 * one dispatch of the thread pool; results equal separate salomi_*_matmul calls. */
enum { SALOMI_FMT_SIGN = 0, SALOMI_FMT_TERNARY = 1, SALOMI_FMT_GRID = 2 };
typedef struct {
    int32_t format;            /* SALOMI_FMT_* */
    int32_t bits;              /* grid: bits per code */
    int64_t in, out, group;    /* every op must have the same in */
    const uint8_t *data;
    const uint16_t *scale, *zero; /* zero: grid only */
    const int32_t *perm;       /* grid only, may be NULL */
    float *y;                  /* output [M, out] */
} salomi_matmul_op;
int salomi_matmul_batch(const salomi_matmul_op *ops, int n, const float *x, int64_t M, int threads); /* n <= 8 */

/* Run fn(ctx, tid, nt) for tid = 0..nt-1 on the kernels' persistent thread pool (the
 * caller runs tid 0) and return when all are done. nt may come back smaller than asked
 * (pool could not grow); fn must split its work by the nt it is given. Used by the
 * engine (engine.c) so the whole process has one pool and never spawns threads per op. */
typedef void (*salomi_task_fn)(void *ctx, int tid, int nt);
void salomi_run_parallel(salomi_task_fn fn, void *ctx, int threads);

/* Read-bandwidth probe for the benchmark: xor of the first n / threads / streams / 64 * 64
 * * streams * threads bytes of buf, each thread reading its slice as `streams` parts in
 * lockstep. */
uint64_t salomi_read_stream(const uint8_t *buf, int64_t n, int streams, int threads);

/* ---------------------------------------------------------------- int8-activation kernels (lut.c)
 * Same arguments, layouts and return codes as salomi_sign_matmul / salomi_ternary_matmul,
 * but each activation row is first quantized to int8 per weight scale group
 * (sx_g = max|x_j| / 127 over the group's G columns, xq = round-half-even(x * 127 / max))
 * and the dot products run in integer arithmetic. NOT bit-exact with the float kernels:
 * per output, |y - y_float| <= sum_g |s_g| * sx_g / 2 * sum_{j in g} |q_j| plus float
 * rounding (q = +-1 for sign, -1/0/+1 for ternary). Results are identical on every ISA
 * (the AVX-512 setting runs the AVX2 code). in <= 2^24. Meant for GEMV (M = 1) and small
 * M (rows are processed one activation row at a time). Non-finite x gives NaN rows. */
int salomi_sign_matmul_i8(const float *x, int64_t M, int64_t in, int64_t out, const uint8_t *bits,
                          const uint16_t *scale, int64_t group, float *y, int threads);
int salomi_ternary_matmul_i8(const float *x, int64_t M, int64_t in, int64_t out, const uint8_t *trits,
                             const uint16_t *scale, int64_t group, float *y, int threads);
/* Grid with bits == 2 and group in {16, 32, 64, 128} or a multiple of 128, bits == 4 and
 * group a multiple of 32 with in a multiple of 64, or bits == 8 and group a multiple of 32
 * (returns -1 otherwise); w = s (q - z), error bound as above
 * with |q_j - z_g| for |q_j|. */
int salomi_grid_matmul_i8(const float *x, int64_t M, int64_t in, int64_t out, const uint8_t *codes, int bits,
                          const uint16_t *scale, const uint16_t *zero, int64_t group, const int32_t *perm,
                          float *y, int threads);

#ifdef __cplusplus
}
#endif
#endif
