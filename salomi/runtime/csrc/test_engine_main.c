/* Pure-C driver for engine.c, meant to run under AddressSanitizer + UBSan
 * (bench/sanitize.sh engine). Every buffer is malloc'ed at its exact size, so any read
 * past a weight, scale, code row or cache shows up as an ASan error.
 *
 * For random tiny Llama shapes and every weight kind (fp32, fp16, sign, ternary, grid
 * with/without permutation, vq; random biases, +rot, int8 activations), on each ISA and with 1 and 2 threads:
 *   - logits of a prefill (all positions, longer than one internal chunk) equal the
 *     logits of token-by-token decode over the KV cache;
 *   - scalar and SIMD paths agree;
 *   - malformed weights (wrong byte counts, vq code >= k, bad permutation) are refused
 *     at create, bad tokens / positions at forward.
 * Usage: test_engine [cases] [seed]; prints "OK: N cases, 0 failures" on success.
 */
#include "engine.h"
#include "kernels.h"
#include "kernels_internal.h" /* salomi_f2h / salomi_h2f */

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static uint64_t g_rng = 1;
static uint32_t rnd(void) {
    g_rng ^= g_rng << 13, g_rng ^= g_rng >> 7, g_rng ^= g_rng << 17;
    return (uint32_t)(g_rng >> 11);
}
static int rint_(int n) { return (int)(rnd() % (uint32_t)n); }
static float frand(void) { return (float)(rnd() & 0xFFFFFF) / 8388608.0f - 1.0f; }

/* float -> IEEE half for values well inside the normal range (truncating). */
static uint16_t f2h(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    uint32_t s = (u >> 16) & 0x8000u, e = (u >> 23) & 0xffu, m = u & 0x7fffffu;
    if (e < 113) return (uint16_t)s; /* tiny -> signed zero */
    return (uint16_t)(s | ((e - 112) << 10) | (m >> 13));
}

typedef struct { void *p[16]; int n; } owned_t;
static void *own(owned_t *o, size_t bytes) {
    void *p = malloc(bytes ? bytes : 1);
    if (!p) { fprintf(stderr, "malloc failed\n"); exit(2); }
    o->p[o->n++] = p;
    return p;
}
static void free_owned(owned_t *o) { for (int i = 0; i < o->n; i++) free(o->p[i]); o->n = 0; }

static uint16_t *halves(owned_t *o, int64_t n, float amp) {
    uint16_t *h = own(o, sizeof(uint16_t) * (size_t)n);
    for (int64_t i = 0; i < n; i++) h[i] = f2h(amp * frand());
    return h;
}

static int64_t pick_group(int64_t in) {
    static const int gs[] = {8, 16, 4, 12};
    if (rint_(3) == 0) return in; /* one scale per row: the int8 sign-table path (engine.c) */
    for (int t = 0; t < 4; t++) {
        int g = gs[rint_(4)];
        if (in % g == 0) return g;
    }
    return in;
}

