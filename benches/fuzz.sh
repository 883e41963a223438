#!/usr/bin/env bash
# Mutation fuzzing of every reader of files from strangers (GGUF, safetensors weights of Llama,
# packed and Hymba folders, config.json, tokenizer.json, whittle.json, model cards, recipes,
# training checkpoints) at 100,000 cases per format; CI runs the same test with 3,000. The cases
# and mutations are described in crates/whittle/tests/fuzz.rs; a finding prints
# `format:index`, which replays alone with WHITTLE_FUZZ_CASE=format:index.
#
#   bash benches/fuzz.sh [CASES] [LOG]
set -euo pipefail
cd "$(dirname "$0")/.."
CASES=${1:-100000}
LOG=${2:-target/fuzz-$CASES.log}
mkdir -p "$(dirname "$LOG")"
WHITTLE_FUZZ_CASES=$CASES cargo test --release -p whittle --test fuzz -- --nocapture 2>&1 | tee "$LOG"
