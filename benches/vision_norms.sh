#!/usr/bin/env bash
# Issue 22's comparison: the seven target normalisers of multi-teacher distillation side by side
# at equal steps (same images, same teachers, same student, same seed), then their table (k-NN,
# linear probe, per-teacher fidelity, loss shares, average rank) and the per-teacher loss curves.
#
#   bash benches/vision_norms.sh [OUT_DIR]
#
# Teachers' features are computed once into OUT_DIR/teachers and shared by every run. Each run is
# resumable: MINUTES (per run, optional) stops it with a checkpoint and a rerun continues; runs
# with a summary are skipped. NORMS (default all seven), STEPS (600), BATCH (32), SIZE (112),
# THREADS (2), TEACHERS (dinov2,open_nsfw,effnet_lite0), MNIST_TRAIN (3000) and IMAGES (four
# openclipart-png folders, Debian package `openclipart-png`) can be set; DENSE=1 adds DINOv2's
# per-patch target.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-target/vision-norms}
CLIP=/usr/share/openclipart/png
IMAGES=${IMAGES:-"$CLIP/animals $CLIP/food $CLIP/plants $CLIP/transportation"}
mkdir -p "$OUT"
cargo build --release -q
W=${W:-target/release/whittle}
# Peak RSS from GNU time when it is installed (Debian package `time`).
TIME=(); [ -x /usr/bin/time ] && TIME=(/usr/bin/time -v)
IMAGE_ARGS=()
for d in $IMAGES; do IMAGE_ARGS+=(--images "$d"); done
for n in ${NORMS:-phis none global channel pca-white zca hca}; do
  [ -f "$OUT/$n/summary.json" ] && continue
  echo "== --norm $n" >&2
  "${TIME[@]}" "$W" --threads "${THREADS:-2}" vision distill \
    --teachers "${TEACHERS:-dinov2,open_nsfw,effnet_lite0}" "${IMAGE_ARGS[@]}" \
    --mnist-train "${MNIST_TRAIN:-3000}" --size "${SIZE:-112}" --norm "$n" \
    --steps "${STEPS:-600}" --batch "${BATCH:-32}" --lr 1e-3 ${DENSE:+--dense} \
    --teacher-cache "$OUT/teachers" --out "$OUT/$n" ${MINUTES:+--max-minutes "$MINUTES"} \
    2> >(tee "$OUT/$n.err" >&2) | tee "$OUT/$n.out"
done
python3 benches/vision_norms_table.py "$OUT"
"$W" plot $(for n in ${NORMS:-phis none global channel pca-white zca hca}; do
  [ -f "$OUT/$n/summary.json" ] && echo --run "$OUT/$n"; done) --out "$OUT/curves.svg"
