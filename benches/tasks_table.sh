#!/usr/bin/env bash
# All nine downstream tasks on one model, one task per run so that an interrupted run resumes
# where it stopped (a task whose JSON exists is skipped), then one table.
#
#   bash benches/tasks_table.sh OUT_DIR [--model M] [--limit N] [other `eval tasks` flags]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: tasks_table.sh OUT_DIR [eval tasks flags]}
shift
W=${W:-target/release/whittle}
[ -x "$W" ] || cargo build --release -q
mkdir -p "$OUT"
for t in ${TASKS:-piqa winogrande arc_easy arc_challenge openbookqa boolq lambada mmlu hellaswag}; do
  [ -f "$OUT/$t.json" ] && continue
  echo "== $t" >&2
  "$W" eval tasks --tasks "$t" --json "$OUT/$t.json" --samples "$OUT/$t.samples.jsonl" "$@" >&2
done
python3 - "$OUT" <<'PY'
import glob, json, sys
rows = []
for f in sorted(glob.glob(sys.argv[1] + "/*.json")):
    j = json.load(open(f))
    for r in j["tasks"]:
        for m in r["metrics"]:
            v, e = (m["value"], m["stderr"]) if m["name"] == "perplexity" else (100 * m["value"], 100 * m["stderr"])
            rows.append(f"| {r['task']} | {r['split']} | {r['shots']} | {r['examples']} | {m['name']} | {v:.2f} ± {e:.2f} | {r['seconds']:.0f} |")
print("| task | split | shots | n | metric | value ± stderr | seconds |\n|---|---|---|---|---|---|---|")
print("\n".join(rows))
PY
