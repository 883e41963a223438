#!/usr/bin/env bash
# Speed of whittle next to the reference PyTorch harness, measured back to back on this machine
# so that the ratios are meaningful.
#
#   python3 -m venv /tmp/venv && /tmp/venv/bin/pip install torch numpy gguf transformers
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
