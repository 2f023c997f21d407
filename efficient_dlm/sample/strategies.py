"""Which masked positions a denoising step commits (docs/METHOD.md section 6).

Every strategy is "commit the n most confident open positions" with its own n per row:
- threshold (Fast-dLLM): n = #open with confidence >= tau (threshold 0 commits the whole block);
- topk (LLaDA low-confidence remasking): n = k, so a block takes ceil(B / k) steps;
- factor (Fast-dLLM): the largest n whose n-th best confidence is >= 1 - f / (n + 1);
- entropy (EB-sampler): the longest confidence-ordered prefix whose summed entropy is <= the bound.
n is clipped to [1, #open], so every step with open positions commits at least one token and a
block finishes in at most B steps. Ties in confidence go to the earlier position.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

STRATEGIES = ("threshold", "topk", "factor", "entropy")
FIXED_STEPS = ("topk",)  # strategies whose step count is known in advance (inner lax.scan)


def _ranked(confidence: jax.Array, open_: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(order, rank): positions sorted by descending confidence (open first), and each position's rank."""
    keyed = jnp.where(open_, confidence, -jnp.inf)
    order = jnp.argsort(-keyed, axis=-1, stable=True)
    return order, jnp.argsort(order, axis=-1)


def commit_count(strategy: str, confidence, entropy, open_, order, knobs: dict, tokens_per_step: int) -> jax.Array:
    """n [batch]: how many of the most confident open positions the strategy commits."""
    num_open = jnp.sum(open_, axis=-1)
    ranks = jnp.arange(1, open_.shape[-1] + 1)[None, :]
    in_open = ranks <= num_open[:, None]
    if strategy == "threshold":
        n = jnp.sum(open_ & (confidence >= knobs["threshold"]), axis=-1)
    elif strategy == "topk":
        n = jnp.full_like(num_open, tokens_per_step)
    elif strategy == "factor":
        best = jnp.take_along_axis(confidence, order, axis=-1)
        ok = in_open & (best >= 1.0 - knobs["factor"] / (ranks + 1.0))
        n = jnp.max(jnp.where(ok, ranks, 0), axis=-1)
    elif strategy == "entropy":
        summed = jnp.cumsum(jnp.where(in_open, jnp.take_along_axis(entropy, order, axis=-1), 0.0), axis=-1)
        n = jnp.sum(in_open & (summed <= knobs["entropy_bound"]), axis=-1)
    else:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    return jnp.where(num_open > 0, jnp.clip(n, 1, num_open), 0)


def _threshold_mask(confidence, open_, threshold) -> jax.Array:
    """The threshold strategy without ranking: the open positions at or above the threshold, or, where
    there is none, the most confident open one (the first on ties, as the ranking's stable order).
    Equal to the ranked form (the n top-ranked positions are exactly those above the threshold), with
    no sort in the sampler's inner loop."""
    above = open_ & (confidence >= threshold)
    best = jnp.argmax(jnp.where(open_, confidence, -jnp.inf), axis=-1)
    fallback = (jnp.arange(open_.shape[-1])[None, :] == best[:, None]) & open_ & ~above.any(axis=-1, keepdims=True)
    return above | fallback


def commit_mask(strategy: str, confidence, entropy, open_, knobs: dict, tokens_per_step: int = 1, ranked: bool = False) -> jax.Array:
    """Boolean [batch, B]: the open positions committed by this step (ranked=True: the threshold
    strategy through the general ranking too, the direct form its fast path is tested against)."""
    if strategy == "threshold" and not ranked:
        return _threshold_mask(confidence, open_, knobs["threshold"])
    order, rank = _ranked(confidence, open_)
    n = commit_count(strategy, confidence, entropy, open_, order, knobs, tokens_per_step)
    return open_ & (rank < n[:, None])
