"""Quantized inference on the demo models (issue 24): accuracy, tokens per forward and tokens/s of the
dLM at each threshold and of its AR teacher, for float / int8 weights / int8 weights + int8 KV cache.

    PYTHONPATH=. python benchmarks/quantized_demo.py --dlm RUN/train --teacher TEACHER_HF_DIR \
        --prompts RUN/data/tasks_eval.jsonl [--thresholds 0.9,0.95,0.99] [--dtype bfloat16] [--out results.json]

Both models are quantized the same way in each row (`efficient_dlm.quantize_model`, qwix per channel;
the LM head and embeddings too). Decoding is the demo evaluator's (efficient_dlm/demo/evaluate.py
`task_eval`: greedy, batch 64, one prompt bucket, exact match), so the float row reproduces the demo
report's numbers (--dtype: both models loaded in that parameter and compute dtype first, float32 by
default; the float row is then that dtype). Accuracy and TPF are deterministic; tokens/s is the compiled program's time at
batch 64 (warm-up excluded) and only means something on an unloaded machine. Each quantized row also
gets the paired accuracy difference from the float row on the same prompts (95% interval).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from efficient_dlm import checkpoints  # noqa: E402
from efficient_dlm.demo.data import eval_tasks  # noqa: E402
from efficient_dlm.demo.evaluate import paired_difference, task_eval  # noqa: E402
from efficient_dlm.demo.tokenizer import load as load_tokenizer  # noqa: E402
from efficient_dlm.models.quantize import Quantization, quantize_model  # noqa: E402
from efficient_dlm.port.hf_import import from_hf  # noqa: E402

ROWS = (("none", "none"), ("int8", "none"), ("int8", "int8"))  # (weights, KV cache)


def _load(path: str, dtype: str):
    """An orbax checkpoint / training run (its newest step) or a Hugging Face directory, in `dtype`."""
    if os.path.exists(os.path.join(path, "model_config.json")):
        return checkpoints.load(path, dtype=dtype)
    return from_hf(path, dtype=dtype)


def _summary(result: dict, reference: dict | None) -> dict:
    keep = ("strategy", "threshold", "tokens_per_forward", "tokens_per_second", "generated_tokens", "seconds")
    out = {"accuracy": result["accuracy"]["all"], "per_task": result["accuracy"], **{k: result[k] for k in keep}}
    if reference is not None:
        out["vs_float"] = paired_difference(result["correct"], reference["correct"])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dlm", required=True)
    p.add_argument("--teacher", required=True)
    p.add_argument("--prompts", required=True)
    p.add_argument("--thresholds", default="0.9,0.95,0.99")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--max_new_tokens", type=int, default=32)
    p.add_argument("--dtype", default="float32", help="parameters and compute of both models before quantization")
    p.add_argument("--limit", type=int, default=0, help="the first N prompts only (a quick check)")
    p.add_argument("--out", default="")
    args = p.parse_args()
    thresholds = [float(t) for t in args.thresholds.split(",")]
    items, tokenizer = eval_tasks(args.prompts)[: args.limit or None], load_tokenizer(args.teacher)
    dlm, teacher = _load(args.dlm, args.dtype), _load(args.teacher, args.dtype)
    common = dict(batch_size=args.batch, max_new_tokens=args.max_new_tokens)
    rows, floats = [], {}
    for weights, kv in ROWS:
        name = Quantization(weights, quantize_kv=kv).describe()
        q = dict(quantize=weights, quantize_kv=kv)
        results = {"ar": task_eval(quantize_model(teacher, **q), tokenizer, items, strategy="ar", **common)}
        q_dlm = quantize_model(dlm, **q)
        for t in thresholds:
            results[f"threshold_{t:g}"] = task_eval(q_dlm, tokenizer, items, strategy="threshold", threshold=t, **common)
        if not floats:
            floats = results
        row = {"quantization": name, "weights": weights, "kv": kv,
               "settings": {k: _summary(r, None if r is floats[k] else floats[k]) for k, r in results.items()}}
        rows.append(row)
        for k, r in row["settings"].items():
            diff = r.get("vs_float", {}).get("diff")
            print(f"{name:40s} {k:16s} acc {r['accuracy']:5.1f}  TPF {r['tokens_per_forward']:.3f}  "
                  f"{r['tokens_per_second']:8.0f} tok/s" + ("" if diff is None else f"  vs float {diff:+.1f}"),
                  flush=True)
        if args.out:  # after every row: a long run keeps what it measured
            with open(args.out, "w") as f:
                json.dump({"prompts": len(items), "dlm": args.dlm, "teacher": args.teacher, "dtype": args.dtype, "rows": rows},
                      f, indent=2)


if __name__ == "__main__":
    main()