static void make_weight(salomi_weight *w, owned_t *o, int kind, int64_t out, int64_t in, int with_bias) {
    memset(w, 0, sizeof *w);
    w->kind = kind, w->out = out, w->in = in;
    const float amp = 1.0f / sqrtf((float)in);
    switch (kind) {
    case SALOMI_W_F32: {
        float *d = own(o, sizeof(float) * (size_t)(out * in));
        for (int64_t i = 0; i < out * in; i++) d[i] = amp * frand();
        w->data = d, w->data_bytes = (int64_t)sizeof(float) * out * in;
        break;
    }
    case SALOMI_W_F16:
        w->data = halves(o, out * in, amp), w->data_bytes = 2 * out * in;
        break;
    case SALOMI_W_SIGN: case SALOMI_W_TERNARY: case SALOMI_W_GRID: {
        w->group = pick_group(in);
        int64_t rb = kind == SALOMI_W_SIGN ? (in + 7) / 8 : kind == SALOMI_W_TERNARY ? (in + 4) / 5 : 0;
        if (kind == SALOMI_W_GRID) w->bits = 1 + rint_(8), rb = (in * w->bits + 7) / 8;
        uint8_t *d = own(o, (size_t)(out * rb));
        for (int64_t i = 0; i < out * rb; i++) d[i] = (uint8_t)(kind == SALOMI_W_TERNARY ? rnd() % 243 : rnd());
        w->data = d, w->data_bytes = out * rb;
        w->scale_len = out * (in / w->group);
        w->scale = halves(o, w->scale_len, amp);
        if (kind == SALOMI_W_GRID) {
            uint16_t *z = own(o, sizeof(uint16_t) * (size_t)w->scale_len);
            for (int64_t i = 0; i < w->scale_len; i++) z[i] = f2h((float)rint_(1 << w->bits));
            w->zero = z;
            if (rint_(2)) {
                int32_t *perm = own(o, sizeof(int32_t) * (size_t)in);
                for (int64_t j = 0; j < in; j++) perm[j] = (int32_t)j;
                for (int64_t j = in - 1; j > 0; j--) { int64_t r = rint_((int)j + 1); int32_t t = perm[j]; perm[j] = perm[r]; perm[r] = t; }
                w->perm = perm;
            }
        }
        break;
    }
    case SALOMI_W_VQ: {
        static const int ds[] = {1, 2, 4};
        int64_t d = ds[rint_(3)];
        while (in % d) d /= 2;
        int64_t k = 2 + rint_(300), nv = in / d;
        int b = 1;
        while ((1LL << b) < k) b++;
        int64_t rb = (nv * b + 7) / 8;
        uint8_t *c = own(o, (size_t)(out * rb));
        memset(c, 0, (size_t)(out * rb));
        for (int64_t r = 0; r < out; r++)
            for (int64_t v = 0; v < nv; v++) {
                uint32_t code = rnd() % (uint32_t)k;
                for (int t = 0; t < b; t++)
                    if (code >> t & 1) { int64_t bit = v * b + t; c[r * rb + bit / 8] |= (uint8_t)(1u << (bit % 8)); }
            }
        w->bits = b, w->vq_d = d, w->vq_k = k;
        w->data = c, w->data_bytes = out * rb;
        w->codebook = halves(o, k * d, 1.0f);
        w->scale_len = out;
        w->scale = halves(o, out, amp);
        break;
    }
    }
    if (with_bias) {
        float *b = own(o, sizeof(float) * (size_t)out);
        for (int64_t i = 0; i < out; i++) b[i] = 0.1f * frand();
        w->bias = b;
    }
}

/* +rot on one side: Sylvester blocks for powers of two (the engine checks), random dense ones otherwise */
static int make_rot_side(owned_t *o, int64_t n, int32_t *nb, int32_t *f, const float **sg, const float **m) {
    if (n <= 64) *nb = 1, f[0] = (int32_t)n;
    else if (n % 8 == 0 && n / 8 <= 64) *nb = 2, f[0] = 8, f[1] = (int32_t)(n / 8);
    else return 0;
    int64_t tot = 0;
    for (int i = 0; i < *nb; i++) tot += (int64_t)f[i] * f[i];
    float *s = own(o, sizeof(float) * (size_t)n), *mm = own(o, sizeof(float) * (size_t)tot);
    for (int64_t i = 0; i < n; i++) s[i] = rnd() & 1 ? 1.0f : -1.0f;
    /* power-of-two blocks must be Sylvester (the engine runs them as butterflies); others dense random */
    float *b = mm;
    for (int a = 0; a < *nb; b += (int64_t)f[a] * f[a], a++) {
        const int64_t fa = f[a];
        const int pow2 = fa > 1 && (fa & (fa - 1)) == 0;
        for (int64_t i = 0; i < fa; i++)
            for (int64_t k = 0; k < fa; k++)
                b[i * fa + k] = pow2 ? (__builtin_popcountll((unsigned long long)(i & k)) & 1 ? -1.f : 1.f) : frand();
    }
    *sg = s, *m = mm;
    return 1;
}

