"""The feature-normaliser ablation of benches/recovery.sh on the language model: one row per
`STUDENT-feat-NORM-BUDGET[-seedS]` run (and the plain `kd` run of the same student and budget as
the control), with the held-out perplexities, each distilled layer's fidelity in the teacher's
space and loss share (the run's `summary.json`, `features`), training speed and peak RSS, and
each normaliser's average rank over perplexity and per-layer fidelity (rank 1 = best).

    python3 benches/recovery_norms_table.py OUT_DIR STUDENT BUDGET [TAG]

TAG is the suffix of the evaluation files (`-8192` when recovery.sh ran with EVAL_TOKENS=8192).
"""
import json
import os
import re
import statistics
import sys

from ranking import average_ranks

out, student, budget = sys.argv[1:4]
tag = sys.argv[4] if len(sys.argv) > 4 else ""
pattern = re.compile(rf"^{re.escape(student)}-(feat-[\w-]+?|kd)-{re.escape(budget)}(-seed\d+)?$")
runs = {}
for d in sorted(os.listdir(out)):
    m = pattern.match(d)
    if m and os.path.exists(os.path.join(out, d, "summary.json")):
        r = json.load(open(os.path.join(out, d, "summary.json")))
        for split in ["test", "books"]:
            p = os.path.join(out, f"{d}.{split}{tag}.json")
            r[split] = json.load(open(p))["report"]["ppl"] if os.path.exists(p) else float("nan")
        state = json.load(open(os.path.join(out, d, "checkpoint", "state.json")))
        r["tok_s"] = statistics.median(row["tokens_per_s"] for row in state["log"][1:] or state["log"])
        log = open(os.path.join(out, f"{d}.log")).read() if os.path.exists(os.path.join(out, f"{d}.log")) else ""
        rss = re.findall(r"Maximum resident set size \(kbytes\): (\d+)", log)
        r["rss"] = f"{int(rss[-1]) / 2**20:.2f} GiB" if rss else "—"
        r["name"] = m.group(1).removeprefix("feat-") + (m.group(2) or "")
        runs[d] = r
if not runs:
    sys.exit(f"no finished {student}-*-{budget} run under {out}")
order = ["phis", "none", "global", "per-channel", "pca", "zca", "hadamard-whitening", "kd"]


def position(item):
    base = item[1]["name"].split("-seed")[0]
    return (order.index(base) if base in order else len(order), item[1]["name"])


runs = dict(sorted(runs.items(), key=position))
# Ranked: the feature runs at the default seed (replicates are shown, not ranked).
feat = {d: r for d, r in runs.items() if r.get("features") and "-seed" not in r["name"]}
layers = [f"{f['student']}→{f['teacher']}" for f in next(iter(feat.values()))["features"]] if feat else []
measures = [("test PPL", lambda r: r["test"], False), ("books PPL", lambda r: r["books"], False)]
for i, l in enumerate(layers):
    measures.append((f"{l} cos", lambda r, i=i: r["features"][i]["cosine"], True))
    measures.append((f"{l} nMSE", lambda r, i=i: r["features"][i]["nmse"], False))
avg = average_ranks(feat, measures) if feat else {}

head = ["objective", "test PPL", "books PPL", "valid PPL (16k)"]
head += [f"block {l}: cos / nMSE / share %" for l in layers]
head += ["largest share %", "avg rank", "tok/s", "peak RSS"]
print("| " + " | ".join(head) + " |")
print("|" + "---|" * len(head))
for d, r in runs.items():
    cells = [r["name"], f"{r['test']:.2f}", f"{r['books']:.2f}", f"{r['val_ppl']:.2f}"]
    fs = r.get("features") or []
    total = sum(f["loss"] for f in fs)
    if fs:
        cells += [f"{f['cosine']:.4f} / {f['nmse']:.4f} / {100 * f['loss'] / total:.1f}" for f in fs]
        cells += [f"{100 * max(f['loss'] for f in fs) / total:.1f}", f"{avg[d]:.2f}" if d in avg else "—"]
    else:
        cells += ["—"] * (len(layers) + 2)
    cells += [f"{r['tok_s']:.0f}", r["rss"]]
    print("| " + " | ".join(cells) + " |")
print(f"\naverage rank (feature runs, default seed) over: {', '.join(m[0] for m in measures)}")

# Replicates: each objective's perplexities averaged over the seeds it ran with (and their
# spread), so that normalisers are compared on more than one draw of the training windows.
by_base = {}
for r in runs.values():
    by_base.setdefault(r["name"].split("-seed")[0], []).append(r)
if any(len(rs) > 1 for rs in by_base.values()):
    print("\n| objective | seeds | test PPL mean (min–max) | books PPL mean (min–max) | valid PPL (16k) mean (min–max) |")
    print("|---|---|---|---|---|")
    for base, rs in sorted(by_base.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)):
        cells = [base, str(len(rs))]
        for key in ["test", "books", "val_ppl"]:
            v = [r[key] for r in rs]
            cells.append(f"{statistics.mean(v):.2f} ({min(v):.2f}–{max(v):.2f})")
        print("| " + " | ".join(cells) + " |")
