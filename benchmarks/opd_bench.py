"""OPD versus block-diffusion training at equal training tokens, on exact-match tasks (docs/BENCHMARKS.md).

    PYTHONPATH=. python benchmarks/opd_bench.py --out runs/opd_bench [--teacher HF_OR_CKPT_DIR]

1. Task data: the demo's generated exact-match tasks (efficient_dlm/demo/tasks.py; --tasks_module
   names the file when the demo package is not importable), byte-level tokenizer.
2. Teacher: --teacher (e.g. the shipped demo teacher), else an AR model trained here on the task
   documents (`edlm train`, objective ar).
3. A common start: block-diffusion continued pretraining from the teacher (block 4).
4. From that start, two arms with the same training-token budget (tokens of the sequences the
   student trains on: block diffusion = the packed batch; OPD = prompt + generated tokens of the
   rollouts): more block diffusion, or OPD (block 4, 4 steps per block, top-16 KL).
5. Held-out task accuracy (exact match) and tokens per forward with threshold decoding, block 4,
   for the teacher (AR decoding), the start and both arms. Writes OUT/results.json and prints a table.
Every training stage is `efficient_dlm.train.loop.train` (what `edlm train` runs); a stage whose
run directory already holds its final step is reused, so an interrupted benchmark resumes.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time

import numpy as np

from efficient_dlm.data.byte_tokenizer import ASSET_DIR

TASKS = "reverse,upper,shift,sort"  # short byte-level documents a tiny teacher learns on a CPU


def _tasks_module(path: str | None):
    if path is None:
        from efficient_dlm.demo import tasks

        return tasks
    spec = importlib.util.spec_from_file_location("demo_tasks", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def write_data(out: str, tasks, names: list[str], train_count: int, eval_count: int, seed: int) -> dict[str, str]:
    paths = {k: os.path.join(out, f"{k}.jsonl") for k in ("documents", "prompts", "eval_prompts", "heldout")}
    train = tasks.instances("train", train_count, seed, names)
    held = tasks.instances("eval", eval_count, seed, names)
    rows = {
        "documents": [{"text": i.text} for i in train],
        "prompts": [{"prompt": i.prompt} for i in train],
        "eval_prompts": [{"prompt": i.prompt} for i in held[: eval_count // 2]],
        "heldout": [{"prompt": i.prompt, "reference": i.answer, "task": i.task} for i in held],
    }
    for key, items in rows.items():
        with open(paths[key], "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in items)
    return paths


def base(args, run_dir: str):
    recipe = os.path.join(os.path.dirname(__file__), "..", "configs", "opd_tiny.py")
    spec = importlib.util.spec_from_file_location("opd_tiny", recipe)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    c.model.update(dict(hidden_size=args.hidden, intermediate_size=3 * args.hidden, num_layers=args.layers,
                        num_heads=args.hidden // 32, num_kv_heads=max(1, args.hidden // 64), head_dim=32))
    c.init.tokenizer = ASSET_DIR
    c.data.seq_len, c.data.num_threads = 128, 1
    c.diffusion.block_size, c.diffusion.block_size_schedule = 4, ""
    c.train.update(dict(batch_size=args.batch, schedule="constant", warmup_steps=20, weight_decay=0.01,
                        progress=False, log_every=1, eval_every=0, keep_best=False))
    c.run_dir = run_dir
    return c


def stage(config, steps: int):
    """Runs (or resumes / reuses) one training stage; returns its summed training tokens and seconds."""
    from efficient_dlm.train.loop import train

    config.train.steps = steps
    config.train.save_every = steps
    started = time.perf_counter()
    result = train(config)
    logged = [json.loads(x) for x in open(os.path.join(config.run_dir, "metrics.jsonl")) if '"train"' in x]
    tokens = sum(x["tokens"] for x in logged if x["step"] <= steps)  # log_every = 1: every step
    return result, tokens, time.perf_counter() - started


def evaluate(checkpoint: str, heldout: str, *, strategy: str, threshold: float, max_new: int) -> dict:
    from efficient_dlm import checkpoints
    from efficient_dlm.data.tokenize import load_tokenizer
    from efficient_dlm.sample import generate
    from efficient_dlm.sample.source import training_metadata

    model = checkpoints.load(checkpoint)
    meta = training_metadata(checkpoints.read_model_config(checkpoint)[1])
    tok = load_tokenizer(ASSET_DIR)
    rows = [json.loads(x) for x in open(heldout)]
    prompts = [tok.encode(r["prompt"]).ids for r in rows]
    bucket = 1 << (max(len(q) for q in prompts) - 1).bit_length()  # one prompt shape for every batch
    hits, generated, forwards = [], 0, 0
    for i in range(0, len(prompts), 64):
        out = generate(model, prompts[i : i + 64], max_new_tokens=max_new, strategy=strategy, threshold=threshold,
                       block_size=None if strategy == "ar" else 4, prompt_bucket=bucket,
                       valid_vocab_size=meta["valid_vocab_size"])
        generated += int(out.lengths.sum())
        forwards += int(out.row_forwards.sum())
        for seq, row in zip(out.sequences, rows[i : i + 64]):
            text = tok.decode([t for t in seq if t != model.config.eos_token_id])
            hits.append(text.strip() == row["reference"].strip())
    return {"accuracy": 100.0 * float(np.mean(hits)), "tokens_per_forward": generated / max(forwards, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--teacher", default=None, help="AR teacher (HF dir or checkpoint); default: train one here")
    p.add_argument("--tasks_module", default=None, help="path of the demo's tasks.py if efficient_dlm.demo is absent")
    p.add_argument("--tasks", default=TASKS)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--teacher_steps", type=int, default=2000)
    p.add_argument("--start_steps", type=int, default=600, help="common block-diffusion start")
    p.add_argument("--bd_steps", type=int, default=300, help="block-diffusion arm; OPD gets the same tokens")
    p.add_argument("--opd_max_new", type=int, default=24)
    p.add_argument("--eval_count", type=int, default=256)
    p.add_argument("--thresholds", default="0.9,0.7")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    names = args.tasks.split(",")
    data = write_data(args.out, _tasks_module(args.tasks_module), names, 20000, args.eval_count, seed=0)
    record: dict = {"args": vars(args), "stages": {}}

    teacher = args.teacher
    if teacher is None:
        c = base(args, os.path.join(args.out, "teacher"))
        c.diffusion.objective, c.data.train_files, c.train.learning_rate = "ar", data["documents"], 1e-3
        _, tokens, seconds = stage(c, args.teacher_steps)
        record["stages"]["teacher"] = {"steps": args.teacher_steps, "tokens": tokens, "seconds": seconds}
        teacher = c.run_dir

    def from_checkpoint(name: str, init: str, objective: str):
        c = base(args, os.path.join(args.out, name))
        c.init.checkpoint, c.model.mask_token_id = init, 511
        c.diffusion.objective, c.data.train_files, c.train.learning_rate = objective, data["documents"], 5e-4
        c.opd.update(dict(teacher=teacher, prompt_files=data["prompts"], eval_files=data["eval_prompts"],
                          max_new_tokens=args.opd_max_new, max_new_tokens_schedule="", max_prompt_len=64))
        return c

    start = from_checkpoint("start", teacher, "block_diffusion")
    _, tokens, seconds = stage(start, args.start_steps)
    record["stages"]["start"] = {"steps": args.start_steps, "tokens": tokens, "seconds": seconds}
    bd = from_checkpoint("bd", start.run_dir, "block_diffusion")
    _, bd_tokens, seconds = stage(bd, args.bd_steps)
    record["stages"]["bd"] = {"steps": args.bd_steps, "tokens": bd_tokens, "seconds": seconds}
    # OPD: measure its tokens per step on a short first stage, then resume up to the same token budget.
    opd = from_checkpoint("opd", start.run_dir, "opd")
    _, probe_tokens, _ = stage(opd, 10)
    opd_steps = max(10, int(round(bd_tokens / (probe_tokens / 10))))
    _, opd_tokens, seconds = stage(opd, opd_steps)
    record["stages"]["opd"] = {"steps": opd_steps, "tokens": opd_tokens, "seconds": seconds}

    results = []
    models = [("teacher (AR)", teacher, "ar")]
    models += [(name, os.path.join(args.out, name), "threshold") for name in ("start", "bd", "opd")]
    for name, ckpt, strategy in models:
        for tau in [0.0] if strategy == "ar" else [float(t) for t in args.thresholds.split(",")]:
            row = {"model": name, "strategy": strategy, "threshold": tau if strategy != "ar" else None}
            row.update(evaluate(ckpt, data["heldout"], strategy=strategy, threshold=tau, max_new=32))
            row["training_tokens"] = record["stages"].get(name, {}).get("tokens")
            results.append(row)
            print(json.dumps(row), flush=True)
    record["results"] = results
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(record, f, indent=2)
    print(f"\n| model | decoding | accuracy % | tokens/forward |\n|---|---|---:|---:|")
    for r in results:
        decoding = "AR" if r["strategy"] == "ar" else f"threshold {r['threshold']}"
        print(f"| {r['model']} | {decoding} | {r['accuracy']:.1f} | {r['tokens_per_forward']:.2f} |")


if __name__ == "__main__":
    main()
