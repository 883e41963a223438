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
( cd ../shared/reference/harness && "$VENV/bin/python" bench.py --threads "$THREADS" --reps 3 --no-hf --out "$ABS_OUT/torch.json" )
