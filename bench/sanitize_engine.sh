#!/usr/bin/env bash
# Build salomi/runtime/csrc/engine.c (+ kernels.c, lut.c) with AddressSanitizer + UBSan together
# with the pure-C engine driver (test_engine_main.c) and run random tiny Llama shapes with
# every weight kind on every ISA: prefill == token-by-token decode, scalar == SIMD, and
# malformed weights refused. Buffers are exact-size mallocs, so any out-of-bounds read is
# reported. Exit status 0 = clean.
#
# Usage: bench/sanitize_engine.sh [cases] [seed]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
src="$here/salomi/runtime/csrc"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
CC="${CC:-gcc}"
"$CC" -std=gnu11 -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=all \
    -Wall -Wextra -Werror -pthread \
    "$src/engine.c" "$src/kernels.c" "$src/lut.c" "$src/test_engine_main.c" -o "$out/test_engine" -lm
# detect_leaks: the thread pool's detached workers are intentionally never joined.
ASAN_OPTIONS="detect_leaks=1:abort_on_error=1" UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1" \
    "$out/test_engine" "${1:-40}" "${2:-1}"
