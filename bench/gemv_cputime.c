/* Single-thread GEMV capacity of the packed kernels, meant to be timed by CPU time so
 * other jobs on a shared machine do not distort it:
 *
 *   gcc -O3 -std=gnu11 -pthread -Isalomi/runtime/csrc bench/gemv_cputime.c \
 *       salomi/runtime/csrc/kernels.c salomi/runtime/csrc/lut.c -o /tmp/gemv_cputime -lm
 *   perf stat -e task-clock /tmp/gemv_cputime KIND OUT IN GROUP REPS
 *
 * G weights/s = OUT * IN * REPS / task-clock. KIND: 0 sign float, 1 sign int8,
 * 2 ternary float, 3 ternary int8, 4 grid2 float, 5 grid2 int8. Random bytes (every
 * byte < 243, valid for all three formats), scales 1.0, zero points 1.0, G divides IN. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "kernels.h"

int main(int argc, char **argv) {
    if (argc < 6) {
        fprintf(stderr, "usage: %s KIND OUT IN GROUP REPS\n", argv[0]);
        return 2;
    }
    const int kind = atoi(argv[1]), reps = atoi(argv[5]);
    const int64_t out = atoll(argv[2]), in = atoll(argv[3]), G = atoll(argv[4]);
    uint8_t *w = malloc((size_t)(out * ((in + 3) / 4)));        /* the largest row (2-bit codes) */
    uint16_t *sc = malloc(sizeof(uint16_t) * (size_t)(out * (in / G)));
    float *x = malloc(sizeof(float) * (size_t)in), *y = malloc(sizeof(float) * (size_t)out);
    if (!w || !sc || !x || !y || G < 1 || in % G) return 2;
    for (int64_t i = 0; i < out * ((in + 3) / 4); i++) w[i] = (uint8_t)(rand() % 243);
    for (int64_t i = 0; i < out * (in / G); i++) sc[i] = 0x3c00;
    for (int64_t i = 0; i < in; i++) x[i] = (float)rand() / (float)RAND_MAX - 0.5f;
    int rc = 0;
    for (int r = 0; r < reps && rc == 0; r++) {
        switch (kind) {
        case 0: rc = salomi_sign_matmul(x, 1, in, out, w, sc, G, y, 1); break;
        case 1: rc = salomi_sign_matmul_i8(x, 1, in, out, w, sc, G, y, 1); break;
        case 2: rc = salomi_ternary_matmul(x, 1, in, out, w, sc, G, y, 1); break;
        case 3: rc = salomi_ternary_matmul_i8(x, 1, in, out, w, sc, G, y, 1); break;
        case 4: rc = salomi_grid_matmul(x, 1, in, out, w, 2, sc, sc, G, NULL, y, 1); break;
        default: rc = salomi_grid_matmul_i8(x, 1, in, out, w, 2, sc, sc, G, NULL, y, 1); break;
        }
    }
    if (rc != 0) fprintf(stderr, "kernel returned %d\n", rc);
    return rc != 0;
}
