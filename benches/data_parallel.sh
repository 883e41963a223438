#!/usr/bin/env bash
# Data-parallel overhead on one machine (issue 19): a KD step of the default model distilled
# into itself (all 134.5 M parameters trained) and a SparseGPT 2:4 calibration pass, each as
# 1 process with 2 threads and as 2 MPI ranks with 1 thread each. On 2 cores this measures the
# cost of the ranks (gradient and statistics sums, duplicated work), not a speed-up.
#   bash benches/data_parallel.sh [OUT_DIR]      (needs `cargo build --release --features mpi`)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-target/data-parallel}
W=${W:-target/release/whittle}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
M=$("$W" fetch)
V=../shared/reference/wikitext2-valid.txt
rm -rf "$OUT"; mkdir -p "$OUT"
KD=(distill --student "$M" --teacher "$M" --loss kd --data "$V" --valid "$V" --seq-len 256
    --batch 1 --accum 2 --tokens 2560 --eval-tokens 256 --ckpt-every 0)
CAL=(sparsify --method sparsegpt --pattern 2:4 --calib "$V" --calib-samples 16 --calib-len 512)
step_rate() {  # median tokens/s of the steps after the first
  python3 -c "import json,statistics,sys; l=json.load(open(sys.argv[1]))['log'][1:]; print(round(statistics.median(r['tokens_per_s'] for r in l),1))" "$1/checkpoint/state.json"
}
"$W" --threads 2 "${KD[@]}" --out "$OUT/kd-1x2" > "$OUT/kd-1x2.log" 2>&1
mpirun -n 2 --bind-to none "$W" --threads 1 "${KD[@]}" --out "$OUT/kd-2x1" --distributed > "$OUT/kd-2x1.log" 2>&1
"$W" --threads 2 "${CAL[@]}" --out "$OUT/cal-1x2" > "$OUT/cal-1x2.log" 2>&1
mpirun -n 2 --bind-to none "$W" --threads 1 "${CAL[@]}" --out "$OUT/cal-2x1" --distributed > "$OUT/cal-2x1.log" 2>&1
echo "KD step tokens/s: 1 process x 2 threads $(step_rate "$OUT/kd-1x2"), 2 ranks x 1 thread $(step_rate "$OUT/kd-2x1")"
grep -ah "gradients summed per step" "$OUT/kd-2x1.log" || true
echo "SparseGPT 2:4 pass (16 x 512): 1 x 2 $(grep -aho '2:4: [0-9.]* s' "$OUT/cal-1x2.log"), 2 x 1 $(grep -aho '2:4: [0-9.]* s' "$OUT/cal-2x1.log")"
cmp -s "$OUT/cal-1x2/model.safetensors" "$OUT/cal-2x1/model.safetensors" && echo "calibrated models: identical files"
grep -m1 "model name" /proc/cpuinfo