static void maybe_rot_i8(salomi_weight *w, owned_t *o, const salomi_weight *prev) {
    if (w->kind == SALOMI_W_SIGN || w->kind == SALOMI_W_TERNARY ||
        (w->kind == SALOMI_W_GRID && w->bits == 2 && w->group == 16))
        w->act_i8 = rint_(2);
    if (w->kind == SALOMI_W_VQ && w->vq_k <= 256) w->act_i8 = rint_(2); /* int8 tables */
    if (rint_(3)) return;
    if (!make_rot_side(o, w->in, &w->rot_nb_in, w->rot_f_in, &w->rot_s_in, &w->rot_m_in) ||
        !make_rot_side(o, w->out, &w->rot_nb_out, w->rot_f_out, &w->rot_s_out, &w->rot_m_out))
        return;
    w->rot = 1;
    if (prev && prev->rot && prev->in == w->in && rint_(2)) { /* share the input rotation (q/k/v, gate/up) */
        w->rot_nb_in = prev->rot_nb_in, w->rot_s_in = prev->rot_s_in, w->rot_m_in = prev->rot_m_in;
        memcpy(w->rot_f_in, prev->rot_f_in, sizeof w->rot_f_in);
    }
}

/* "+lowrank" on a quarter of the projections: int8 factors of rank 1..8, inside or outside the
 * rotation when the layer has one */
static void maybe_lowrank(salomi_weight *w, owned_t *o) {
    if (rint_(4)) return;
    const int64_t mx = w->out < w->in ? w->out : w->in;
    const int64_t R = 1 + rint_((int)(mx < 8 ? mx : 8));
    int8_t *u = own(o, (size_t)(w->out * R)), *v = own(o, (size_t)(R * w->in));
    for (int64_t i = 0; i < w->out * R; i++) u[i] = (int8_t)(rint_(255) - 127);
    for (int64_t i = 0; i < R * w->in; i++) v[i] = (int8_t)(rint_(255) - 127);
    w->lr_rank = (int32_t)R, w->lr_u = u, w->lr_v = v;
    w->lr_us = halves(o, w->out, 1e-3f), w->lr_vs = halves(o, R, 1e-2f);
    w->lr_rot_inside = w->rot ? rint_(2) : 0;
}

static int failures = 0;
#define CHECK(cond, ...)                                                                                              \
    do {                                                                                                              \
        if (!(cond)) { failures++; printf("FAIL: " __VA_ARGS__); printf("\n"); }                                      \
    } while (0)

static float max_abs(const float *a, int64_t n) {
    float m = 0.0f;
    for (int64_t i = 0; i < n; i++) m = fabsf(a[i]) > m ? fabsf(a[i]) : m;
    return m;
}
static float max_diff(const float *a, const float *b, int64_t n) {
    float m = 0.0f;
    for (int64_t i = 0; i < n; i++) m = fabsf(a[i] - b[i]) > m ? fabsf(a[i] - b[i]) : m;
    return m;
}

