"""Held-out evaluation of the AR teacher and the dLM: task accuracy, decoding speed, text NLL / ELBO.

Task accuracy runs the project's sampler (`efficient_dlm.generate`): strategy "ar" for the teacher,
"threshold" at several thresholds for the dLM, greedy, the same prompts and batch for both. Speed is
generated tokens (stop token included, prompt never) per second of the compiled program after a
warm-up call; tokens per forward (TPF) is the sampler's per-row count. Text quality is the trainer's
own evaluation step on held-out documents: next-token NLL for the teacher (objective ar), the block
diffusion ELBO (an upper bound on the dLM's NLL) for the dLM, both in nats per token.
"""
from __future__ import annotations

import time
from typing import Any, Sequence

import jax
import numpy as np

from efficient_dlm.config import Config, override
from efficient_dlm.demo import tasks
from efficient_dlm.diffusion.spec import spec_of
from efficient_dlm.data.pipeline import build_dataset, take
from efficient_dlm.sample.api import generate
from efficient_dlm.train.loop import data_spec
from efficient_dlm.train.state import split_model
from efficient_dlm.train.step import make_eval_step


def prompt_ids(tokenizer, items: Sequence[tasks.Instance]) -> list[list[int]]:
    return [tokenizer.encode(inst.prompt).ids for inst in items]


def _decode(tokenizer, ids: list[int], stop_id: int | None) -> str:
    if stop_id is not None and ids and ids[-1] == stop_id:
        ids = ids[:-1]
    return tokenizer.decode(ids)


