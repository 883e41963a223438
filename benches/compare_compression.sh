#!/usr/bin/env bash
# Time of every one-shot method in whittle and in the reference PyTorch harness
# (shared/reference/harness/run_compression.py), back to back on this machine with the same
# threads, calibration (NSAMPLES × 2048 tokens of wikitext2-valid.txt, seed 0) and evaluation
# (first 4 test windows of 2048), so that the ratios mean something. Run it on a quiet machine.
#
#   bash benches/compare_compression.sh [OUT_DIR]     (venv: see benches/harness_env.sh)
#
# Times are of the compression alone: the harness's `compress_s` (+ `lowrank_s` for the
# compensation rows, whose calibration pass is inside `compress_s`), whittle's `seconds` in
# `--json` (calibration passes included, evaluation excluded).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-target/compare-compression}
NS=${NSAMPLES:-8}
source benches/harness_env.sh
# Tokenize both splits once, untimed, so that no method's time includes it (the harness caches
# the ids; whittle tokenizes in ~1 s, also outside its timed region).
( cd ../shared/reference/harness &&
  "$VENV/bin/python" -c "from data import wikitext_ids; wikitext_ids('valid'); wikitext_ids('test')" )
ref() { # name, harness args...
  local name=$1; shift
  [ -f "$OUT/ref-$name.json" ] && return 0
  ( cd ../shared/reference/harness &&
    "$VENV/bin/python" run_compression.py --threads "$THREADS" --nsamples "$NS" --eval-windows 4 \
      --out "$ABS_OUT/ref-$name.json" "$@" ) > "$OUT/ref-$name.log" 2>&1
}
EVAL=(--eval ../shared/reference/wikitext2-test.txt --eval-max-tokens 8192)
CAL=(--calib ../shared/reference/wikitext2-valid.txt --calib-samples "$NS" --calib-len 2048 --seed 0)
ours() { # name, whittle args...
  local name=$1; shift
  [ -f "$OUT/whittle-$name.json" ] && return 0
  rm -rf "$OUT/whittle-$name"
  "$W" --threads "$THREADS" "$@" "${EVAL[@]}" --out "$OUT/whittle-$name" \
    --json "$OUT/whittle-$name.json" > "$OUT/whittle-$name.log" 2>&1
}
ref magnitude24 --method magnitude24
ours magnitude24 sparsify --method magnitude --pattern 2:4
ref wanda24 --method wanda24
ours wanda24 sparsify --method wanda --pattern 2:4 "${CAL[@]}"
ref wanda50 --method wanda50
ours wanda50 sparsify --method wanda --pattern 50% "${CAL[@]}"
ref sparsegpt24 --method sparsegpt24
ours sparsegpt24 sparsify --method sparsegpt --pattern 2:4 "${CAL[@]}"
ref gptq4 --method gptq4
ours gptq4 quantize --method gptq --bits 4 --group-size 128 "${CAL[@]}"
ref rtn4 --method rtn4
# SVD and EoRA r64 on RTN int4: the harness computes both in one process after one calibration
# pass (EoRA's covariances); whittle runs one `compensate` each.
ref rtn4-lowrank --method rtn4 --compensate svd:64,eora:64
ours rtn4 quantize --method rtn --bits 4 --group-size 128
ours rtn4-svd64 compensate --model "$OUT/whittle-rtn4" --method svd --rank 64 --calib-samples 0
ours rtn4-eora64 compensate --model "$OUT/whittle-rtn4" --method eora --rank 64 "${CAL[@]}"
python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
def ref(name, variant="base"):
    rows = json.load(open(f"{out}/ref-{name}.json"))["rows"]
    r = next(r for r in rows if r["variant"] == variant)
    # SVD needs no data; EoRA needs the calibration pass counted in compress_s.
    t = r.get("lowrank_s", 0) + (0 if variant.startswith("+svd") else r["compress_s"])
    return r["ppl"], t
def ours(name):
    s = json.load(open(f"{out}/whittle-{name}.json"))
    return s["ppl_after"], s["seconds"]
rows = [("magnitude 2:4", "magnitude24", "magnitude24", "base"),
        ("Wanda 2:4", "wanda24", "wanda24", "base"),
        ("Wanda 50 %", "wanda50", "wanda50", "base"),
        ("SparseGPT 2:4", "sparsegpt24", "sparsegpt24", "base"),
        ("GPTQ int4 g128", "gptq4", "gptq4", "base"),
        ("RTN int4 g128", "rtn4", "rtn4", "base"),
        ("RTN int4 + SVD r64", "rtn4-svd64", "rtn4-lowrank", "+svd r64"),
        ("RTN int4 + EoRA r64", "rtn4-eora64", "rtn4-lowrank", "+eora r64")]
print("| method | whittle PPL | reference PPL | whittle s | reference s | speed-up |")
print("|---|---:|---:|---:|---:|---:|")
for label, o, r, v in rows:
    (op, ot), (rp, rt) = ours(o), ref(r, v)
    print(f"| {label} | {op:.4f} | {rp:.4f} | {ot:.1f} | {rt:.1f} | {rt / max(ot, 1e-9):.1f}x |")
PY
