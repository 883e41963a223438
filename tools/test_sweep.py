#!/usr/bin/env python3
"""Tests of tools/sweep.py on a local Ray (`ray.init(num_cpus=2)`) and a tiny random model
(`whittle init --size tiny`): every entry of a 2 × 3 grid runs as a Ray task, the entries with
an impossible setting are recorded as failed with whittle's error while the others finish,
the table and the Pareto plot are written, and running the same sweep again runs only what
did not finish.

    WHITTLE=target/release/whittle python tools/test_sweep.py
"""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WHITTLE = str(Path(os.environ.get("WHITTLE", ROOT / "target/release/whittle")).resolve())
SHARED = ROOT.parent / "shared" / "reference"


def sweep(grid, out):
    p = subprocess.run(
        [sys.executable, str(ROOT / "tools/sweep.py"), "--grid", str(grid), "--out", str(out),
         "--whittle", WHITTLE, "--num-cpus", "2"],
        capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    return p.stdout, p.stderr


def test_grid_runs_records_failures_and_resumes(tmp):
    subprocess.run([WHITTLE, "init", "--arch", "llama", "--size", "tiny", "--out", str(tmp / "tiny")], check=True, capture_output=True)
    grid = tmp / "grid.toml"
    grid.write_text(f"""
model = "{tmp / 'tiny'}"
eval = "{SHARED / 'wikitext2-test.txt'}"
eval_seq_len = 64
eval_max_tokens = 512
bench = true
bench_reps = 1
cpus = 1
memory_gb = 1
[calib]
file = "{SHARED / 'wikitext2-valid.txt'}"
samples = 4
len = 64
[[axis]]
name = "sparsity"
options = [{{}}, {{ kind = "sparsify", method = "wanda", pattern = "2:4" }}]
[[axis]]
name = "quantization"
options = [{{}}, {{ kind = "quantize", method = "gptq", bits = 4, group_size = 32 }},
           {{ kind = "quantize", method = "gptq", bits = 4, group_size = 33 }}]
""")
    out = tmp / "out"
    table, log = sweep(grid, out)
    assert "0 entries done before, 6 to run" in log, log
    rows = json.loads((out / "results.json").read_text())
    assert len(rows) == 6 and len({r["key"] for r in rows}) == 6
    done = [r for r in rows if r["status"] == "done"]
    failed = [r for r in rows if r["status"] == "failed"]
    assert len(done) == 4 and len(failed) == 2, rows
    assert all("group size 33" in r["error"] for r in failed), failed
    assert {r["label"] for r in failed} == {"gptq 4-bit g33", "wanda 2:4 → gptq 4-bit g33"}
    for r in done:
        assert r["ppl"] > 1 and r["size_bytes"] > 0 and r["decode_tok_s"] > 0, r
    assert any(r["pareto"] for r in done)
    assert (out / "pareto.svg").read_text().startswith("<svg")
    assert "| wanda 2:4 → gptq 4-bit g32 |" in table, table
    # Each entry's own files: the recipe it ran, whittle's report, its log.
    key = next(r["key"] for r in done if r["label"] == "wanda 2:4 → gptq 4-bit g32")
    recipe = (out / key / "recipe.toml").read_text()
    assert 'method = "wanda"' in recipe and "bits = 4" in recipe, recipe
    # Again: only the failed entries run.
    _, log = sweep(grid, out)
    assert "4 entries done before, 2 to run" in log, log


def main():
    tests = [test_grid_runs_records_failures_and_resumes]
    passed = failed = 0
    for t in tests:
        with tempfile.TemporaryDirectory() as d:
            try:
                t(Path(d))
                passed += 1
                print(f"ok: {t.__name__}")
            except AssertionError as e:
                failed += 1
                print(f"FAILED: {t.__name__}: {e}")
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