def _decode_all(model, tokenizer, prompts: list[list[int]], batch_size: int, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Greedy decoding of `prompts` in batches of one shape (one compilation, warm-up not timed)."""
    batches = [prompts[i : i + batch_size] for i in range(0, len(prompts), batch_size)]
    batches = [b + [b[-1]] * (batch_size - len(b)) for b in batches]  # one batch shape: compile once
    generate(model, batches[0], **kwargs)  # warm-up (compilation), not timed
    predictions: list[str] = []
    generated = forwards = verifier_forwards = 0
    seconds = 0.0
    stop_id = model.config.eos_token_id
    for batch, start in zip(batches, range(0, len(prompts), batch_size)):
        real = min(batch_size, len(prompts) - start)
        out = generate(model, batch, **kwargs)
        seconds += out.program_seconds
        generated += int(out.lengths[:real].sum())
        forwards += int(out.row_forwards[:real].sum())
        if out.row_verifier_forwards is not None:
            verifier_forwards += int(out.row_verifier_forwards[:real].sum())
        predictions += [_decode(tokenizer, seq, stop_id) for seq in out.sequences[:real]]
    return {"predictions": predictions, "generated": generated, "forwards": forwards, "seconds": seconds,
            "verifier_forwards": verifier_forwards}


def task_eval(
    model,
    tokenizer,
    items: Sequence[tasks.Instance],
    *,
    strategy: str,
    threshold: float | None = None,
    block_size: int | None = None,
    token_shift: bool | None = None,
    batch_size: int = 64,
    max_new_tokens: int = 32,
    speed_prompts: int = 0,
    verifier=None,
    verifier_name: str | None = None,
) -> dict[str, Any]:
    """Greedy decoding of every held-out prompt; exact-match accuracy and decoding statistics.
    Settings left unset (threshold, block size, token shift) are the model's diffusion spec.
    strategy "speculative": `verifier` ("self" or an AR model, named `verifier_name` in the results) checks
    one-step drafts; tokens per forward counts drafter and verifier forwards alike.

    tokens/s is measured at `batch_size` over all prompts and, when `speed_prompts` > 0, at batch 1
    over the first `speed_prompts` of them (a latency-bound user's speed; `tok_s` maps batch size to it).
    """

    prompts = prompt_ids(tokenizer, items)
    bucket = 1 << (max(len(p) for p in prompts) - 1).bit_length()  # one prompt shape for every batch
    kwargs = dict(
        max_new_tokens=max_new_tokens, strategy=strategy, threshold=threshold, prompt_bucket=bucket,
        block_size=None if strategy == "ar" else block_size,
        token_shift=None if strategy == "ar" else token_shift,
        **({"verifier": verifier, "draft_steps": 1} if strategy == "speculative" else {}),
    )
    run = _decode_all(model, tokenizer, prompts, batch_size, kwargs)
    predictions, generated, seconds = run["predictions"], run["generated"], run["seconds"]
    tok_s = {str(batch_size): generated / max(seconds, 1e-9)}
    if speed_prompts > 0:
        solo = _decode_all(model, tokenizer, prompts[:speed_prompts], 1, kwargs)
        tok_s["1"] = solo["generated"] / max(solo["seconds"], 1e-9)
    return {
        "strategy": strategy,
        "threshold": (threshold if threshold is not None else spec_of(model).threshold) if strategy != "ar" else None,
        "accuracy": tasks.accuracy(predictions, list(items)),
        "correct": [tasks.exact_match(p, inst.answer) for p, inst in zip(predictions, items)],
        "tokens_per_forward": generated / max(run["forwards"], 1),
        **({"verifier": verifier_name or "model", "tokens_per_verifier_forward": generated / max(run["verifier_forwards"], 1)}
           if strategy == "speculative" else {}),
        "tokens_per_second": tok_s[str(batch_size)],
        "tok_s": tok_s,
        "generated_tokens": generated,
        "seconds": seconds,
        "examples": [
            {"prompt": inst.prompt, "answer": inst.answer.strip(), "output": pred.strip()}
            for inst, pred in list(zip(items, predictions))[:: max(1, len(items) // 7)][:7]
        ],
    }


def paired_difference(correct: Sequence[bool], reference: Sequence[bool]) -> dict[str, float]:
    """Accuracy difference (points) of one setting from the reference on the same prompts, with the
    paired 95% normal interval: per-prompt differences d_i in {-1, 0, 1}, mean +- 1.96 sd / sqrt(n)."""
    if len(correct) != len(reference) or not len(correct):
        raise ValueError(f"paired difference over {len(correct)} and {len(reference)} prompts")
    d = 100.0 * (np.asarray(correct, float) - np.asarray(reference, float))
    half = 1.96 * float(d.std(ddof=1)) / np.sqrt(len(d)) if len(d) > 1 else float("nan")
    return {"diff": float(d.mean()), "low": float(d.mean()) - half, "high": float(d.mean()) + half}


def text_eval(config: Config, model, batches: int, *, objective: str) -> dict[str, float]:
    """The trainer's evaluation step over the first `batches` batches of config.data.eval_files.

    objective "ar" gives the next-token NLL; "block_diffusion" (or another diffusion objective of
    the trainer) gives the ELBO: sum over masked tokens of CE * n / k (docs/METHOD.md section 3),
    per token of text, with the recipe's attention and block size but uniform masking without
    complementary pairs (the law under which its expectation is the any-order bound on the dLM's
    NLL, whatever masking the recipe trained with) and a fixed key, so it is reproducible run to
    run. Both are in nats per token.
    """
    config = override(config, {"data.format": "text", "data.chat_template": ""})  # held-out documents, whatever it trained on
    # the bound needs the ELBO weight under uniform masking, whatever the recipe trained with; no CAP or
    # joint AR term (an evaluation measures the bound itself; objective ar, the teacher's NLL, has none)
    diffusion = config.diffusion.replace(objective=objective, loss_weighting="elbo", masking="uniform",
                                         complementary=False, rate_min=1e-6, rate_max=1.0, confidence_weight=0.0,
                                         ar_weight=0.0)
    spec = data_spec(config, model.config, config.init.tokenizer or config.init.hf_dir or None)
    data = take(build_dataset(config.data.eval_files, spec, train=False), batches)
    block = None if objective == "ar" else diffusion.block_size
    step = make_eval_step(diffusion, config.train, model.config, block_size=block)
    _, params = split_model(model)
    key = jax.random.PRNGKey(config.seed + 1)
    totals = None
    for j, batch in enumerate(data):
        sums = step(params, jax.device_put(batch), jax.random.fold_in(key, j))
        totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
    totals = {k: float(v) for k, v in jax.device_get(totals).items()}
    # AR: every token with a predecessor is scored once (count); diffusion: weights n / k over the
    # masked tokens estimate the sum over all tokens, so divide by the token count.
    denominator = totals["count"] if objective == "ar" else totals["tokens"]
    return {"nll_per_token": totals["loss"] / max(denominator, 1.0), "tokens": totals["tokens"], "batches": len(data)}


def summarize_curve(teacher: dict[str, Any], dlm: list[dict[str, Any]]) -> list[dict[str, float]]:
    """(threshold, accuracy, accuracy gap to the teacher, TPF, tokens/s) rows for the report."""
    base = teacher["accuracy"]["all"]
    return [
        {
            "threshold": r["threshold"],
            "accuracy": r["accuracy"]["all"],
            "gap": r["accuracy"]["all"] - base,
            "tokens_per_forward": r["tokens_per_forward"],
            "tokens_per_second": r["tokens_per_second"],
        }
        for r in sorted(dlm, key=lambda r: r["threshold"])
    ]


def mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else float("nan")
