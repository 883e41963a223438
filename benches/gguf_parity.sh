#!/usr/bin/env bash
# Does llama.cpp compute what whittle computes on whittle's GGUF exports? Builds llama.cpp's
# library (benches/llamacpp_build.sh) and benches/llamacpp_logits.cpp against it, exports the
# default model and pruned variants as f32 GGUF — plain Llama ones and per-layer (`deci`) ones
# with attention sublayers removed — and compares the logits of 64 positions
# (benches/gguf_parity.py). f32 files, because llama.cpp multiplies quantized blocks by 8-bit
# activations (a Q4_1 file differs by ~1 in the logits for that reason alone).
#   [W=bin] bash benches/gguf_parity.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-target/gguf-parity}
mkdir -p "$OUT"
if [ -z "${W:-}" ]; then cargo build --release -q; W=target/release/whittle; fi
# shellcheck source=benches/llamacpp_build.sh
source benches/llamacpp_build.sh
if [ "$(uname -m)" = x86_64 ]; then
  # shellcheck disable=SC2086
  llamacpp_build avx2 llama $llamacpp_x86_flags -DGGML_AVX512=OFF -DGGML_AVX_VNNI=OFF
  B=target/llama.cpp/build-avx2
else
  llamacpp_build native llama -DGGML_NATIVE=ON
  B=target/llama.cpp/build-native
fi
TOOL=$OUT/llamacpp_logits
g++ -O2 -std=c++17 -I"$SRC/include" -I"$SRC/ggml/include" benches/llamacpp_logits.cpp \
  "$B/src/libllama.a" "$B/ggml/src/libggml.a" "$B/ggml/src/libggml-cpu.a" \
  "$B/ggml/src/libggml-base.a" -lpthread -fopenmp -ldl -o "$TOOL"
S=$OUT/scores.json
[ -f "$S" ] || "$W" importance --calib-samples 8 --out "$S" > "$OUT/importance.log" 2>&1
variant() { # name, prune flags...
  local name=$1; shift
  [ -f "$OUT/$name.gguf" ] && return 0
  "$W" prune --scores "$S" "$@" --out "$OUT/$name" > "$OUT/$name.log" 2>&1
  "$W" convert --model "$OUT/$name" --out "$OUT/$name.gguf" >> "$OUT/$name.log" 2>&1
}
[ -f "$OUT/dense.gguf" ] || "$W" convert --out "$OUT/dense.gguf" > /dev/null 2>&1
variant d-cos-6 --drop-layers 6 --metric cosine
variant width-25 --hidden 384 --ffn 1024 --heads-per-group 2
variant attn-6 --drop-attn 6 --metric cosine
variant attn-6-ffn-1024 --drop-attn 6 --ffn 1024
python3 benches/gguf_parity.py --tool "$TOOL" --whittle "$W" \
  "$OUT"/{dense,d-cos-6,width-25,attn-6,attn-6-ffn-1024}.gguf
