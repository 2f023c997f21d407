"""Log-likelihood of a continuation given a context: exact for AR models, the block-diffusion ELBO for dLMs.

AR: one causal forward over context + continuation; the sum of log p(x_i | x_<i) over the continuation
and whether every continuation token is the argmax (lm-eval's `is_greedy`).

dLM (docs/METHOD.md, "Scoring a continuation with a dLM"): a dLM has no exact likelihood; we estimate
the block-diffusion ELBO. The context stays clean; the continuation's blocks are corrupted by
`objectives.corrupt` (per-block count k of the block's n eligible tokens; uniform masking by default,
whose expected n / k-weighted loss is exactly the any-order bound, or the training law), the
clean-context forward scores the masked tokens, and each masked CE is weighted by n / k. The mean over
Monte Carlo masks estimates the bound  -log p(continuation | context) <= ELBO; its standard error is
reported with it. Complementary pairs share one draw of k. All samples of a batch of requests run as
one compiled program (the samples are batch rows).

Why our own code: the ELBO is this project's training objective; lm-eval only calls into it.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from efficient_dlm.diffusion import corruption
from efficient_dlm.diffusion.losses import token_stats
from efficient_dlm.diffusion.objectives import Objective, corrupt, predict_hidden
from efficient_dlm.models.reductions import argmax

Request = tuple[Sequence[int], Sequence[int]]  # (context ids, continuation ids)


@dataclasses.dataclass
class Scores:
    logprob: np.ndarray  # [N] log p (AR) or the ELBO estimate (dLM), nats
    greedy: np.ndarray  # [N] bool (AR: every continuation token is the argmax; dLM: filled in by the caller)
    stderr: np.ndarray  # [N] standard error of the Monte Carlo estimate (0 for AR)
    tokens: int  # continuation tokens scored
    forwards: int  # batched forward passes run


def bucket(length: int, multiple: int = 1) -> int:
    """The next power of two >= length (at least 8), rounded up to a multiple of `multiple` (few shapes)."""
    size = max(8, 1 << (max(length, 1) - 1).bit_length())
    return -(-size // multiple) * multiple


def layout(requests: Sequence[Request], max_len: int, prefix_id: int) -> list[tuple[list[int], int]]:
    """(full sequence, continuation length) per request; an empty context becomes [prefix_id] and the
    sequence keeps its last max_len tokens (the continuation always fits: lm-eval windows longer texts)."""
    out = []
    for context, continuation in requests:
        context, continuation = list(context) or [prefix_id], list(continuation)
        if not continuation:
            raise ValueError("loglikelihood: empty continuation")
        if len(continuation) >= max_len:
            raise ValueError(f"loglikelihood: continuation of {len(continuation)} tokens does not fit the model's "
                             f"{max_len} positions")
        out.append(((context + continuation)[-max_len:], len(continuation)))
    return out


def _chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


# ---- AR: exact ---------------------------------------------------------------------------------


def _ar_program(graphdef, state, tokens, targets, weights):
    model = nnx.merge(graphdef, state)
    logits = model(tokens)
    logp = jax.nn.log_softmax(logits, axis=-1)
    target_logp = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    hit = (argmax(logits) == targets) | (weights == 0)
    return jnp.sum(weights * target_logp, axis=1), jnp.all(hit, axis=1)


_ar_jit = jax.jit(_ar_program, static_argnums=0)


def ar_loglikelihood(model, requests: Sequence[Request], *, batch_size: int, prefix_id: int) -> Scores:
    """Exact sum of log p(continuation | context) under causal attention, `batch_size` requests per call."""
    cfg = model.config
    rows = layout(requests, cfg.max_position_embeddings + 1, prefix_id)  # inputs drop the last token
    graphdef, state = nnx.split(model)
    logprob, greedy, forwards = [], [], 0
    size = min(batch_size, len(rows))
    for chunk in _chunks(rows, size):
        length = bucket(max(len(seq) - 1 for seq, _ in chunk))
        tokens = np.zeros((size, length), np.int32)
        targets = np.zeros_like(tokens)
        weights = np.zeros(tokens.shape, np.float32)
        for r, (seq, n) in enumerate(chunk):
            tokens[r, : len(seq) - 1], targets[r, : len(seq) - 1] = seq[:-1], seq[1:]
            weights[r, len(seq) - 1 - n : len(seq) - 1] = 1.0
        ll, hit = jax.device_get(_ar_jit(graphdef, state, tokens, targets, weights))
        logprob += ll[: len(chunk)].tolist()
        greedy += hit[: len(chunk)].tolist()
        forwards += 1
    n = len(rows)
    return Scores(np.asarray(logprob, np.float64), np.asarray(greedy, bool), np.zeros(n), sum(c for _, c in rows), forwards)


# ---- dLM: the block-diffusion ELBO -------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ElboPlan:
    """Static settings of one ELBO program (hashable: one compilation per plan and shape)."""

    objective: Objective  # the training corruption (block size, masking, rates, token shift, complementary)
    copies: int  # masks drawn per request per call (pairs when objective.complementary)
    valid_vocab: int | None = None


def _masked_ce(model, plan: ElboPlan, obj: Objective, batch: dict, key) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(per-token CE, `corrupt`'s weight, masked flags), each [B', L], of one corruption of `batch`."""
    ex = corrupt(obj, batch, key)
    h, _ = predict_hidden(model, obj, ex)
    return token_stats(model, h, ex.targets, valid_vocab=plan.valid_vocab).ce, ex.weight, ex.count > 0


