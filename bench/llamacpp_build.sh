#!/usr/bin/env bash
# Build llama.cpp's tools from the llama-cpp-python sdist (which vendors llama.cpp).
# Usage: bench/llamacpp_build.sh [CACHE_DIR]   (default: ${SALOMI_CACHE:-~/.cache/salomi}/llamacpp)
# Idempotent: skips everything if the four binaries already exist.
set -euo pipefail
VERSION="${LLAMACPP_PY_VERSION:-0.3.36}"
CACHE="${1:-${SALOMI_CACHE:-$HOME/.cache/salomi}/llamacpp}"
PY="${PYTHON:-$(dirname "$0")/../.venv/bin/python}"
JOBS="${JOBS:-2}"
TARGETS="llama-quantize llama-imatrix llama-perplexity llama-bench"
SRC="$CACHE/llama_cpp_python-$VERSION/vendor/llama.cpp"
BIN="$SRC/build/bin"

all_built() { for t in $TARGETS; do [ -x "$BIN/$t" ] || return 1; done; }
if all_built; then echo "[build] binaries already present in $BIN"; exit 0; fi

mkdir -p "$CACHE"
SDIST="$(ls "$CACHE"/llama_cpp_python-"$VERSION".tar.gz 2>/dev/null || true)"
if [ -z "$SDIST" ]; then
  echo "[build] downloading llama-cpp-python==$VERSION sdist"
  "$PY" -m pip download --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$CACHE"
  SDIST="$(ls "$CACHE"/llama_cpp_python-"$VERSION".tar.gz)"
fi
if [ ! -d "$SRC" ]; then
  echo "[build] extracting $SDIST"
  tar -xzf "$SDIST" -C "$CACHE"
fi
cd "$SRC"
echo "[build] configuring in $SRC/build"
cmake -B build -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DCMAKE_BUILD_TYPE=Release
echo "[build] building $TARGETS with -j$JOBS"
start=$(date +%s)
cmake --build build -j"$JOBS" --target $TARGETS
echo "[build] done in $(( $(date +%s) - start )) s"
all_built && echo "[build] binaries in $BIN"
