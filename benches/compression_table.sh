#!/usr/bin/env bash
# Reproduces the compression table of shared/reference/README.md with whittle: calibration
# windows from wikitext2-valid.txt (seed 0), evaluation on the first 4 windows of 2048 tokens of
# wikitext2-test.txt. SAMPLES (default 8, the reference's budget) calibration windows of 2048.
# SVD rows run data-free (`--calib-samples 0`: same adapters, per-layer errors reported in
# weight space instead of on calibration inputs). FULL=1 then evaluates every
# output (and the dense model) on the whole test split at seq 2048 (`OUT/NAME.full.json`).
# W=path runs that whittle binary instead of building target/release/whittle (so that a long run
# is not switched to a binary rebuilt while it goes on). ONLY="name ..." builds only those rows
# (a compensated row needs its base named too).
#   [SAMPLES=128] [FULL=1] [W=bin] [ONLY="..."] bash benches/compression_table.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-target/compression}
SAMPLES=${SAMPLES:-8}
mkdir -p "$OUT"
if [ -z "${W:-}" ]; then cargo build --release -q; W=target/release/whittle; fi
EVAL=(--eval ../shared/reference/wikitext2-test.txt --eval-max-tokens "${EVAL_TOKENS:-8192}")
calib() { echo --calib ../shared/reference/wikitext2-valid.txt --calib-samples "$1" --calib-len 2048 --seed 0; }
read -ra CAL <<< "$(calib "$SAMPLES")"
run() { # name, command...
  local name=$1; shift
  [ -f "$OUT/$name.json" ] && return 0
  [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]] && return 0
  rm -rf "$OUT/$name"
  /usr/bin/time -v "$W" "$@" "${EVAL[@]}" --out "$OUT/$name" --json "$OUT/$name.json" \
    > "$OUT/$name.log" 2>&1 || { echo "$name failed, see $OUT/$name.log"; return 1; }
  grep -E "perplexity .* ->" "$OUT/$name.log" | sed "s/^/$name: /"
}
run magnitude-24 sparsify --method magnitude --pattern 2:4
run wanda-24 sparsify --method wanda --pattern 2:4 "${CAL[@]}"
run wanda-50 sparsify --method wanda --pattern 50% "${CAL[@]}"
run sparsegpt-24 sparsify --method sparsegpt --pattern 2:4 "${CAL[@]}"
run rtn-int4 quantize --method rtn --bits 4 --group-size 128
run gptq-int4 quantize --method gptq --bits 4 --group-size 128 "${CAL[@]}"
for base in rtn-int4 sparsegpt-24; do
  for m in svd eora; do
    for r in 16 64; do
      n=$SAMPLES; [ $m = svd ] && n=0
      read -ra C <<< "$(calib "$n")"
      run "$base-$m-r$r" compensate --model "$OUT/$base" --method $m --rank $r "${C[@]}"
    done
  done
done
run sparsegpt-24-gptq-int4 quantize --model "$OUT/sparsegpt-24" --method gptq --bits 4 --group-size 128 "${CAL[@]}"
run sparsegpt-24-gptq-int4-eora-r64 compensate --model "$OUT/sparsegpt-24-gptq-int4" --method eora --rank 64 "${CAL[@]}"
[ "${FULL:-0}" = 1 ] || exit 0
for m in dense "$OUT"/*/; do
  name=$(basename "$m"); [ "$m" = dense ] && m=$($W fetch)
  [ -f "$OUT/$name.full.json" ] && continue
  "$W" eval ppl --model "$m" --data ../shared/reference/wikitext2-test.txt --seq-len 2048 \
    --json "$OUT/$name.full.json" > "$OUT/$name.full.log" 2>&1
  python3 -c "import json,sys; r=json.load(open(sys.argv[1]))['report']; print(sys.argv[2], 'full test split', r['windows'], 'windows: PPL', round(r['ppl'], 4))" "$OUT/$name.full.json" "$name"
done
