#!/usr/bin/env bash
# Speed of whittle next to the reference PyTorch harness, measured back to back on this machine
# so that the ratios are meaningful.
#
#   bash benches/compare_baselines.sh [OUT_DIR]     (venv: see benches/harness_env.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-target/compare}
source benches/harness_env.sh
$W --threads "$THREADS" bench --reps 3 --json "$OUT/whittle.json"
# The same model with its matrices rounded to bf16 (the tile path then needs 3 piece products
# per f32 product instead of 5); its perplexity is in BENCHMARKS.md next to the speed.
[ -f "$OUT/smollm-bf16.gguf" ] || $W convert --dtype bf16 --out "$OUT/smollm-bf16.gguf"
$W --threads "$THREADS" bench --model "$OUT/smollm-bf16.gguf" --reps 3 --json "$OUT/whittle-bf16.json"
( cd ../shared/reference/harness && "$VENV/bin/python" bench.py --threads "$THREADS" --reps 3 --no-hf --out "$ABS_OUT/torch.json" )
