#!/usr/bin/env bash
# CI test: transformers loads whittle's exports of a tiny random Llama (`whittle init --size
# tiny`) — as initialised, width-pruned (hidden, FFN and heads per KV group at once) and
# depth-pruned — and of a tiny Mamba (as initialised, and narrowed to a hidden size that divides
# its SSM width), and computes the same logits on 64 tokens (max |diff| ≤ 1e-3 and ≤ 1e-4 of the
# largest logit); exports marked as whittle's own (a missing sublayer; a hidden size that no
# longer divides the SSM width) must be refused.
#   [WHITTLE=bin] [PYTHON=venv/bin/python] bash tools/test_hf_parity.sh
set -euo pipefail
cd "$(dirname "$0")/.."
W=${WHITTLE:-${CARGO_TARGET_DIR:-target}/release/whittle}
PY=${PYTHON:-python3}
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
CAL=(--calib ../shared/reference/wikitext2-valid.txt --calib-samples 4 --calib-len 64)
"$W" init --arch llama --size tiny --out "$OUT/tiny" > /dev/null 2>&1
"$W" importance --model "$OUT/tiny" "${CAL[@]}" --out "$OUT/scores.json" > /dev/null 2>&1
"$W" init --arch mamba --size tiny --out "$OUT/mamba" > /dev/null 2>&1
"$W" importance --model "$OUT/mamba" "${CAL[@]}" --out "$OUT/mamba-scores.json" > /dev/null 2>&1
prune() { # base, name, flags...
  local base=$1 name=$2; shift 2
  local scores=$OUT/scores.json; [ "$base" = mamba ] && scores=$OUT/mamba-scores.json
  "$W" prune --model "$OUT/$base" --scores "$scores" "$@" --out "$OUT/$name" > /dev/null 2>&1
}
prune tiny width --hidden 24 --ffn 48 --heads-per-group 1
prune tiny depth --drop-layers 1
prune tiny no-attn --drop-attn 1
prune mamba mamba-16 --hidden 16
prune mamba mamba-24 --hidden 24
"$PY" benches/hf_parity.py --whittle "$W" --rel-tolerance 1e-4 \
  "$OUT"/{tiny,width,depth,no-attn,mamba,mamba-16,mamba-24}
