"""The demo tasks through lm-eval (the model `edlm`) beside the project's own evaluator, and the ELBO's error bars.

1. Generation: the AR demo teacher (and, with --dlm DIR, a trained demo dLM at threshold 0.9) on the
   shipped `edlm_demo` task and the per-task group `edlm_demo_tasks` (the demo's 600 held-out prompts, greedy exact match) through
   `lm_eval.simple_evaluate`, and the same prompts through efficient_dlm/demo/evaluate.py:task_eval in
   the same process: accuracy, tokens per forward, generated tokens/s (compiled programs, after warm-up).
2. ELBO standard error against the number of Monte Carlo masks, on the first --elbo_requests answers
   of `edlm_demo_ll` (the dLM of --dlm, else the teacher's weights read as a block-4 token-shift dLM,
   untrained, which fixes only the estimator's spread): uniform masking, uniform with complementary
   pairs, and the training law (position-dependent); the mean over requests of the reported standard error.

    python benchmarks/lm_eval_demo.py [--dlm runs/demo/train] [--out lm_eval_demo.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import lm_eval  # noqa: E402
import numpy as np  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

import efficient_dlm as edlm  # noqa: E402
from efficient_dlm.demo import teacher  # noqa: E402
from efficient_dlm.demo.evaluate import task_eval  # noqa: E402
from efficient_dlm.demo.tokenizer import load as load_tokenizer  # noqa: E402
from efficient_dlm.eval import likelihood  # noqa: E402
from efficient_dlm.eval.lm import EdlmLM, elbo_objective, task_dir  # noqa: E402
from efficient_dlm.eval.loading import load  # noqa: E402
from efficient_dlm.eval.tasks.utils import DEMO_FILE, read_rows  # noqa: E402
from efficient_dlm.demo.tasks import TASKS, Instance  # noqa: E402


def generation(ckpt: str, strategy: str, batch: int, items: list[Instance], model) -> dict:
    lm = EdlmLM(ckpt, strategy=strategy, threshold=0.9, batch_size=batch, max_gen_toks=32)
    results = lm_eval.simple_evaluate(model=lm, tasks=["edlm_demo", "edlm_demo_tasks"], bootstrap_iters=0,
                                      task_manager=TaskManager(include_path=task_dir(), include_defaults=False))
    info = results["config"]["edlm"]["generate"]
    block = lm.decoding["block_size"]
    ours = task_eval(model, load_tokenizer(lm.loaded.tokenizer_dir), items, strategy=strategy, threshold=0.9,
                     block_size=block, token_shift=bool(lm.loaded.diffusion and lm.loaded.diffusion.token_shift),
                     batch_size=batch, max_new_tokens=32)
    return {"ckpt": ckpt, "strategy": strategy, "lm_eval_accuracy": 100 * results["results"]["edlm_demo"]["exact_match,none"],
            "lm_eval_tpf": info["tokens_per_forward"], "lm_eval_tok_s": info["tokens_per_second"],
            "lm_eval_per_task": {t: 100 * results["results"][f"edlm_demo_{t}"]["exact_match,none"] for t in TASKS},
            "demo_per_task": {t: ours["accuracy"][t] for t in TASKS},
            "demo_accuracy": ours["accuracy"]["all"], "demo_tpf": ours["tokens_per_forward"],
            "demo_tok_s": ours["tokens_per_second"]}


def elbo_errors(ckpt: str, requests: int, counts: list[int]) -> list[dict]:
    loaded = load(ckpt)
    tok = loaded.tokenizer
    rows = read_rows(DEMO_FILE)[:requests]
    pairs = [(tok.encode(r["prompt"]).ids, tok.encode(r["prompt"] + r["answer"]).ids[len(tok.encode(r["prompt"]).ids):])
             for r in rows]
    out = []
    for label, masking, complementary in (("uniform", "uniform", False), ("uniform + complementary", "uniform", True),
                                          ("training law (position)", "train", False)):
        plan = likelihood.ElboPlan(elbo_objective(loaded.diffusion, masking, complementary,
                                                  loaded.model.config.mask_token_id), copies=1)
        for count in counts:
            scores = likelihood.dlm_loglikelihood(loaded.model, plan, pairs, batch_size=requests, samples=count,
                                                  seed=0, prefix_id=0, samples_per_call=min(count, 16))
            out.append({"law": label, "masks": count, "mean_elbo": float(-scores.logprob.mean()),
                        "mean_stderr": float(np.nanmean(scores.stderr))})
            print(out[-1], flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dlm", default=None, help="a trained demo dLM (runs/demo/train)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--elbo_requests", type=int, default=60)
    parser.add_argument("--counts", default="2,8,32,128")
    parser.add_argument("--skip_elbo", action="store_true")
    parser.add_argument("--skip_generation", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    items = [Instance(r["task"], r["prompt"], r["answer"]) for r in read_rows(DEMO_FILE)]
    report = {"generation": []}
    if not args.skip_generation:
        report["generation"].append(generation(teacher.teacher_dir(), "ar", args.batch, items, edlm.from_hf(teacher.teacher_dir())))
        print(report["generation"][-1], flush=True)
    elbo_ckpt = args.dlm
    if args.dlm and not args.skip_generation:
        report["generation"].append(generation(args.dlm, "threshold", args.batch, items, edlm.load(args.dlm)))
        print(report["generation"][-1], flush=True)
    elif not args.dlm:
        elbo_ckpt = tempfile.mkdtemp(prefix="teacher_as_dlm_")
        diffusion = {"objective": "block_diffusion", "block_size": 4, "token_shift": True, "masking": "position"}
        edlm.save(edlm.from_hf(teacher.teacher_dir()), elbo_ckpt, tokenizer_dir=teacher.teacher_dir(), force=True,
                  extra={"train_config": {"diffusion": diffusion}})
    report["elbo"] = [] if args.skip_elbo else elbo_errors(elbo_ckpt, args.elbo_requests, [int(c) for c in args.counts.split(",")])
    print("| model | decoding | lm-eval accuracy | demo evaluator accuracy | TPF | tok/s (lm-eval) | tok/s (demo) |")
    print("|---|---|---|---|---|---|---|")
    for g in report["generation"]:
        print(f"| {g['ckpt']} | {g['strategy']} | {g['lm_eval_accuracy']:.1f} | {g['demo_accuracy']:.1f} | "
              f"{g['lm_eval_tpf']:.2f} | {g['lm_eval_tok_s']:.0f} | {g['demo_tok_s']:.0f} |")
        print("per task, lm-eval (edlm_demo_tasks):", g["lm_eval_per_task"], "demo evaluator:", g["demo_per_task"])
    print("| law | masks | mean ELBO (nats) | mean standard error |")
    print("|---|---|---|---|")
    for e in report["elbo"]:
        print(f"| {e['law']} | {e['masks']} | {e['mean_elbo']:.3f} | {e['mean_stderr']:.3f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