static void run_case(int cs) {
    const int heads = 1 + rint_(4), kvh = heads % 2 == 0 && rint_(2) ? heads / 2 : heads;
    const int hd = 2 * (1 + rint_(10)) * (rint_(2) ? 4 : 1); /* even; sometimes a multiple of 8 */
    salomi_engine_config c = {.n_layers = 1 + rint_(2), .hidden = 8 * (1 + rint_(5)), .n_heads = heads,
                              .n_kv_heads = kvh, .head_dim = hd, .intermediate = 8 * (1 + rint_(6)),
                              .vocab = 5 + rint_(60), .max_seq = 80, .threads = 1 + rint_(2), .rms_eps = 1e-5f,
                              .attn_scale = 1.0f / sqrtf((float)hd), .rope_factor = 1.0f};
    c.kv_f16 = rint_(2); /* half KV cache: prefill and decode read the same rounded rows */
    owned_t own_inv = {0};
    float *inv = own(&own_inv, sizeof(float) * (size_t)(hd / 2));
    for (int i = 0; i < hd / 2; i++) inv[i] = powf(10000.0f, -2.0f * (float)i / (float)hd);
    c.inv_freq = inv;
    const int64_t L = c.n_layers, H = c.hidden, I = c.intermediate, q = (int64_t)heads * hd, kv = (int64_t)kvh * hd;
    const int64_t nw = 7 * L + 2;
    salomi_weight *W = calloc((size_t)nw, sizeof *W);
    owned_t *own_w = calloc((size_t)nw, sizeof *own_w);
    const int64_t outs[7] = {q, kv, kv, H, I, I, H}, ins[7] = {H, H, H, q, H, H, I};
    for (int64_t i = 0; i < nw; i++) {
        int64_t out = i == 0 || i == nw - 1 ? c.vocab : outs[(i - 1) % 7];
        int64_t in = i == 0 || i == nw - 1 ? H : ins[(i - 1) % 7];
        make_weight(&W[i], &own_w[i], rint_(6), out, in, i > 0 && i < nw - 1 && rint_(3) == 0);
        if (i > 0) maybe_rot_i8(&W[i], &own_w[i], i > 1 && i < nw - 1 ? &W[i - 1] : NULL);
        if (i > 0) maybe_lowrank(&W[i], &own_w[i]);
    }
    owned_t own_n = {0};
    const float **norms = own(&own_n, sizeof(float *) * (size_t)(2 * L + 1));
    float *nv = own(&own_n, sizeof(float) * (size_t)H * (size_t)(2 * L + 1));
    for (int64_t i = 0; i < H * (2 * L + 1); i++) nv[i] = 1.0f + 0.2f * frand();
    for (int64_t i = 0; i < 2 * L + 1; i++) norms[i] = nv + i * H;

    int any_i8 = 0;
    for (int64_t i = 0; i < nw; i++) any_i8 |= W[i].act_i8;
    char err[256];
    const int n = 70; /* more than one internal prefill chunk */
    int32_t tok[70];
    for (int i = 0; i < n; i++) tok[i] = rint_(c.vocab);
    float *pre = malloc(sizeof(float) * (size_t)(n * c.vocab)), *dec = malloc(sizeof(float) * (size_t)(n * c.vocab));
    float *ref = malloc(sizeof(float) * (size_t)(n * c.vocab));
    for (int isa = salomi_cpu_isa(); isa >= SALOMI_ISA_SCALAR; isa--) {
        salomi_set_isa(isa);
        salomi_engine *e = salomi_engine_create(&c, W, norms, err, sizeof err);
        CHECK(e != NULL, "case %d: create failed: %s", cs, err);
        if (!e) break;
        CHECK(salomi_engine_forward(e, tok, n, 0, pre, 1) == 0, "case %d: prefill failed", cs);
        salomi_engine_reset(e);
        for (int i = 0; i < n; i++)
            CHECK(salomi_engine_forward(e, tok + i, 1, i, dec + (int64_t)i * c.vocab, 0) == 0, "case %d: decode", cs);
        /* int8 layers round their activations (or vq tables) to 1/127 of a group's max: an
         * upstream difference of one ulp (prefill vs decode, scalar vs SIMD association) can
         * flip one rounding, a step of ~1% of a tiny layer's output, so those cases get a
         * looser bound (an indexing bug would still be O(1) off) */
        const float tol = (any_i8 ? 3e-2f : 1e-3f) * (1.0f + max_abs(pre, n * c.vocab));
        float d = max_diff(pre, dec, n * c.vocab);
        CHECK(d <= tol, "case %d isa %d: prefill vs decode differ by %g (tol %g)", cs, isa, d, tol);
        if (isa == salomi_cpu_isa()) memcpy(ref, pre, sizeof(float) * (size_t)(n * c.vocab));
        else {
            d = max_diff(pre, ref, n * c.vocab);
            CHECK(d <= tol, "case %d isa %d: differs from the best ISA by %g (tol %g)", cs, isa, d, tol);
        }
        /* argument errors */
        int32_t bad = c.vocab;
        CHECK(salomi_engine_forward(e, &bad, 1, 0, dec, 0) == -1, "case %d: token >= vocab accepted", cs);
        CHECK(salomi_engine_forward(e, tok, 1, salomi_engine_length(e) + 1, dec, 0) == -1, "case %d: gap accepted", cs);
        CHECK(salomi_engine_forward(e, tok, 11, 70, dec, 0) == -1, "case %d: overflow of max_seq accepted", cs);
        salomi_engine_free(e);
    }
    salomi_set_isa(-1);
    /* malformed weights are refused at create */
    int64_t victim = 1 + rint_((int)(nw - 1));
    salomi_weight keep = W[victim];
    W[victim].data_bytes += 1;
    CHECK(salomi_engine_create(&c, W, norms, err, sizeof err) == NULL, "case %d: wrong data_bytes accepted", cs);
    W[victim] = keep;
    if (keep.kind != SALOMI_W_F32 && keep.kind != SALOMI_W_F16) {
        W[victim].scale_len -= 1;
        CHECK(salomi_engine_create(&c, W, norms, err, sizeof err) == NULL, "case %d: short scale accepted", cs);
        W[victim] = keep;
    }
    for (int64_t i = 0; i < nw; i++) {
        salomi_weight *w = &W[i];
        if (w->kind == SALOMI_W_VQ && (1LL << w->bits) > w->vq_k) { /* a code >= k fits in b bits: plant one */
            /* code 0 := all ones (bits [0, b) of the row), which is >= k */
            uint8_t *c0 = (uint8_t *)w->data, s0 = c0[0], s1 = w->bits > 8 ? c0[1] : 0;
            c0[0] |= (uint8_t)((1u << (w->bits < 8 ? w->bits : 8)) - 1u);
            if (w->bits > 8) c0[1] |= (uint8_t)((1u << (w->bits - 8)) - 1u);
            CHECK(salomi_engine_create(&c, W, norms, err, sizeof err) == NULL && strstr(err, "vq code"),
                  "case %d: vq code >= k accepted", cs);
            c0[0] = s0;
            if (w->bits > 8) c0[1] = s1;
            break;
        }
        if (w->lr_rank) {
            const int32_t saved = w->lr_rank;
            w->lr_rank = (int32_t)(w->out < w->in ? w->out : w->in) + 1;
            CHECK(salomi_engine_create(&c, W, norms, err, sizeof err) == NULL && strstr(err, "low-rank"),
                  "case %d: low rank above min(out, in) accepted", cs);
            w->lr_rank = saved;
            break;
        }
        if (w->kind == SALOMI_W_GRID && w->perm) {
            int32_t *p = (int32_t *)w->perm, saved = p[0];
            p[0] = (int32_t)w->in;
            CHECK(salomi_engine_create(&c, W, norms, err, sizeof err) == NULL, "case %d: bad perm accepted", cs);
            p[0] = saved;
            break;
        }
    }
    free(pre), free(dec), free(ref);
    for (int64_t i = 0; i < nw; i++) free_owned(&own_w[i]);
    free(own_w), free(W);
    free_owned(&own_n), free_owned(&own_inv);
}

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
__attribute__((target("f16c"))) static uint16_t f2h_hw(float f) {
    return (uint16_t)_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
#endif

/* salomi_f2h (the half KV cache's store) against F16C on edge values and random bit patterns,
 * and the round trip through salomi_h2f for every half. */
static void check_f2h(void) {
    for (uint32_t h = 0; h < 65536; h++) {
        float f = salomi_h2f((uint16_t)h);
        uint16_t back = salomi_f2h(f);
        int nan = (h & 0x7c00) == 0x7c00 && (h & 0x3ff);
        CHECK(nan ? (back & 0x7c00) == 0x7c00 && (back & 0x3ff) : back == h, "f2h(h2f(%04x)) = %04x", h, back);
    }
#if defined(__x86_64__) || defined(__i386__)
    if (salomi_cpu_isa() >= SALOMI_ISA_AVX2) {
        static const float edge[] = {65504.0f, 65519.99f, 65520.0f, 1e30f, 5.96046448e-8f, 2.98023224e-8f,
                                     2.98023225e-8f, 6.09755516e-5f, 6.10351562e-5f, 1.0f + 1.0f / 2048, -0.0f};
        for (size_t i = 0; i < sizeof edge / sizeof edge[0]; i++)
            CHECK(salomi_f2h(edge[i]) == f2h_hw(edge[i]), "f2h(%g) = %04x, F16C %04x", edge[i], salomi_f2h(edge[i]),
                  f2h_hw(edge[i]));
        for (int i = 0; i < 2000000; i++) {
            uint32_t u = rnd();
            float f;
            memcpy(&f, &u, 4);
            if (f != f) continue; /* NaN payloads differ by design */
            CHECK(salomi_f2h(f) == f2h_hw(f), "f2h(%a) = %04x, F16C %04x", f, salomi_f2h(f), f2h_hw(f));
        }
    }
#endif
}

/* The int8 table kernel on rows wide and tall enough for its 8-group (256-row) paths, sign
 * (nibble codes, a page or more per group half) and ternary: every ISA gives the scalar bits, and
 * the exact-size il buffer is never read past (ASan). */
static void check_tables_wide(void) {
    static const int64_t shapes[][3] = {{SALOMI_W_SIGN, 264, 2048}, {SALOMI_W_SIGN, 300, 4104},
                                        {SALOMI_W_TERNARY, 300, 2050}};
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        const int kind = (int)shapes[s][0];
        const int64_t out = shapes[s][1], in = shapes[s][2], rb = kind == SALOMI_W_SIGN ? in / 8 : (in + 4) / 5;
        uint8_t *data = malloc((size_t)(out * rb)), *il = malloc((size_t)salomi_tables_bytes(kind, out, in));
        uint16_t *scale = malloc(sizeof(uint16_t) * (size_t)out);
        float *x = malloc(sizeof(float) * (size_t)in), *ref = malloc(sizeof(float) * (size_t)out),
              *y = malloc(sizeof(float) * (size_t)out);
        for (int64_t i = 0; i < out * rb; i++) data[i] = (uint8_t)(kind == SALOMI_W_SIGN ? rnd() : rnd() % 243);
        for (int64_t i = 0; i < out; i++) scale[i] = salomi_f2h(0.5f + 0.5f * frand());
        for (int64_t i = 0; i < in; i++) x[i] = frand();
        CHECK(salomi_tables_ok(kind, in, in) && salomi_tables_layout(kind, data, out, in, il) == 0, "tables %zu", s);
        for (int isa = 0; isa <= salomi_cpu_isa(); isa++) {
            salomi_set_isa(isa);
            float *dst = isa ? y : ref;
            CHECK(salomi_tables_matmul(kind, x, 1, in, out, il, scale, dst, 1 + isa % 2) == 0, "tables %zu isa %d", s, isa);
            if (isa) CHECK(memcmp(ref, y, sizeof(float) * (size_t)out) == 0, "tables %zu: isa %d differs from scalar", s, isa);
        }
        salomi_set_isa(-1);
        free(data), free(il), free(scale), free(x), free(ref), free(y);
    }
}

int main(int argc, char **argv) {
    int cases = argc > 1 ? atoi(argv[1]) : 40;
    g_rng = argc > 2 ? (uint64_t)atoll(argv[2]) * 2654435761u + 1 : 1;
    check_f2h();
    check_tables_wide();
    for (int i = 0; i < cases; i++) run_case(i);
    printf("%s: %d cases, %d failures\n", failures ? "FAILED" : "OK", cases, failures);
    return failures ? 1 : 0;
}
