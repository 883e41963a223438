#!/usr/bin/env bash
# Reproduces the compression table of shared/reference/README.md with whittle: calibration
# windows from wikitext2-valid.txt (seed 0), evaluation on the first 4 windows of 2048 tokens of
# wikitext2-test.txt. SAMPLES (default 8, the reference's budget) calibration windows of 2048.
#   bash benches/compression_table.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-target/compression}
SAMPLES=${SAMPLES:-8}
mkdir -p "$OUT"
cargo build --release -q
W=target/release/whittle
EVAL=(--eval ../shared/reference/wikitext2-test.txt --eval-max-tokens "${EVAL_TOKENS:-8192}")
CAL=(--calib ../shared/reference/wikitext2-valid.txt --calib-samples "$SAMPLES" --calib-len 2048 --seed 0)
run() { # name, command...
  local name=$1; shift
  [ -f "$OUT/$name.json" ] && return 0
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
      run "$base-$m-r$r" compensate --model "$OUT/$base" --method $m --rank $r "${CAL[@]}"
    done
  done
done
run sparsegpt-24-gptq-int4 quantize --model "$OUT/sparsegpt-24" --method gptq --bits 4 --group-size 128 "${CAL[@]}"
run sparsegpt-24-gptq-int4-eora-r64 compensate --model "$OUT/sparsegpt-24-gptq-int4" --method eora --rank 64 "${CAL[@]}"
