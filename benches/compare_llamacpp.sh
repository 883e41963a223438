#!/usr/bin/env bash
# whittle next to llama.cpp on the same GGUF files, back to back on this machine, at every SIMD
# level this CPU runs. llama.cpp is built from the vendored tree of the PyPI `llama-cpp-python`
# sdist (the registries are all this workplace reaches), twice: `native` (-DGGML_NATIVE=ON, the
# CPU's widest set, AVX-512 and AMX where present) and `avx2` (AVX2 + FMA + F16C only), so that
# whittle forced to `avx2` meets a llama.cpp restricted the same way.
#
#   bash benches/compare_llamacpp.sh [OUT_DIR]
#
# Writes OUT_DIR/llama-<build>-<dtype>.json (llama-bench pp512 / tg128) and
# OUT_DIR/whittle-<level>-<dtype>.json (`whittle bench`), and prints one table. Builds are kept
# in target/llama.cpp/ (a rerun skips them; ~6 min each on 2 cores). THREADS (default 2),
# LLAMA_CPP_PYTHON (the sdist version, default 0.3.36), DTYPES (default f32 f16 q8_0 q4_0 q4_1),
# LEVELS (default: every level `whittle bench --levels` lists) can be set.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-target/compare-llamacpp}
THREADS=${THREADS:-2}
VERSION=${LLAMA_CPP_PYTHON:-0.3.36}
DTYPES=${DTYPES:-f32 f16 q8_0 q4_0 q4_1}
mkdir -p "$OUT" target/llama.cpp
cargo build --release -q
W=target/release/whittle

# --- llama.cpp ---------------------------------------------------------------------------------
SRC=target/llama.cpp/llama_cpp_python-$VERSION/vendor/llama.cpp
if [ ! -d "$SRC" ]; then
  dl=$(mktemp -d)
  python3 -m pip download --no-deps --no-binary llama-cpp-python "llama-cpp-python==$VERSION" -d "$dl" >&2
  tar xzf "$dl"/llama_cpp_python-"$VERSION".tar.gz -C target/llama.cpp
  rm -rf "$dl"
fi
command -v cmake >/dev/null || python3 -m pip install -q cmake
build() { # name, cmake flags...
  local name=$1; shift
  local dir=target/llama.cpp/build-$name
  [ -x "$dir/bin/llama-bench" ] && return
  cmake -S "$SRC" -B "$dir" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DGGML_OPENMP=ON "$@" >&2
  cmake --build "$dir" --target llama-bench -j "$(nproc)" >&2
}
build native -DGGML_NATIVE=ON
build avx2 -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
  -DGGML_BMI2=ON -DGGML_AVX512=OFF -DGGML_AVX_VNNI=OFF

# --- the same GGUF files for both --------------------------------------------------------------
GGUF=$($W fetch)
for d in $DTYPES; do
  f=$OUT/smollm-$d.gguf
  if [ "$d" = q4_1 ]; then ln -sf "$(realpath "$GGUF")" "$f"; continue; fi  # the file as shipped
  [ -f "$f" ] || $W convert --dtype "$d" --out "$f"
done

# --- back to back ------------------------------------------------------------------------------
LEVELS=${LEVELS:-$($W bench --levels)}
for d in $DTYPES; do
  f=$OUT/smollm-$d.gguf
  for b in native avx2; do
    target/llama.cpp/build-$b/bin/llama-bench -m "$f" -t "$THREADS" -p 512 -n 128 -r 3 -o json \
      > "$OUT/llama-$b-$d.json"
  done
  for l in $LEVELS; do
    WHITTLE_SIMD=$l $W --threads "$THREADS" bench --model "$f" --reps 3 --prefill 512 \
      --json "$OUT/whittle-$l-$d.json" >&2
  done
done
python3 benches/llamacpp_table.py "$OUT"
