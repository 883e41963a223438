"""Tables of benches/compare_llamacpp.sh's JSON files (one per SIMD level), as in BENCHMARKS.md.

    python3 benches/levels_table.py OUT_DIR
"""
import json
import os
import sys

out = sys.argv[1]


def load(level, dtype):
    p = os.path.join(out, f"{level}-{dtype}.json")
    return json.load(open(p)) if os.path.exists(p) else None


def row(doc, prefix):
    for r in (doc or {}).get("rows", []):
        if r["whittle"]["what"].startswith(prefix) or r["whittle"]["what"].endswith(prefix):
            return r
    return None


def fmt(v):
    return "—" if v is None else f"{v:.1f}"


def ratio(a, b):
    return "—" if a is None or b is None else f"{a / b:.2f}x"


levels = [l for l in ("scalar", "neon", "avx2", "avx512", "amx") if load(l, "q4_1")]
for level in levels:
    q4, q8 = load(level, "q4_1"), load(level, "q8_0")
    f32, f16 = load(level, "f32"), load(level, "f16")
    print(f"\n### {level} — {q4['cpu']}, {q4['threads']} threads\n")
    print("| measure | whittle tok/s | PyTorch fp32 | llama.cpp (same file) | vs PyTorch | vs llama.cpp |")
    print("|---|---|---|---|---|---|")
    lines = [
        ("prefill 512, f32 weights (llama.cpp: Q4_1 file)", row(q4, "prefill 512")),
        ("prefill 2048, f32 weights (llama.cpp: Q4_1 file)", row(q4, "prefill 2048")),
        ("prefill 512 vs llama.cpp F32 file", row(f32, "prefill 512")),
        ("prefill 512 vs llama.cpp F16 file", row(f16, "prefill 512")),
        ("decode, f32 weights (llama.cpp: F32 file)", row(f32, "f32 weights")),
        ("decode from Q4_1 blocks", row(q4, "weights as stored")),
        ("decode from Q8_0 blocks", row(q8, "weights as stored")),
    ]
    torch_decode = (row(q4, "weights as stored") or {}).get("PyTorch")
    for name, r in lines:
        if r is None:
            continue
        w = r["whittle"]["tokens_per_s"]
        t = r.get("PyTorch")
        if t is None and "decode" in name:
            t = torch_decode
        l = r.get("llama.cpp")
        print(f"| {name} | {fmt(w)} | {fmt(t)} | {fmt(l)} | {ratio(w, t)} | {ratio(w, l)} |")
    for b in q4.get("baselines", []):
        print(f"\n{b['name']}: {b['note']}")
