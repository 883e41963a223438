#!/usr/bin/env bash
# Speed of whittle next to the reference PyTorch harness (and llama.cpp through llama-cpp-python
# when installed), measured back to back on this machine so that the ratios are meaningful.
#
#   python3 -m venv /tmp/venv && /tmp/venv/bin/pip install torch numpy gguf transformers
#   /tmp/venv/bin/pip install llama-cpp-python        # optional: builds llama.cpp (~10 min)
#   bash benches/compare_baselines.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-target/compare}
VENV=${VENV:-/tmp/venv}
THREADS=${THREADS:-2}
mkdir -p "$OUT"
ABS_OUT=$(cd "$OUT" && pwd)
cargo build --release -q
W=target/release/whittle
GGUF=$($W fetch)
$W --threads "$THREADS" bench --reps 3 --json "$OUT/whittle.json"
export SMOLLM_GGUF="$GGUF" REFS_CACHE="$OUT/refs-cache"
( cd ../shared/reference/harness && "$VENV/bin/python" bench.py --threads "$THREADS" --reps 3 --no-hf --out "$ABS_OUT/torch.json" )
if "$VENV/bin/python" -c "import llama_cpp" 2>/dev/null; then
  [ -f "$OUT/smollm-f32.gguf" ] || $W convert --out "$OUT/smollm-f32.gguf"
  "$VENV/bin/python" benches/llamacpp_bench.py --model "$OUT/smollm-f32.gguf" --gguf-q41 "$GGUF" \
    --threads "$THREADS" --out "$OUT/llamacpp.json"
fi
