#!/usr/bin/env python3
"""Recipe sweeps on Ray: a grid of compression recipes, each run as a Ray task calling the
`whittle` binary, resumable, with one table and a Pareto plot at the end.

    python tools/sweep.py --grid examples/sweep.toml --out target/sweep [--address auto]

The grid (TOML) names the model, the calibration set, the evaluation, and axes of stage
alternatives; the sweep is their product (see examples/sweep.toml). Each entry is keyed by a
hash of everything that defines its result (model, calibration, stages, evaluation), and lives
in OUT/<key>/: recipe.toml, the compressed model, result.json (`whittle compress --json`),
bench.json (`whittle bench --json`) and status.json. An entry whose status says done is not run
again, so the same command resumes a sweep; an entry that fails is recorded with its error and
the others go on. Each task declares its CPUs and memory to Ray (`cpus`, `memory_gb`), and runs
whittle with that many threads.

Without --address the sweep runs on a local Ray (`ray.init(num_cpus=...)`); with one, on that
cluster (every node needs the whittle binary at the same path and the files the grid names).
Requires `ray` (tools/sweep-requirements.txt).
"""

import argparse
import hashlib
import itertools
import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path


def entries(grid):
    """Every combination of the axes' options: (label, stages) pairs, empty options dropped."""
    axes = grid.get("axis", [])
    for combo in itertools.product(*[a["options"] for a in axes]):
        stages = [dict(o) for o in combo if o]
        label = " → ".join(stage_label(s) for s in stages) or "baseline"
        yield label, stages


def stage_label(stage):
    """A short name for a stage: `sparsegpt 2:4`, `gptq 4-bit g128`, `eora r64`."""
    method = stage.get("method", stage.get("kind", "?"))
    extra = [
        stage.get("pattern"),
        f"{stage['bits']}-bit" if "bits" in stage else None,
        f"g{stage['group_size']}" if "group_size" in stage else None,
        f"r{stage['rank']}" if "rank" in stage else None,
    ]
    return " ".join([method] + [e for e in extra if e])


