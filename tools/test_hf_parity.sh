#!/usr/bin/env bash
# CI test: transformers loads whittle's exports of a tiny random Llama (`whittle init --size
# tiny`) — as initialised, width-pruned (hidden, FFN and heads per KV group at once) and
# depth-pruned — and computes the same logits on 64 tokens (max |diff| ≤ 1e-3 and ≤ 1e-4 of the
# largest logit); an export with a missing sublayer (marked `whittle_llama`) must be refused.
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
prune() { # name, flags...
  local name=$1; shift
  "$W" prune --model "$OUT/tiny" --scores "$OUT/scores.json" "$@" --out "$OUT/$name" > /dev/null 2>&1
}
prune width --hidden 24 --ffn 48 --heads-per-group 1
prune depth --drop-layers 1
prune no-attn --drop-attn 1
"$PY" benches/hf_parity.py --whittle "$W" --rel-tolerance 1e-4 \
  "$OUT"/{tiny,width,depth,no-attn}
