#!/usr/bin/env bash
# Issue #5's end-to-end speed table in one run: llama.cpp's files (built, imatrix'd on the same
# Austen 16 x 512 tokens SALOMI calibrates on, requantized: skipped when already there) under
# llama-bench, then `salomi bench` on the given .salomi files (float32 torch baseline, engine
# runtime) reading those llama-bench rows, so every ratio comes from back-to-back measurements.
# ROUNDS=N (default 5): every row, llama-bench's included (one repetition each), is measured once
# per round, rounds back to back, and the table gives medians: a slow spell of this shared VM
# hits every row alike instead of deciding one ratio.
# Usage: [ROUNDS=5] [RUNTIMES=engine,engine-int8] bench/speed.sh OUT.json FILE.salomi...
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="$ROOT/.venv/bin/python"
OUT="$1"; shift
[ "$#" -ge 1 ] || { echo "usage: bench/speed.sh OUT.json FILE.salomi..." >&2; exit 2; }
TYPES="Q4_1 TQ1_0 IQ1_M IQ2_XXS"
"$PY" "$ROOT/bench/llamacpp.py" build
"$PY" "$ROOT/bench/llamacpp.py" imatrix --chunks 16 --ctx 512
"$PY" "$ROOT/bench/llamacpp.py" quantize --types $TYPES --no-variants
"$ROOT/.venv/bin/salomi" bench "$@" --runtimes "${RUNTIMES:-engine}" --new-tokens 128 --threads 2 \
  --rounds "${ROUNDS:-5}" --llamacpp "$ROOT/runs/llamacpp/bench.json" --json "$OUT" \
  --llamacpp-cmd "'$PY' '$ROOT/bench/llamacpp.py' bench --bench-types $TYPES --threads 2 --reps 1"
