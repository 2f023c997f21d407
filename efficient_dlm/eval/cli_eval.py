"""`edlm eval --ckpt DIR --tasks T1,T2 [--include_path DIR] [--out DIR]`: lm-evaluation-harness on a checkpoint.

The model is lm-eval's `edlm` (efficient_dlm/eval/lm.py); --model_args takes its settings in lm-eval's
syntax (`strategy=threshold,threshold=0.9,mc_samples=32`). The shipped demo tasks (edlm_demo,
edlm_demo_tasks, edlm_demo_<task>, edlm_demo_ll, edlm_demo_text) are always on the task path; any
lm-eval task works too (hub datasets need network access, or a local HF datasets cache with
HF_DATASETS_OFFLINE=1). --out DIR receives results.json (lm-eval's results with the decoding
settings, tokens per forward and tokens/s under config.edlm) and, with --log_samples, one
samples_<task>.jsonl per task.
"""
from __future__ import annotations

import json
import os

from absl import flags

from efficient_dlm.errors import UserError

MULTI_HOST = False

flags.DEFINE_string("ckpt", None, "checkpoint directory: an efficient_dlm checkpoint / run directory or a Hugging Face directory")
flags.DEFINE_list("tasks", [], "lm-eval task or group names, comma-separated (e.g. edlm_demo,edlm_demo_ll)")
flags.DEFINE_string("include_path", None, "a directory of extra lm-eval task YAMLs")
flags.DEFINE_string("out", None, "write results.json (and samples_<task>.jsonl with --log_samples) here")
flags.DEFINE_string("model_args", "", "the model's settings, lm-eval style: strategy=threshold,threshold=0.9,mc_samples=32")
flags.DEFINE_integer("batch_size", 16, "prompts per generate call / requests per scoring call")
flags.DEFINE_float("limit", None, "evaluate only this many documents per task (a fraction if < 1)")
flags.DEFINE_integer("num_fewshot", None, "few-shot examples per prompt (default: the task's)")
flags.DEFINE_bool("apply_chat_template", False, "format prompts with the tokenizer's chat template")
flags.DEFINE_bool("log_samples", False, "keep every prompt, response and score (written to --out)")
flags.DEFINE_string("metadata", None, 'JSON passed to every task, e.g. \'{"data_file": "runs/demo/data/tasks_eval.jsonl"}\'')
flags.DEFINE_bool("builtin_tasks", True, "also index lm-eval's ~15k built-in tasks (about 20 s); off: shipped and --include_path only")
flags.DEFINE_integer("bootstrap_iters", 100_000, "bootstrap resamples for metric standard errors (0: none)")


def evaluate(ckpt: str, tasks: list[str], *, include_path: str | None = None, model_args: str = "",
             batch_size: int = 16, limit: float | None = None, num_fewshot: int | None = None,
             apply_chat_template: bool = False, log_samples: bool = False, bootstrap_iters: int = 100_000,
             builtin_tasks: bool = True, metadata: str | None = None) -> dict:
    """lm_eval.simple_evaluate with the `edlm` model over `ckpt`; returns lm-eval's results dictionary."""
    try:
        import lm_eval  # the optional `eval` extra
        from lm_eval.tasks import TaskManager
        from lm_eval.utils import simple_parse_args_string

        from efficient_dlm.eval.lm import EdlmLM, task_dir
    except ImportError as err:
        raise UserError(f"edlm eval needs lm-evaluation-harness: pip install -e \".[eval]\" ({err})") from None
    if not tasks:
        raise UserError("--tasks: give at least one lm-eval task, e.g. --tasks edlm_demo")
    if include_path and not os.path.isdir(include_path):
        raise UserError(f"--include_path: {include_path!r} is not a directory")
    args = simple_parse_args_string(model_args) if model_args else {}
    if "ckpt" in args:
        raise UserError("--model_args: give the checkpoint with --ckpt, not ckpt=")
    model = EdlmLM(ckpt, **{"batch_size": batch_size, **args})
    try:
        meta = json.loads(metadata) if metadata else None
    except json.JSONDecodeError as err:
        raise UserError(f"--metadata: not JSON ({err})") from None
    if meta is not None and not isinstance(meta, dict):
        raise UserError("--metadata: must be a JSON object")
    manager = TaskManager(include_path=[task_dir()] + ([include_path] if include_path else []),
                          include_defaults=builtin_tasks, metadata=meta)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise UserError(f"--tasks: unknown task(s) {', '.join(unknown)} (see `lm_eval ls tasks`, or --include_path)")
    return lm_eval.simple_evaluate(
        model=model, tasks=list(tasks), task_manager=manager, limit=limit, num_fewshot=num_fewshot,
        apply_chat_template=apply_chat_template, log_samples=log_samples, bootstrap_iters=bootstrap_iters,
        batch_size=batch_size,
    )


def write(results: dict, out: str) -> list[str]:
    """results.json and samples_<task>.jsonl (when samples were logged) under `out`; returns the paths."""
    from lm_eval.utils import handle_non_serializable

    os.makedirs(out, exist_ok=True)
    samples = results.pop("samples", None) or {}
    paths = [os.path.join(out, "results.json")]
    with open(paths[0], "w") as f:
        json.dump(results, f, indent=2, default=handle_non_serializable)
    for task, rows in samples.items():
        paths.append(os.path.join(out, f"samples_{task}.jsonl"))
        with open(paths[-1], "w") as f:
            for row in rows:
                f.write(json.dumps(row, default=handle_non_serializable) + "\n")
    return paths


def run(config, FLAGS) -> int:
    from lm_eval.utils import make_table

    if not FLAGS.ckpt:
        raise UserError("--ckpt DIR is required")
    results = evaluate(
        FLAGS.ckpt, FLAGS.tasks, include_path=FLAGS.include_path, model_args=FLAGS.model_args,
        batch_size=FLAGS.batch_size, limit=FLAGS.limit, num_fewshot=FLAGS.num_fewshot,
        apply_chat_template=FLAGS.apply_chat_template, log_samples=FLAGS.log_samples,
        bootstrap_iters=FLAGS.bootstrap_iters, builtin_tasks=FLAGS.builtin_tasks,
        metadata=FLAGS.metadata,
    )
    print(make_table(results))
    info = results["config"]["edlm"]
    gen = info["generate"]
    if gen["requests"]:
        print(f"generation: {gen['generated_tokens']} tokens, {gen['tokens_per_forward']:.2f} tokens per forward, "
              f"{gen['tokens_per_second']:.1f} tokens/s ({info['decoding']['strategy']})")
    if FLAGS.out:
        print("wrote " + ", ".join(write(results, FLAGS.out)))
    return 0
