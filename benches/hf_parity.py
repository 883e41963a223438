"""Does transformers load a whittle HF export and compute the same logits?

    python benches/hf_parity.py FOLDER [FOLDER ...] [--whittle target/release/whittle]
        [--data ../shared/reference/wikitext2-test.txt] [--tokens 64]

For each folder: `whittle eval logits` on the first --tokens tokens of --data, then
`AutoModelForCausalLM.from_pretrained(FOLDER)` (float32) on the same ids; prints the max absolute
logit difference. Llama and Mamba folders alike. A folder whittle marked as its own (`model_type: whittle_*`:
not a plain Llama, or widths transformers' config cannot state) must be refused by
transformers; the script checks that it is. Needs torch and transformers (the
reference harness's venv).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile

import torch
from transformers import AutoModelForCausalLM


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("folders", nargs="+")
    ap.add_argument("--whittle", default="target/release/whittle")
    ap.add_argument("--data", default="../shared/reference/wikitext2-test.txt")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--tolerance", type=float, default=1e-3)
    ap.add_argument("--rel-tolerance", type=float, default=1.0,
                    help="also bound the difference by this share of the largest |logit| "
                         "(a random model's logits are small, so an absolute bound alone is weak)")
    a = ap.parse_args()
    torch.set_num_threads(2)
    bad = 0
    for folder in a.folders:
        cfg = json.load(open(f"{folder}/config.json"))
        if str(cfg.get("model_type", "")).startswith("whittle_"):
            try:
                AutoModelForCausalLM.from_pretrained(folder)
                print(f"{folder}: transformers loaded a folder marked {cfg['model_type']} (wrong)")
                bad += 1
            except Exception as e:  # noqa: BLE001 - any refusal is the expected outcome
                print(f"{folder}: refused by transformers as expected ({type(e).__name__}): "
                      f"{cfg.get('whittle_irregular')}")
            continue
        with tempfile.NamedTemporaryFile(suffix=".json") as out:
            subprocess.run([a.whittle, "eval", "logits", "--model", folder, "--data", a.data,
                            "--tokens", str(a.tokens), "--json", out.name], check=True)
            w = json.load(open(out.name))
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        model.eval()
        with torch.no_grad():
            t = model(torch.tensor([w["ids"]])).logits[0]
        diff = (t - torch.tensor(w["logits"])).abs().max().item()
        scale = t.abs().max().item()
        ok = diff <= a.tolerance and diff <= a.rel_tolerance * scale
        bad += not ok
        shape = ", ".join(f"{k} {cfg[k]}" for k in (
            "model_type", "num_hidden_layers", "hidden_size", "intermediate_size",
            "num_attention_heads", "num_key_value_heads", "head_dim", "state_size")
            if k in cfg)
        print(f"{folder}: {shape}: max |logit diff| over {a.tokens} tokens {diff:.2e} "
              f"(max |logit| {scale:.1f}) {'ok' if ok else 'TOO LARGE'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
