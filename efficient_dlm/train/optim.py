"""Optimizer and learning-rate schedules from the `train` config section (optax).

AdamW with decoupled weight decay masked by parameter kind (norm scales, biases, embeddings can be
exempted), global-norm clipping, and `optax.apply_if_finite` so a step with non-finite gradients
leaves parameters and moments untouched; its consecutive-failure count lives in the optimizer state
where the training loop reads it to stop after `train.max_nonfinite_steps`.
"""
from __future__ import annotations

import jax
import optax

from efficient_dlm.train.config import TrainConfig


def learning_rate_schedule(t: TrainConfig) -> optax.Schedule:
    """Linear warm-up to train.learning_rate, then cosine / WSD / constant over train.steps."""
    peak, warmup, total = t.learning_rate, t.warmup_steps, max(t.steps, 1)
    end = peak * t.min_lr_ratio
    if t.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(total, warmup + 1), end)
    warm = optax.linear_schedule(0.0, peak, warmup) if warmup else optax.constant_schedule(peak)
    if t.schedule == "constant":
        return optax.join_schedules([warm, optax.constant_schedule(peak)], [warmup])
    decay = max(1, int(round(total * t.wsd_decay_fraction)))
    stable_end = max(warmup, total - decay)
    return optax.join_schedules(
        [warm, optax.constant_schedule(peak), optax.linear_schedule(peak, end, total - stable_end)],
        [warmup, stable_end],
    )


def _path_names(path) -> list[str]:
    return [str(getattr(k, "key", getattr(k, "name", k))) for k in path]


def weight_decay_mask(t: TrainConfig):
    """params -> bool tree: True where weight decay applies (train.decay_norms/biases/embeddings)."""

    def decays(path, _) -> bool:
        names = _path_names(path)
        if not t.decay_norms and any("norm" in n for n in names):
            return False
        if not t.decay_biases and any(n.endswith("bias") for n in names):
            return False
        if not t.decay_embeddings and "embed_tokens" in names:
            return False
        return True

    return lambda params: jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(t: TrainConfig) -> optax.GradientTransformation:
    """The full update rule for train section `t`."""
    inner = optax.adamw(
        learning_rate_schedule(t),
        b1=t.b1,
        b2=t.b2,
        eps=t.adam_eps,
        weight_decay=t.weight_decay,
        mask=weight_decay_mask(t),
    )
    if t.grad_clip > 0:
        inner = optax.chain(optax.clip_by_global_norm(t.grad_clip), inner)
    return optax.apply_if_finite(inner, max_consecutive_errors=t.max_nonfinite_steps)
