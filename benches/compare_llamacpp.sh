#!/usr/bin/env bash
# whittle next to llama.cpp and PyTorch on the same GGUF files, back to back on this machine, at
# every SIMD level this CPU runs. llama.cpp is built from the vendored tree of the PyPI
# `llama-cpp-python` sdist (the registries are all this workplace reaches): on x86 twice, `avx2`
# (AVX2 + FMA + F16C only) and `avx512` (+ AVX-512 F/BW/VBMI/VNNI/BF16), so that whittle forced
# to a level meets a llama.cpp restricted the same way (a -DGGML_NATIVE=ON build segfaulted in
# llama-bench on the AMX machine); on ARM once, native. PyTorch runs the reference harness with
# its own switches set to the level (see `whittle bench --compare`).
#
#   bash benches/compare_llamacpp.sh [OUT_DIR]
#
# Per level L it writes OUT_DIR/L-q4_1.json (prefill 512/2048 with f32 weights, decode from the
# Q4_1 blocks and from f32 weights; PyTorch and llama.cpp beside), OUT_DIR/L-q8_0.json (decode
# from Q8_0 blocks) and OUT_DIR/L-f32.json, L-f16.json (llama.cpp F32/F16 pp512), then prints the
# tables of BENCHMARKS.md. Builds are kept in target/llama.cpp/ (~7 min each on 2 cores); a rerun
# skips what exists. THREADS (default 2), VENV (the harness's venv, default /work/venv; PyTorch
# is skipped without it), LEVELS (default: all this CPU runs) can be set.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-target/compare-llamacpp}
THREADS=${THREADS:-2}
VENV=${VENV:-/work/venv}
mkdir -p "$OUT" target/llama.cpp
cargo build --release -q
W=target/release/whittle

# --- llama.cpp ---------------------------------------------------------------------------------
# shellcheck source=benches/llamacpp_build.sh
source benches/llamacpp_build.sh
if [ "$(uname -m)" = x86_64 ]; then
  # shellcheck disable=SC2086
  llamacpp_build avx2 llama-bench $llamacpp_x86_flags -DGGML_AVX512=OFF -DGGML_AVX_VNNI=OFF
  # shellcheck disable=SC2086
  grep -q avx512bw /proc/cpuinfo && llamacpp_build avx512 llama-bench $llamacpp_x86_flags \
    -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON
else
  llamacpp_build native llama-bench -DGGML_NATIVE=ON
fi

# --- the same GGUF files for both --------------------------------------------------------------
GGUF=$($W fetch)
ln -sf "$(realpath "$GGUF")" "$OUT/smollm-q4_1.gguf"   # the file as shipped
for d in q8_0 f32 f16; do
  [ -f "$OUT/smollm-$d.gguf" ] || $W convert --dtype "$d" --out "$OUT/smollm-$d.gguf" >&2
done

# --- back to back, level by level -------------------------------------------------------------
TORCH=""
[ -x "$VENV/bin/python" ] && TORCH="pytorch,"
for l in ${LEVELS:-$($W bench --levels)}; do
  b() { WHITTLE_SIMD=$l $W --threads "$THREADS" bench --reps 3 --python "$VENV/bin/python" "$@" >&2; }
  [ -f "$OUT/$l-q4_1.json" ] || b --model "$OUT/smollm-q4_1.gguf" --compare "${TORCH}llama.cpp" --json "$OUT/$l-q4_1.json"
  [ -f "$OUT/$l-q8_0.json" ] || b --model "$OUT/smollm-q8_0.gguf" --prefill 512 --compare llama.cpp --json "$OUT/$l-q8_0.json"
  for d in f32 f16; do
    [ -f "$OUT/$l-$d.json" ] || b --model "$OUT/smollm-$d.gguf" --prefill 512 --compare llama.cpp --json "$OUT/$l-$d.json"
  done
done
python3 benches/levels_table.py "$OUT"
