"""Does llama.cpp load a whittle GGUF export and compute the same logits?

    python3 benches/gguf_parity.py FILE.gguf [FILE.gguf ...] --tool target/llamacpp_logits
        [--whittle target/release/whittle] [--data ../shared/reference/wikitext2-test.txt]
        [--tokens 64] [--tolerance 1e-3]   (max absolute difference, as for transformers)

For each file: `whittle eval logits` on the first --tokens tokens of --data, then llama.cpp on the
same ids (`benches/llamacpp_logits.cpp`, built against a llama.cpp checkout by
`benches/gguf_parity.sh`); prints the max absolute logit difference and its share of the
logits' range. Files whittle exports as `deci` (per-layer widths, missing sublayers) go through
llama.cpp's DeciLM graph. Standard library only.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs="+")
    ap.add_argument("--tool", default="target/llamacpp_logits")
    ap.add_argument("--whittle", default="target/release/whittle")
    ap.add_argument("--data", default="../shared/reference/wikitext2-test.txt")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--tolerance", type=float, default=1e-3)
    a = ap.parse_args()
    bad = 0
    for f in a.files:
        with tempfile.NamedTemporaryFile(suffix=".json") as out:
            subprocess.run([a.whittle, "eval", "logits", "--model", f, "--data", a.data,
                            "--tokens", str(a.tokens), "--json", out.name], check=True,
                           stderr=subprocess.DEVNULL)
            w = json.load(open(out.name))
        run = subprocess.run([a.tool, f, ",".join(map(str, w["ids"]))], capture_output=True,
                             text=True)
        if run.returncode != 0:
            print(f"{f}: llama.cpp failed: {run.stderr.strip().splitlines()[-1:]}")
            bad += 1
            continue
        ll = json.loads(run.stdout)
        diff = max(abs(x - y) for rw, rl in zip(w["logits"], ll) for x, y in zip(rw, rl))
        span = max(max(r) - min(r) for r in w["logits"])
        ok = diff <= a.tolerance
        bad += not ok
        print(f"{f}: max |whittle - llama.cpp| = {diff:.3e} ({diff / span:.2e} of the logits' "
              f"range {span:.1f}) over {len(ll)} positions: {'ok' if ok else 'DIFFERENT'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