def key_of(grid, stages):
    """Hash of what defines an entry's result (not the label, not where it runs)."""
    what = {
        "model": grid.get("model"),
        "calib": grid.get("calib", {}),
        "stages": stages,
        "eval": grid.get("eval"),
        "eval_seq_len": grid.get("eval_seq_len", 2048),
        "eval_max_tokens": grid.get("eval_max_tokens"),
        "bench": grid.get("bench", False),
    }
    text = json.dumps(what, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def toml_value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise ValueError(f"cannot write {v!r} into a recipe")


def recipe_toml(calib, stages):
    """The recipe `whittle compress --recipe` reads: [calib] and one [[stage]] per stage."""
    lines = ["[calib]"] + [f"{k} = {toml_value(v)}" for k, v in calib.items()]
    for s in stages:
        lines += ["", "[[stage]]"] + [f"{k} = {toml_value(v)}" for k, v in s.items()]
    return "\n".join(lines) + "\n"


def run_entry(whittle, grid, label, stages, key, out):
    """Runs one entry to its status (done or failed); returns its row of the table."""
    d = Path(out) / key
    d.mkdir(parents=True, exist_ok=True)
    threads = str(grid.get("cpus", 1))
    w = [whittle, "--threads", threads]
    ev = ["--eval-seq-len", str(grid.get("eval_seq_len", 2048))]
    if grid.get("eval_max_tokens"):
        ev += ["--eval-max-tokens", str(grid["eval_max_tokens"])]
    model = grid.get("model")
    row = {"key": key, "label": label, "stages": stages, "status": "failed"}
    start = time.time()
    try:
        if stages:
            (d / "recipe.toml").write_text(recipe_toml(grid.get("calib", {}), stages))
            target = d / "model"
            shutil.rmtree(target, ignore_errors=True)
            cmd = w + ["compress", "--recipe", str(d / "recipe.toml"), "--out", str(target),
                       "--json", str(d / "result.json"), "--eval", grid["eval"]] + ev
            if model:
                cmd += ["--model", model]
            check(cmd, d)
            result = json.loads((d / "result.json").read_text())
            row["ppl"] = result.get("ppl_after")
        else:
            target = Path(model) if model else None
            cmd = w + ["eval", "ppl", "--data", grid["eval"],
                       "--seq-len", str(grid.get("eval_seq_len", 2048)),
                       "--json", str(d / "result.json")]
            if grid.get("eval_max_tokens"):
                cmd += ["--max-tokens", str(grid["eval_max_tokens"])]
            if model:
                cmd += ["--model", model]
            check(cmd, d)
            row["ppl"] = json.loads((d / "result.json").read_text())["report"]["ppl"]
            if target is None:
                target = Path(check(w + ["fetch"], d).strip())
        row["size_bytes"] = weight_bytes(target)
        if grid.get("bench"):
            cmd = w + ["bench", "--model", str(target), "--data", grid["eval"],
                       "--reps", str(grid.get("bench_reps", 3)), "--json", str(d / "bench.json")]
            check(cmd, d)
            row["decode_tok_s"] = decode_speed(json.loads((d / "bench.json").read_text()))
        row["status"] = "done"
    except Exception as e:  # recorded, and the sweep goes on
        row["error"] = str(e)
    row["seconds"] = round(time.time() - start, 1)
    (d / "status.json").write_text(json.dumps(row, indent=2))
    return row


def check(cmd, d):
    """Runs `cmd`, its output appended to d/log.txt; its stdout, or an error with its tail."""
    p = subprocess.run(cmd, capture_output=True, text=True)
    with open(d / "log.txt", "a") as log:
        log.write("$ " + " ".join(cmd) + "\n" + p.stdout + p.stderr)
    if p.returncode != 0:
        tail = (p.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"exit {p.returncode}: {tail}")
    return p.stdout


def weight_bytes(path):
    """Bytes of a model's weights on disk (a GGUF file, or a folder's .safetensors files)."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.glob("*.safetensors"))


def decode_speed(bench):
    """Decode tokens/s of `whittle bench --json`: weights as stored when measured, else f32."""
    rows = [r["whittle"] for r in bench.get("rows", [])]
    decode = [r for r in rows if r.get("what", "").startswith("decode")]
    stored = [r for r in decode if "stored" in r.get("what", "")]
    pick = (stored or decode or [None])[0]
    return pick and pick.get("tokens_per_s")


def pareto(rows):
    """Marks the rows no other done row beats on both size and perplexity."""
    done = [r for r in rows if r["status"] == "done" and r.get("ppl") and r.get("size_bytes")]
    for r in done:
        r["pareto"] = not any(
            o is not r and o["size_bytes"] <= r["size_bytes"] and o["ppl"] <= r["ppl"]
            and (o["size_bytes"] < r["size_bytes"] or o["ppl"] < r["ppl"])
            for o in done)


def table(rows):
    head = "| entry | key | status | PPL | size MB | decode tok/s | Pareto | s |"
    out = [head, "|" + "---|" * 8]
    for r in sorted(rows, key=lambda r: (r["status"] != "done", r.get("size_bytes") or 0)):
        fmt = lambda v, f: "—" if v is None else f.format(v)
        out.append("| {} | {} | {} | {} | {} | {} | {} | {} |".format(
            r["label"], r["key"], r["status"] if r["status"] == "done" else
            f"failed: {r.get('error', '')}", fmt(r.get("ppl"), "{:.3f}"),
            fmt(r.get("size_bytes") and r["size_bytes"] / 1e6, "{:.1f}"),
            fmt(r.get("decode_tok_s"), "{:.1f}"), "yes" if r.get("pareto") else "",
            r.get("seconds", "")))
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--grid", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--whittle", default=os.environ.get("WHITTLE", "target/release/whittle"))
    ap.add_argument("--address", help="a Ray cluster (default: a local Ray)")
    ap.add_argument("--num-cpus", type=int, default=os.cpu_count(),
                    help="CPUs of the local Ray")
    a = ap.parse_args()
    grid = tomllib.loads(Path(a.grid).read_text())
    whittle = str(Path(a.whittle).resolve())
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)

    import ray  # here, so that --help works without it

    if a.address:
        ray.init(address=a.address)
    else:
        ray.init(num_cpus=a.num_cpus, include_dashboard=False)
    task = ray.remote(num_cpus=grid.get("cpus", 1),
                      memory=int(grid.get("memory_gb", 4) * 2**30))(run_entry)
    rows, pending = [], []
    for label, stages in entries(grid):
        key = key_of(grid, stages)
        status = out / key / "status.json"
        if status.is_file() and json.loads(status.read_text())["status"] == "done":
            rows.append(json.loads(status.read_text()))
            continue
        pending.append(task.remote(whittle, grid, label, stages, key, str(out)))
    print(f"sweep: {len(rows)} entries done before, {len(pending)} to run", file=sys.stderr)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        row = ray.get(ready[0])
        print(f"  {row['status']}: {row['label']} ({row['seconds']} s)", file=sys.stderr)
        rows.append(row)
    pareto(rows)
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    print(table(rows))
    plotted = [r for r in rows if r.get("pareto") is not None]
    if plotted:
        subprocess.run([whittle, "plot", "--pareto", str(out / "results.json"),
                        "--out", str(out / "pareto.svg")], check=True)
        print(f"wrote {out / 'results.json'} and {out / 'pareto.svg'}", file=sys.stderr)
    failed = sum(r["status"] != "done" for r in rows)
    return 1 if failed == len(rows) else 0


if __name__ == "__main__":
    sys.exit(main())
