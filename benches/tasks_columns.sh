#!/usr/bin/env bash
# Task columns of the compression tables (issue 15): the same examples of each task scored on
# the dense model and on every compressed one, then one table of accuracies with each model's
# paired difference to the dense model (per-example hits from the samples files: the error of a
# difference on shared examples is far below that of two separate accuracies). Resumable: a
# (model, task) whose JSON exists is skipped.
#   [LIMIT=500] [MMLU_LIMIT=9] [TASKS="..."] [W=bin] \
#     bash benches/tasks_columns.sh OUT_DIR NAME=MODEL [NAME=MODEL ...]
# The dense model is always scored first, as `dense` (the default model). LIMIT is the first N
# examples of each task; MMLU_LIMIT the first N of each of MMLU's 57 subjects (5-shot).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: tasks_columns.sh OUT_DIR NAME=MODEL ...}
shift
W=${W:-target/release/whittle}
[ -x "$W" ] || cargo build --release -q
TASKS=${TASKS:-"hellaswag piqa arc_easy winogrande mmlu"}
mkdir -p "$OUT"
for spec in "dense=$("$W" fetch)" "$@"; do
  name=${spec%%=*} model=${spec#*=}
  for t in $TASKS; do
    j=$OUT/$name.$t.json
    [ -f "$j" ] && continue
    limit=${LIMIT:-500}; [ "$t" = mmlu ] && limit=${MMLU_LIMIT:-9}
    echo "== $name $t" >&2
    "$W" eval tasks --model "$model" --tasks "$t" --shots 5 --limit "$limit" \
      --json "$j" --samples "$OUT/$name.$t.samples.jsonl" > "$OUT/$name.$t.log" 2>&1 \
      || { echo "$name $t failed, see $OUT/$name.$t.log" >&2; exit 1; }
  done
done
python3 - "$OUT" "$TASKS" "dense" "${@%%=*}" <<'PY'
import json, math, sys
out, tasks, names = sys.argv[1], sys.argv[2].split(), sys.argv[3:]
# The metric each paper's table reports for the task (lm-eval's names).
headline = {"hellaswag": "acc_norm", "arc_easy": "acc", "arc_challenge": "acc_norm",
            "openbookqa": "acc_norm", "piqa": "acc", "winogrande": "acc", "boolq": "acc",
            "lambada": "acc", "mmlu": "acc"}
def hits(name, task):
    m = headline[task]
    return {s["index"]: s["hits"][m] for s in map(json.loads, open(f"{out}/{name}.{task}.samples.jsonl"))}
def n_of(task):
    return json.load(open(f"{out}/dense.{task}.json"))["tasks"][0]["examples"]
head = "| model | " + " | ".join(f"{t} {headline[t]} (n={n_of(t)})" for t in tasks) + " | mean |"
print(head + "\n|---|" + "---:|" * (len(tasks) + 1))
dense = {t: hits("dense", t) for t in tasks}
for name in names:
    cells, means = [], []
    for t in tasks:
        h = hits(name, t)
        assert h.keys() == dense[t].keys(), f"{name} {t}: other examples than dense"
        acc = 100 * sum(h.values()) / len(h)
        means.append(acc)
        if name == "dense":
            se = 100 * math.sqrt(acc / 100 * (1 - acc / 100) / (len(h) - 1))
            cells.append(f"{acc:.1f} ± {se:.1f}")
            continue
        d = [int(h[i]) - int(dense[t][i]) for i in h]
        md = sum(d) / len(d)
        se = 100 * math.sqrt(sum((x - md) ** 2 for x in d) / (len(d) - 1) / len(d))
        cells.append(f"{acc:.1f} ({100 * md:+.1f} ± {se:.1f})")
    print(f"| {name} | " + " | ".join(cells) + f" | {sum(means) / len(means):.1f} |")
PY
