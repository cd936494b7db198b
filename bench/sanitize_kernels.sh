#!/usr/bin/env bash
# Build salomi/runtime/csrc/kernels.c and lut.c (int8 kernels) with AddressSanitizer + UBSan together with the
# pure-C test driver, and run random shapes of every format on every ISA the CPU has
# against a naive double-precision reference. Exit status 0 = clean.
#
# Usage: bench/sanitize_kernels.sh [cases_per_isa] [seed]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
src="$here/salomi/runtime/csrc"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
CC="${CC:-gcc}"
"$CC" -std=gnu11 -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=all \
    -Wall -Wextra -Werror -pthread \
    "$src/kernels.c" "$src/lut.c" "$src/test_kernels_main.c" -o "$out/test_kernels" -lm
# detect_leaks: the thread pool's detached workers are intentionally never joined.
ASAN_OPTIONS="detect_leaks=1:abort_on_error=1" UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1" \
    "$out/test_kernels" "${1:-300}" "${2:-1}"
