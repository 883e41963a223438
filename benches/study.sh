#!/usr/bin/env bash
# The controlled study of issue 4: Llama, Mamba and Hymba of matched size (~1.2 M parameters
# outside the 6.3 M embedding, SmolLM2's tokenizer) trained with one schedule and token budget
# (800 steps × 8 × 256 = 1.6 M tokens) on the Gutenberg corpus, plus the Hymba ablations.
# Every run checkpoints every 50 steps and stops after MINUTES (default 45); running this script
# again resumes each unfinished run. When all are done it prints the table and plots the curves.
#   bash benches/study.sh [RUNS_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-runs}
MINUTES=${MINUTES:-45}
cargo build --release -q
mkdir -p "$RUNS"
# A copy of the binary, so that rebuilding during the runs does not change the one they use.
cp target/release/whittle "$RUNS/.whittle"
W=$RUNS/.whittle
COMMON=(--size small --steps 800 --batch 8 --seq-len 256 --lr 3e-3 --min-lr 3e-4 --warmup 50
        --eval-every 100 --eval-tokens 32768 --ckpt-every 50 --seed 0 --max-minutes "$MINUTES")
train() { # name, extra args...
  local name=$1; shift
  [ -f "$RUNS/$name/summary.json" ] && return 0
  /usr/bin/time -v "$W" train --out "$RUNS/$name" "${COMMON[@]}" "$@" 2> >(tee -a "$RUNS/$name.log" >&2)
}
train llama --arch llama
train mamba --arch mamba
train hymba --arch hymba
train hymba-no-meta --arch hymba --no-meta-tokens
train hymba-no-kv-sharing --arch hymba --no-kv-sharing
for r in llama mamba hymba hymba-no-meta hymba-no-kv-sharing; do
  [ -f "$RUNS/$r/summary.json" ] || { echo "$r unfinished: run again to resume"; exit 0; }
done
"$W" plot --run "$RUNS/llama" --run "$RUNS/mamba" --run "$RUNS/hymba" --run "$RUNS/hymba-no-meta" \
  --run "$RUNS/hymba-no-kv-sharing" --out "$RUNS/curves.svg"
python3 - "$RUNS" <<'PY'
import json, sys
runs = sys.argv[1]
print("| run | params (non-emb.) | val PPL | cache B/token | cache MiB @8k | decode tok/s @1k / 4k / 8k |")
print("|---|---:|---:|---:|---:|---|")
for r in ["llama", "mamba", "hymba", "hymba-no-meta", "hymba-no-kv-sharing"]:
    s = json.load(open(f"{runs}/{r}/summary.json"))
    d = " / ".join(f"{x['tokens_per_s']:.0f}" for x in s["decode"])
    print(f"| {r} | {s['parameters']/1e6:.2f} M ({s['non_embedding_parameters']/1e6:.2f} M) | {s['val_ppl']:.2f} | "
          f"{s['cache_bytes_per_token']} | {s['cache_bytes_at_8k']/2**20:.2f} | {d} |")
PY
