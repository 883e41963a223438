#!/usr/bin/env bash
# A training step of the 135M model in whittle next to the reference PyTorch fp32 step
# (../shared/reference/harness/train_step.py: forward over B x T, loss, backward, AdamW, grad
# clipping), back to back on this machine, same batch shape, same thread count.
# Rows: cross-entropy fine-tune; KD with the dense model as an on-the-fly teacher
# (KL at T=2 x T^2 + 0.5 CE); whittle also with bf16x3 tile products (--matmul-precision
# bf16x3, AMX only), at micro-batch 2 x 4 accumulated (same tokens per step) and at each SIMD
# level given in LEVELS.
#
#   bash benches/train_step.sh [OUT_DIR]          (venv: see benches/harness_env.sh)
#   LEVELS="avx2 avx512" BATCH=8 SEQ=512 STEPS=3 bash benches/train_step.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-target/train-step}
BATCH=${BATCH:-8}
SEQ=${SEQ:-512}
STEPS=${STEPS:-3}
LEVELS=${LEVELS:-}
source benches/harness_env.sh
TOKENS=$(( (STEPS + 1) * BATCH * SEQ ))
whittle_step() { # name, level, extra args...
  local name=$1 level=$2; shift 2
  rm -rf "$OUT/$name"
  local env=()
  [ -n "$level" ] && env=(WHITTLE_SIMD="$level")
  env "${env[@]}" /usr/bin/time -f "%M" -o "$OUT/$name.rss" $W --threads "$THREADS" distill \
    --student "$GGUF" --data ../shared/data/gutenberg --seq-len "$SEQ" --tokens "$TOKENS" \
    --eval-tokens "$SEQ" --ckpt-every 0 --out "$OUT/$name" "$@" > "$OUT/$name.log" 2>&1
  python3 - "$OUT/$name" "$name" <<'PY'
import json, statistics, sys
log = json.load(open(sys.argv[1] + "/checkpoint/state.json"))["log"][1:]
rss = int(open(sys.argv[1] + ".rss").read().split()[-1]) / 1024
print(f"{sys.argv[2]:<28} {statistics.median(r['tokens_per_s'] for r in log):8.1f} tok/s  peak RSS {rss:7.0f} MB")
PY
}
for level in "" $LEVELS; do
  tag=${level:-auto}
  whittle_step "ce-b$BATCH-$tag" "$level" --loss ce --batch "$BATCH"
  whittle_step "ce-b$BATCH-bf16x3-$tag" "$level" --loss ce --batch "$BATCH" --matmul-precision bf16x3
  whittle_step "kd-b$BATCH-$tag" "$level" --teacher "$GGUF" --loss kd:T=2+ce:0.5 --batch "$BATCH"
  whittle_step "kd-b2x$((BATCH / 2))-$tag" "$level" --teacher "$GGUF" --loss kd:T=2+ce:0.5 --batch 2 --accum $((BATCH / 2))
done
( cd ../shared/reference/harness
  "$VENV/bin/python" train_step.py --threads "$THREADS" --batch "$BATCH" --seq-len "$SEQ" --steps "$STEPS" --out "$ABS_OUT/torch-ce.json"
  "$VENV/bin/python" train_step.py --threads "$THREADS" --batch "$BATCH" --seq-len "$SEQ" --steps "$STEPS" --kd --out "$ABS_OUT/torch-kd.json" )
