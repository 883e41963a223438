"""The table of benches/vision_norms.sh: one row per normaliser (k-NN and probe accuracy of the
student, each target's fidelity and loss share, peak RSS) and each normaliser's average rank
over the accuracy and fidelity measures (rank 1 = best; ties share the mean rank).

    python3 benches/vision_norms_table.py OUT_DIR
"""
import json
import os
import re
import sys

from ranking import average_ranks

out = sys.argv[1]
runs = {}
for n in ["phis", "none", "global", "channel", "pca-white", "zca", "hca"]:
    p = os.path.join(out, n, "summary.json")
    if os.path.exists(p):
        runs[n] = json.load(open(p))
if not runs:
    sys.exit(f"no finished run under {out}")


def peak_rss(n):
    p = os.path.join(out, f"{n}.err")
    m = re.findall(r"Maximum resident set size \(kbytes\): (\d+)", open(p).read()) if os.path.exists(p) else []
    return f"{int(m[-1]) / 2**20:.2f} GiB" if m else "—"


targets = [t["teacher"] for t in next(iter(runs.values()))["teachers"]]
# Measures that rank the normalisers: (name, value of a run, higher is better).
measures = [("k-NN", lambda r: r["knn_accuracy"], True), ("probe", lambda r: r["probe_accuracy"], True)]
for i, t in enumerate(targets):
    measures.append((f"{t} cos", lambda r, i=i: r["teachers"][i]["cosine"], True))
    measures.append((f"{t} nMSE", lambda r, i=i: r["teachers"][i]["normalised_mse"], False))


names = list(runs)
avg = average_ranks(runs, measures)

head = ["norm", "steps", "k-NN %", "probe %"]
head += [f"{t}: cos / nMSE / share %" for t in targets]
head += ["largest share %", "avg rank", "peak RSS"]
print("| " + " | ".join(head) + " |")
print("|" + "---|" * len(head))
for n in names:
    r = runs[n]
    cells = [n, str(r["steps"]), f"{100 * r['knn_accuracy']:.2f}", f"{100 * r['probe_accuracy']:.2f}"]
    for t in r["teachers"]:
        cells.append(f"{t['cosine']:.3f} / {t['normalised_mse']:.3f} / {100 * t['loss_share']:.1f}")
    cells.append(f"{100 * max(t['loss_share'] for t in r['teachers']):.1f}")
    cells.append(f"{avg[n]:.2f}")
    cells.append(peak_rss(n))
    print("| " + " | ".join(cells) + " |")
print(f"\naverage rank over: {', '.join(m[0] for m in measures)}")
