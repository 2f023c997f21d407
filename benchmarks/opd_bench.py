"""OPD versus block-diffusion training at equal training tokens, on exact-match tasks (docs/BENCHMARKS.md).

    PYTHONPATH=. python benchmarks/opd_bench.py --out runs/opd_bench \
        [--teacher HF_DIR_OR_CHECKPOINT] [--tasks_module path/to/efficient_dlm/demo/tasks.py]

1. Task data: the demo's generated exact-match tasks (efficient_dlm/demo/tasks.py; --tasks_module
   names the file when the demo package is not importable): training documents, OPD prompts, and
   held-out prompts with answers (disjoint from training by the tasks' own split).
2. Teacher: --teacher, a Hugging Face directory (e.g. the shipped demo teacher) or an orbax checkpoint
   / training run (its latest step), with its own tokenizer and [MASK] token (<|mask|>, else one is
   appended); without --teacher, an AR model is trained here (`edlm train`, objective ar) on the task
   documents with the byte-level tokenizer.
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
import dataclasses
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


@dataclasses.dataclass(frozen=True)
class Source:
    """Where the teacher lives and the tokens the students use."""

    path: str
    hf: bool  # a Hugging Face directory (else an orbax checkpoint or training run)
    tokenizer: str
    mask_token_id: int | None  # None: diffusion.mask_token="append"


def given_teacher(path: str) -> Source:
    from efficient_dlm import checkpoints
    from efficient_dlm.data.tokenize import load_tokenizer

    hf = not os.path.exists(os.path.join(path, checkpoints.CONFIG_NAME))
    tokenizer = path if hf else checkpoints.tokenizer_dir(path)
    if tokenizer is None or not os.path.exists(os.path.join(tokenizer, "tokenizer.json")):
        raise FileNotFoundError(f"--teacher {path!r}: no tokenizer.json (HF directory or checkpoint with tokenizer/)")
    return Source(path, hf, tokenizer, load_tokenizer(tokenizer).token_to_id("<|mask|>"))


def base(args, run_dir: str):
    recipe = os.path.join(os.path.dirname(__file__), "..", "configs", "opd_tiny.py")
    spec = importlib.util.spec_from_file_location("opd_tiny", recipe)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    c.model.update(dict(hidden_size=args.hidden, intermediate_size=3 * args.hidden, num_layers=args.layers,
                        num_heads=args.hidden // 32, num_kv_heads=max(1, args.hidden // 64), head_dim=32))
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


def load_model(path: str, hf: bool):
    """(model, valid_vocab_size) of an HF directory or an orbax checkpoint / run."""
    from efficient_dlm import checkpoints

    if hf:
        from efficient_dlm.port.hf_import import from_hf

        return from_hf(path), None
    return checkpoints.load(path), checkpoints.read_model_config(path)[1].get("valid_vocab_size")


def evaluate(model, valid_vocab, tokenizer: str, heldout: str, *, strategy: str, threshold: float, max_new: int,
             batch: int = 64) -> dict:
    """Greedy decoding of every held-out prompt (one batch shape: padded with the last prompt)."""
    from efficient_dlm.data.tokenize import load_tokenizer
    from efficient_dlm.sample import generate

    tok, eos = load_tokenizer(tokenizer), model.config.eos_token_id
    rows = [json.loads(x) for x in open(heldout)]
    prompts = [tok.encode(r["prompt"]).ids for r in rows]
    bucket = 1 << (max(len(q) for q in prompts) - 1).bit_length()  # one prompt shape for every batch
    hits: dict[str, list[bool]] = {}
    generated = forwards = 0
    for i in range(0, len(prompts), batch):
        real = prompts[i : i + batch]
        out = generate(model, real + [real[-1]] * (batch - len(real)), max_new_tokens=max_new, strategy=strategy,
                       threshold=threshold, block_size=None if strategy == "ar" else 4, prompt_bucket=bucket,
                       valid_vocab_size=valid_vocab)
        generated += int(out.lengths[: len(real)].sum())
        forwards += int(out.row_forwards[: len(real)].sum())
        for seq, row in zip(out.sequences[: len(real)], rows[i : i + batch]):
            text = tok.decode([t for t in seq if t != eos])
            hits.setdefault(row["task"], []).append(text.strip() == row["reference"].strip())
    every = [h for task in hits.values() for h in task]
    return {"accuracy": 100.0 * float(np.mean(every)), "tokens_per_forward": generated / max(forwards, 1),
            "per_task": {task: 100.0 * float(np.mean(h)) for task, h in sorted(hits.items())}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--teacher", default=None, help="AR teacher (HF dir or checkpoint); default: train one here")
    p.add_argument("--tasks_module", default=None, help="path of the demo's tasks.py if efficient_dlm.demo is absent")
    p.add_argument("--tasks", default=None, help=f"comma-separated; default: every task with --teacher, else {TASKS}")
    p.add_argument("--hidden", type=int, default=128, help="self-trained teacher only")
    p.add_argument("--layers", type=int, default=4, help="self-trained teacher only")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-4, help="both arms and the start (constant after warm-up)")
    p.add_argument("--teacher_steps", type=int, default=2000)
    p.add_argument("--start_steps", type=int, default=600, help="common block-diffusion start")
    p.add_argument("--bd_steps", type=int, default=300, help="block-diffusion arm; OPD gets the same tokens")
    p.add_argument("--opd_max_new", type=int, default=24)
    p.add_argument("--eval_count", type=int, default=256)
    p.add_argument("--eval_max_new", type=int, default=32)
    p.add_argument("--thresholds", default="0.9,0.7")
    args = p.parse_args()
    args.out = os.path.abspath(args.out)  # orbax wants absolute paths
    os.makedirs(args.out, exist_ok=True)
    tasks = _tasks_module(args.tasks_module)
    names = args.tasks.split(",") if args.tasks else list(tasks.TASKS) if args.teacher else TASKS.split(",")
    data = write_data(args.out, tasks, names, 20000, args.eval_count, seed=0)
    record: dict = {"args": vars(args), "tasks": names, "stages": {}}

    if args.teacher is None:
        c = base(args, os.path.join(args.out, "teacher"))
        c.init.tokenizer = ASSET_DIR
        c.diffusion.objective, c.data.train_files, c.train.learning_rate = "ar", data["documents"], 1e-3
        _, tokens, seconds = stage(c, args.teacher_steps)
        record["stages"]["teacher"] = {"steps": args.teacher_steps, "tokens": tokens, "seconds": seconds}
        source = Source(c.run_dir, False, ASSET_DIR, 511)  # the byte tokenizer leaves ids 259.. unused
    else:
        source = given_teacher(args.teacher)
    record["teacher"] = dataclasses.asdict(source)

    start_from = source.path
    if source.hf:  # the students start from an orbax copy of the teacher (what `edlm import-hf` writes)
        start_from = os.path.join(args.out, "teacher_ckpt")
        if not os.path.exists(start_from):
            from efficient_dlm import checkpoints

            checkpoints.save(load_model(source.path, True)[0], start_from, tokenizer_dir=source.tokenizer)

    def from_source(name: str, init: str | None, objective: str):
        """A student stage initialised from `init` (a run of this benchmark), else from the teacher."""
        c = base(args, os.path.join(args.out, name))
        c.init.checkpoint = init or start_from
        c.init.tokenizer = source.tokenizer
        c.model.mask_token_id = source.mask_token_id
        c.diffusion.mask_token = "model" if source.mask_token_id is not None else "append"
        c.diffusion.objective, c.data.train_files, c.train.learning_rate = objective, data["documents"], args.lr
        c.opd.update(dict(teacher=source.path, prompt_files=data["prompts"], eval_files=data["eval_prompts"],
                          max_new_tokens=args.opd_max_new, max_new_tokens_schedule="", max_prompt_len=64))
        return c

    start = from_source("start", None, "block_diffusion")
    _, tokens, seconds = stage(start, args.start_steps)
    record["stages"]["start"] = {"steps": args.start_steps, "tokens": tokens, "seconds": seconds}
    bd = from_source("bd", start.run_dir, "block_diffusion")
    _, bd_tokens, seconds = stage(bd, args.bd_steps)
    record["stages"]["bd"] = {"steps": args.bd_steps, "tokens": bd_tokens, "seconds": seconds}
    # OPD: measure its tokens per step on a short first stage, then resume up to the same token budget.
    opd = from_source("opd", start.run_dir, "opd")
    _, probe_tokens, _ = stage(opd, 10)
    opd_steps = max(10, int(round(bd_tokens / (probe_tokens / 10))))
    _, opd_tokens, seconds = stage(opd, opd_steps)
    record["stages"]["opd"] = {"steps": opd_steps, "tokens": opd_tokens, "seconds": seconds}

    results = []
    models = [("teacher (AR)", source.path, source.hf, "ar")]
    models += [(name, os.path.join(args.out, name), False, "threshold") for name in ("start", "bd", "opd")]
    for name, path, hf, strategy in models:
        model, valid_vocab = load_model(path, hf)
        for tau in [0.0] if strategy == "ar" else [float(t) for t in args.thresholds.split(",")]:
            row = {"model": name, "strategy": strategy, "threshold": tau if strategy != "ar" else None}
            row.update(evaluate(model, valid_vocab, source.tokenizer, data["heldout"], strategy=strategy,
                                threshold=tau, max_new=args.eval_max_new))
            row["training_tokens"] = record["stages"].get(name, {}).get("tokens")
            results.append(row)
            print(json.dumps(row), flush=True)
    record["results"] = results
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(record, f, indent=2)
    print("\n| model | training tokens | decoding | accuracy % | tokens/forward |\n|---|---:|---|---:|---:|")
    for r in results:
        decoding = "AR" if r["strategy"] == "ar" else f"threshold {r['threshold']}"
        tokens = "" if r["training_tokens"] is None else f"{r['training_tokens']:,.0f}"
        print(f"| {r['model']} | {tokens} | {decoding} | {r['accuracy']:.1f} | {r['tokens_per_forward']:.2f} |")


if __name__ == "__main__":
    main()
