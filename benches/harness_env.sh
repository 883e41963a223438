# Shared set-up of the scripts that run whittle next to the reference PyTorch harness
# (sourced, not run): builds whittle, fetches the default model and points the harness at it.
# Needs OUT (the output folder); sets ABS_OUT, VENV, THREADS, W, GGUF and the harness's
# SMOLLM_GGUF / REFS_CACHE. The harness's venv: python3 -m venv /work/venv &&
# /work/venv/bin/pip install -r ../shared/reference/harness/requirements.txt
VENV=${VENV:-/work/venv}
THREADS=${THREADS:-2}
mkdir -p "$OUT"
ABS_OUT=$(cd "$OUT" && pwd)
cargo build --release -q
W=target/release/whittle
GGUF=$($W fetch)
export SMOLLM_GGUF="$GGUF" REFS_CACHE="$ABS_OUT/refs-cache"
