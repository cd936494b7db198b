#!/usr/bin/env bash
# Build the C runtime with AddressSanitizer + UBSan together with one of its pure-C drivers and run it.
# Buffers are exact-size mallocs, so any out-of-bounds read is reported. Exit status 0 = clean.
#   kernels: kernels.c + lut.c + test_kernels_main.c: random shapes of every format on every ISA the CPU
#            has, against a naive double-precision reference.      args: [cases_per_isa=300] [seed=1]
#   engine:  engine.c + kernels.c + lut.c + test_engine_main.c: random tiny Llama shapes with every weight
#            kind on every ISA: prefill == token-by-token decode, scalar == SIMD, malformed weights
#            refused.                                                args: [cases=40] [seed=1]
# Usage: bench/sanitize.sh {kernels|engine} [cases] [seed]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
src="$here/salomi/runtime/csrc"
case "${1:-}" in
  kernels) files=("$src/kernels.c" "$src/lut.c" "$src/test_kernels_main.c"); cases="${2:-300}" ;;
  engine) files=("$src/engine.c" "$src/kernels.c" "$src/lut.c" "$src/test_engine_main.c"); cases="${2:-40}" ;;
  *) echo "usage: bench/sanitize.sh {kernels|engine} [cases] [seed]" >&2; exit 2 ;;
esac
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
CC="${CC:-gcc}"
"$CC" -std=gnu11 -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=all \
    -Wall -Wextra -Werror -pthread "${files[@]}" -o "$out/driver" -lm
# detect_leaks: the thread pool's detached workers are intentionally never joined.
ASAN_OPTIONS="detect_leaks=1:abort_on_error=1" UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1" \
    "$out/driver" "$cases" "${3:-1}"