def _elbo_program(graphdef, plan: ElboPlan, state, tokens, segment_ids, maskable, key):
    """[samples, N] Monte Carlo values of the ELBO (nats) for N requests; a pair is one sample.

    The loss weights are 1 on the continuation, so `corrupt`'s weight is the ELBO weight n / k of each
    masked continuation token (docs/METHOD.md section 3) and 0 elsewhere. A complementary copy masks
    n - k tokens, uniform on {0, ..., n-1}: it never draws the fully masked block, so a pair's mean
    misses half of the k = n term of the bound, (1 / 2n) sum_i CE_i(block fully masked), which is
    deterministic and is added from one more forward with every block fully masked (rate 1).
    """
    model = nnx.merge(graphdef, state)
    n, length = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), tokens.shape)
    base = {"tokens": tokens, "segment_ids": segment_ids, "positions": positions,
            "loss_weights": maskable.astype(jnp.float32), "maskable": maskable}
    tiled = {name: jnp.tile(x, (plan.copies, 1)) for name, x in base.items()}
    ce, weight, _ = _masked_ce(model, plan, plan.objective, tiled, key)
    values = jnp.sum(weight * ce, axis=1)
    if not plan.objective.complementary:
        return values.reshape(plan.copies, n)
    full = dataclasses.replace(plan.objective, rate_min=1.0, rate_max=1.0, complementary=False)
    ce_full, _, masked = _masked_ce(model, plan, full, base, key)
    eligible_per_block = jnp.repeat(corruption.block_counts(masked, full.block_size), full.block_size, axis=1)
    missing = jnp.sum(jnp.where(masked, ce_full / jnp.maximum(eligible_per_block, 1), 0.0), axis=1)
    return values.reshape(2, plan.copies, n).mean(axis=0) + 0.5 * missing[None, :]


_elbo_jit = jax.jit(_elbo_program, static_argnums=(0, 1))


def elbo_samples(model, plan: ElboPlan, requests: Sequence[Request], *, samples: int, key: jax.Array,
                 prefix_id: int, samples_per_call: int | None = None) -> np.ndarray:
    """[values, N] independent Monte Carlo values of the ELBO for every request.

    `samples` masks per request: with complementary pairs samples / 2 pairs, each pair's mean one value.
    Requests share each program call (one shape per call); `samples_per_call` masks per request run per
    call (default all), keys are folded from `key` per call, so results are reproducible from the seed.
    """
    pairs = 2 if plan.objective.complementary else 1
    per_call = samples_per_call or samples
    if samples < pairs or samples % pairs or per_call % pairs or per_call < 1:
        raise ValueError(f"mc_samples ({samples}) and mc_batch ({per_call}) must be positive"
                         + (" and even (complementary pairs)" if pairs == 2 else ""))
    block = plan.objective.block_size
    rows = layout(requests, model.config.max_position_embeddings, prefix_id)
    length = bucket(max(len(seq) for seq, _ in rows), block)
    tokens = np.zeros((len(rows), length), np.int32)
    segment_ids = np.zeros_like(tokens)
    maskable = np.zeros(tokens.shape, bool)
    for r, (seq, n) in enumerate(rows):
        tokens[r, : len(seq)], segment_ids[r, : len(seq)] = seq, 1
        maskable[r, len(seq) - n : len(seq)] = True
    graphdef, state = nnx.split(model)
    out, done, call = [], 0, 0
    while done < samples:
        masks = min(per_call, samples - done)
        step_plan = dataclasses.replace(plan, copies=masks // pairs)
        values = _elbo_jit(graphdef, step_plan, state, tokens, segment_ids, maskable, jax.random.fold_in(key, call))
        out.append(np.asarray(jax.device_get(values), np.float64))
        done, call = done + masks, call + 1
    return np.concatenate(out, axis=0)


def _padded(chunk: list, size: int) -> list:
    """The chunk padded to `size` rows by repeating its last item: one program shape for every chunk."""
    return chunk + [chunk[-1]] * (size - len(chunk))


def dlm_loglikelihood(model, plan: ElboPlan, requests: Sequence[Request], *, batch_size: int, samples: int,
                      seed: int, prefix_id: int, samples_per_call: int | None = None) -> Scores:
    """-ELBO estimates (a lower bound on log p in expectation) with their standard errors, per request."""
    key = jax.random.PRNGKey(seed)
    size = min(batch_size, len(requests))
    means, errors, forwards = [], [], 0
    for index, chunk in enumerate(_chunks(list(requests), size)):
        values = elbo_samples(model, plan, _padded(chunk, size), samples=samples, key=jax.random.fold_in(key, index),
                              prefix_id=prefix_id, samples_per_call=samples_per_call)[:, : len(chunk)]
        means += (-values.mean(axis=0)).tolist()
        spread = values.std(axis=0, ddof=1) / np.sqrt(len(values)) if len(values) > 1 else np.full(len(chunk), np.nan)
        errors += spread.tolist()
        forwards += -(-samples // (samples_per_call or samples))
    n = len(requests)
    return Scores(np.asarray(means), np.zeros(n, bool), np.asarray(errors), sum(len(c) for _, c in requests), forwards)
