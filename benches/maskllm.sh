#!/usr/bin/env bash
# MaskLLM 2:4 on SmolLM2-135M (issue 18): masks learned on frozen weights from each prior, the
# curve "validation PPL of the argmax mask vs tokens trained" of every run, and the finished
# masks on WikiText-2 test (first 4 × 2048 tokens and the full split, windows of 2048) against
# SparseGPT 2:4 with its weight update. Every run resumes from its checkpoint; MINUTES bounds
# each run per invocation, so the same command, repeated across sessions, finishes the table.
#   [PRIORS="sparsegpt wanda magnitude none"] [TOKENS=500000] [MINUTES=60] [W=whittle]
#   bash benches/maskllm.sh [OUT_DIR]
# Training text: the Gutenberg train books and WikiText-2 validation (the calibration split);
# validation during training: 16,384 tokens of the Gutenberg validation books, windows of 512.
# One-shot priors (SparseGPT, Wanda) calibrate on 128 × 2048 WikiText-2 validation windows.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-target/maskllm}
PRIORS=${PRIORS:-"sparsegpt wanda magnitude none"}
TOKENS=${TOKENS:-500000}
MINUTES=${MINUTES:-60}
mkdir -p "$OUT"
if [ -z "${W:-}" ]; then cargo build --release -q; W=target/release/whittle; fi
TEST=../shared/reference/wikitext2-test.txt
VALID=../shared/reference/wikitext2-valid.txt
BOOKS=$OUT/gutenberg-valid.txt
[ -f "$BOOKS" ] || (cd ../shared/data/gutenberg && cat $(cat valid.list)) > "$BOOKS"

# The one-shot line: SparseGPT 2:4 with its weight update.
[ -d "$OUT/sparsegpt-oneshot" ] || nice "$W" sparsify --method sparsegpt --pattern 2:4 \
  --calib "$VALID" --calib-samples 128 --out "$OUT/sparsegpt-oneshot" >> "$OUT/oneshot.log" 2>&1

# WikiText-2 test (first 4 windows, full split) and the validation slice of the curves.
evaluate() {
  local model=$1 name=$2
  [ -f "$OUT/$name.test4.json" ] || "$W" eval ppl --model "$model" --data "$TEST" --seq-len 2048 \
    --max-tokens 8192 --json "$OUT/$name.test4.json" > /dev/null 2>&1
  [ -f "$OUT/$name.test.json" ] || "$W" eval ppl --model "$model" --data "$TEST" --seq-len 2048 \
    --json "$OUT/$name.test.json" > /dev/null 2>&1
  [ -f "$OUT/$name.books.json" ] || "$W" eval ppl --model "$model" --data "$BOOKS" --seq-len 512 \
    --max-tokens 16384 --json "$OUT/$name.books.json" > /dev/null 2>&1
  python3 - "$OUT" "$name" <<'PY'
import json, sys
out, name = sys.argv[1:]
ppl = lambda s: json.load(open(f"{out}/{name}.{s}.json"))["report"]["ppl"]
print(f"{name:<24} WikiText-2 test 4×2048 {ppl('test4'):9.2f}  full {ppl('test'):9.2f}"
      f"   Gutenberg-valid 16k {ppl('books'):9.2f}")
PY
}
evaluate "$OUT/sparsegpt-oneshot" sparsegpt-oneshot
ONESHOT=$(python3 -c "import json; print(json.load(open('$OUT/sparsegpt-oneshot.books.json'))['report']['ppl'])")

RUNS=()
for prior in $PRIORS; do
  name=$prior-$((TOKENS / 1000))k
  if [ ! -f "$OUT/$name/summary.json" ]; then
    nice "$W" sparsify --method maskllm --pattern 2:4 --prior "$prior" \
      --calib "$VALID" --calib-samples 128 \
      --data ../shared/data/gutenberg --data "$VALID" --tokens "$TOKENS" \
      --eval-every 15 --max-minutes "$MINUTES" --out "$OUT/$name" >> "$OUT/$name.log" 2>&1 || true
  fi
  if [ -f "$OUT/$name/summary.json" ]; then
    evaluate "$OUT/$name/model" "$name"
  else
    echo "$name: unfinished (run again)"
  fi
  [ -d "$OUT/$name" ] && RUNS+=(--run "$OUT/$name")
done
[ ${#RUNS[@]} -gt 0 ] && "$W" plot "${RUNS[@]}" \
  --reference "SparseGPT 2:4 (one-shot, with update)=$ONESHOT" --out "$OUT/curves.svg"
