#!/usr/bin/env bash
# Recovery of structured-pruned students by training (issue 17): each run trains a student from
# target/prune (benches/prune_table.sh) on the Gutenberg train books + the Python stdlib corpus
# for a token budget, with one objective, then is evaluated on the full WikiText-2 test split
# (windows of 2048, the reference protocol) and on the Gutenberg validation books (held out).
# Every run resumes from its checkpoint; MINUTES bounds each run's time per invocation, so the
# same command, repeated across sessions, finishes the table.
#   [RUNS="d-cos-6:kd:1M d-cos-6:ce:1M ..."] [MINUTES=60] [EVAL_TOKENS=8192] [WARMUP=20] [SEED=1] bash benches/recovery.sh [OUT_DIR]
# Budgets are tokens with a unit: 1M, 0.5M, 125K. EVAL_TOKENS evaluates only the first tokens of
# each split (e.g. the first 4 windows of 2048, for quick ablations) instead of the full splits.
# Objectives: ce (fine-tune), kd (Minitron: forward KL, T = 1), kdfeat (kd + PHI-S feature
# distillation of four blocks), feat-NORM (kd + feature distillation with normaliser NORM),
# kd-adapters (kd into the low-rank adapters alone, the rest frozen).
# A student is a name in target/prune or a path to any model: a one-shot 2:4 model keeps its
# zeros while it trains (e.g. target/maskllm/sparsegpt-oneshot from benches/maskllm.sh), and an
# int4 model with EoRA adapters trains its adapters by KD, against EoRA alone (the student
# untrained): target/compression/rtn-int4-eora-r64 from
# `ONLY="rtn-int4 rtn-int4-eora-r64" bash benches/compression_table.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-target/recover}
PRUNED=${PRUNED:-target/prune}
MINUTES=${MINUTES:-60}
RUNS=${RUNS:-"d-cos-6:kd:1M d-cos-6:ce:1M w-ffn-896:kd:1M w-ffn-896:ce:1M"}
mkdir -p "$OUT"
if [ -z "${W:-}" ]; then cargo build --release -q; W=target/release/whittle; fi
M=$("$W" fetch)
DATA=(--data ../shared/data/gutenberg --data ../shared/data/code/python-stdlib-3.12.1.py.txt)
COMMON=(--batch 4 --accum 2 --seq-len 512 --lr 2e-4 --min-lr 2e-5 --warmup "${WARMUP:-20}" --eval-every 61
        --eval-tokens 16384 --ckpt-every 10 ${SEED:+--seed "$SEED"})
TEST=../shared/reference/wikitext2-test.txt
BOOKS=$OUT/gutenberg-valid.txt
[ -f "$BOOKS" ] || (cd ../shared/data/gutenberg && cat $(cat valid.list)) > "$BOOKS"
for run in $RUNS; do
  IFS=: read -r student objective budget <<< "$run"
  tokens=$(awk -v b="$budget" 'BEGIN { n = b + 0; u = substr(b, length(b));
    if (u == "M") n *= 1e6; else if (u == "K") n *= 1e3; else { print "bad budget " b > "/dev/stderr"; exit 2 }
    printf "%d", n }')
  case $objective in
    ce) loss=(--loss ce) ;;
    kd) loss=(--loss kd) ;;
    kdfeat) loss=(--loss kd --features 5,11,17,23:phis) ;;
    feat-*) loss=(--loss kd --features "5,11,17,23:${objective#feat-}") ;;
    kd-adapters) loss=(--loss kd --adapters-only) ;;
    *) echo "unknown objective $objective"; exit 2 ;;
  esac
  case $student in */*) src=$student ;; *) src=$PRUNED/$student ;; esac
  name=$(basename "$student")-$objective-$budget${SEED:+-seed$SEED}
  if [ ! -f "$OUT/$name/summary.json" ]; then
    nice "$W" distill --teacher "$M" --student "$src" "${DATA[@]}" --tokens "$tokens" \
      "${loss[@]}" "${COMMON[@]}" --max-minutes "$MINUTES" --out "$OUT/$name" >> "$OUT/$name.log" 2>&1
  fi
  [ -f "$OUT/$name/summary.json" ] || { echo "$name: unfinished (run again)"; continue; }
  tag=${EVAL_TOKENS:+-$EVAL_TOKENS}
  for ev in test:"$TEST" books:"$BOOKS"; do
    [ -f "$OUT/$name.${ev%%:*}$tag.json" ] || "$W" eval ppl --model "$OUT/$name/model" --data "${ev#*:}" \
      --seq-len 2048 ${EVAL_TOKENS:+--max-tokens "$EVAL_TOKENS"} --json "$OUT/$name.${ev%%:*}$tag.json" > /dev/null 2>&1
  done
  python3 - "$OUT" "$name" "$tag" <<'PY'
import json, sys
out, name, tag = sys.argv[1:]
ppl = lambda s: json.load(open(f"{out}/{name}.{s}{tag}.json"))["report"]["ppl"]
print(f"{name:<28} WikiText-2 test {ppl('test'):8.2f}   Gutenberg valid {ppl('books'):8.2f}")
PY
done
