#!/usr/bin/env bash
# Structured pruning of the default model (issue 16): importance scores once, then every pruned
# variant of the BENCHMARKS table, each evaluated on the first 4 windows of 2048 tokens of
# wikitext2-test.txt (the reference's slice). Resumable: a variant whose JSON exists is skipped.
#   [SAMPLES=128] [W=bin] bash benches/prune_table.sh [OUT_DIR]          # build + perplexity
#   FULL="d-cos-6 ..." bash benches/prune_table.sh OUT_DIR                # + full test split
#   SPEED="d-cos-6 ..." bash benches/prune_table.sh OUT_DIR               # + speed, same run
# SKIP_BUILD=1 skips building and evaluating variants (only FULL / SPEED).
# SPEED benchmarks the dense model (f32 HF folder) and the named variants one after another
# (prefill 512/2048 and decode on f32 weights) and prints speed-up against FLOP reduction.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-target/prune}
SAMPLES=${SAMPLES:-128}
mkdir -p "$OUT"
if [ -z "${W:-}" ]; then cargo build --release -q; W=target/release/whittle; fi
TEST=../shared/reference/wikitext2-test.txt
EVAL=(--eval "$TEST" --eval-max-tokens "${EVAL_TOKENS:-8192}")
CAL=(--calib ../shared/reference/wikitext2-valid.txt --calib-samples "$SAMPLES" --calib-len 2048 --seed 0)
S=$OUT/scores.json
[ -f "$S" ] || "$W" importance "${CAL[@]}" --shapley-samples "${SHAPLEY_SAMPLES:-32}" --out "$S" \
  > "$OUT/importance.log" 2>&1
run() { # name, prune flags...
  local name=$1; shift
  [ -f "$OUT/$name.json" ] && return 0
  rm -rf "${OUT:?}/$name"
  /usr/bin/time -v "$W" prune --scores "$S" "$@" "${EVAL[@]}" --out "$OUT/$name" \
    --json "$OUT/$name.json" > "$OUT/$name.log" 2>&1 || { echo "$name failed, see $OUT/$name.log"; return 1; }
  grep -E "perplexity .* ->|^parameters" "$OUT/$name.log" | tr '\n' ' ' | sed "s/^/$name: /"; echo
}
if [ -z "${SKIP_BUILD:-}" ]; then
for k in 3 6 9; do
  run "d-cos-$k" --drop-layers $k --metric cosine
  run "attn-$k" --drop-attn $k --metric cosine
  run "mlp-$k" --drop-mlp $k --metric cosine
done
for m in angular shapley loo; do
  for k in 3 6; do run "d-$m-$k" --drop-layers $k --metric $m; done
done
for k in 3 6; do run "d-cos-$k-linear" --drop-layers $k --metric cosine --emulate linear "${CAL[@]}"; done
run attn-6-linear --drop-attn 6 --metric cosine --emulate linear "${CAL[@]}"
run w-ffn-896 --ffn 896
run w-ffn-256 --ffn 256
run w-hidden-448 --hidden 448
run w-hidden-320 --hidden 320
run w-heads-2 --heads-per-group 2
run w-heads-1 --heads-per-group 1
SEARCH=(--calib ../shared/reference/wikitext2-valid.txt --calib-samples 4 --calib-len 512 --seed 0)
run auto-101M --target-params 101M "${SEARCH[@]}"
run auto-67M --target-params 67M "${SEARCH[@]}"
run d-cos-9-eq --drop-layers 9 --metric cosine      # depth at the parameters of auto-101M
run d-cos-19-eq --drop-layers 19 --metric cosine    # ... and of auto-67M
for e in lowrank:64 bias; do
  for k in 3 6; do run "d-cos-$k-${e/:/}" --drop-layers $k --metric cosine --emulate "$e" "${CAL[@]}"; done
done

fi

for name in ${FULL:-}; do
  [ -f "$OUT/$name.full.json" ] && continue
  m=$OUT/$name; [ "$name" = dense ] && m=$("$W" fetch)
  "$W" eval ppl --model "$m" --data "$TEST" --seq-len 2048 --json "$OUT/$name.full.json" \
    > "$OUT/$name.full.log" 2>&1
done

[ -n "${SPEED:-}" ] || exit 0
[ -d "$OUT/dense-f32" ] || "$W" convert --out "$OUT/dense-f32" > /dev/null 2>&1
for name in dense-f32 $SPEED; do
  "$W" bench --model "$OUT/$name" --prefill 512,2048 --reps "${REPS:-3}" \
    --json "$OUT/$name.speed.json" > "$OUT/$name.speed.log" 2>&1
  "$W" inspect --model "$OUT/$name" --json "$OUT/$name.inspect.json" > /dev/null 2>&1
done
python3 - "$OUT" dense-f32 $SPEED <<'PY'
import json, sys
out, names = sys.argv[1], sys.argv[2:]

def flops(inspect, ctx):
    """FLOPs per token: 2 per weight of every product (the tied head included, the embedding
    lookup not), plus attention scores and values over ctx/2 keys on average."""
    p = inspect["parameters"]
    linear = inspect["total_parameters"] - p.get("norms", 0)
    attn = sum(4 * (ctx / 2) * l["attn"]["n_heads"] * l["attn"]["head_dim"]
               for l in inspect["layers"] if l.get("attn"))
    return 2 * linear + attn

rows = {}
for n in names:
    s = json.load(open(f"{out}/{n}.speed.json"))
    i = json.load(open(f"{out}/{n}.inspect.json"))
    speeds = {r["whittle"]["what"]: r["whittle"]["tokens_per_s"] for r in s["rows"]}
    rows[n] = (i, speeds)
base_i, base_s = rows["dense-f32"]
print(f"CPU {json.load(open(f'{out}/dense-f32.speed.json'))['cpu']}")
print("| model | params (M) | measure | tok/s | dense tok/s | speed-up | FLOP reduction | ratio |")
print("|---|---|---|---|---|---|---|---|")
for n in names:
    i, s = rows[n]
    for what, v in s.items():
        ctx = 2048 if "2048" in what else (512 if "512" in what else 256)
        fr = flops(base_i, ctx) / flops(i, ctx)
        sp = v / base_s[what]
        print(f"| {n} | {i['total_parameters'] / 1e6:.1f} | {what} | {v:.1f} | {base_s[what]:.1f} "
              f"| {sp:.2f}x | {fr:.2f}x | {sp / fr:.2f} |")
PY
