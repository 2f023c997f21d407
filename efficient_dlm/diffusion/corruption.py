"""Corruption (docs/METHOD.md section 2): which tokens become [MASK], and their ELBO weight (section 3).

Why our own code: no library implements per-block position-dependent masking. Everything here is a
pure function of (tokens, key) so it runs inside the jitted train step, sharded like the batch and
reproducible from (seed, step). Every law masks an exact count k per block, drawn from the block's
rate m and its number n of eligible tokens, and the ELBO weight n / k is read off the drawn mask.

Shapes: tokens [B, L]; a "block" is a run of `block_size` positions (for whole-sequence diffusion the
block is the sequence). `eligible` [B, L] marks tokens that may be masked (real tokens; with token
shift, not the first token of a document, which nothing can predict).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def block_rates(key: jax.Array, batch: int, num_blocks: int, rate_min: float, rate_max: float) -> jax.Array:
    """Per-block mask rates m ~ U(rate_min, rate_max), shape [B, num_blocks] (clipped rates, BD3-LM)."""
    return jax.random.uniform(key, (batch, num_blocks), jnp.float32, rate_min, rate_max)


def position_logits(rates: jax.Array, block_size: int, half_life: float) -> jax.Array:
    """log w_i = lambda (1 - m) i with lambda = ln 2 / (h B); shape [B, num_blocks, block_size]."""
    lam = math.log(2.0) / (half_life * block_size)
    i = jnp.arange(block_size, dtype=jnp.float32)
    return lam * (1.0 - rates)[..., None] * i


def _blocks(x: jax.Array, block_size: int) -> jax.Array:
    return x.reshape(x.shape[0], x.shape[1] // block_size, block_size)


def block_counts(eligible: jax.Array, block_size: int) -> jax.Array:
    """n: eligible tokens per block, int32 [B, num_blocks]."""
    return _blocks(eligible, block_size).sum(-1).astype(jnp.int32)


def masks_per_block(rates: jax.Array, eligible_count: jax.Array) -> jax.Array:
    """k = ceil(m n) clipped to [1, n]: the exact number of masked tokens of a block with n eligible.

    With m ~ U(0, 1) this makes k uniform on {1, ..., n} (P(k) = 1/n, the cell ((k-1)/n, k/n] of
    m), the law under which the ELBO weight n / k is exact (docs/METHOD.md section 3). A block with
    n = 0 masks nothing.
    """
    n = eligible_count.astype(jnp.float32)
    k = jnp.clip(jnp.ceil(rates * n), 1.0, n)
    return k.astype(jnp.int32)


def exact_count_mask(
    key: jax.Array, rates: jax.Array, eligible: jax.Array, block_size: int, logits: jax.Array | None = None
) -> jax.Array:
    """Exactly k = masks_per_block(m, n) eligible tokens per block, drawn without replacement with
    weights exp(logits) (uniformly when logits is None). Returns bool [B, L].

    Gumbel-top-k: the k largest of logits + Gumbel noise are a weighted sample without replacement.
    """
    batch, length = eligible.shape
    scores = jax.random.gumbel(key, (batch, length // block_size, block_size), jnp.float32)
    if logits is not None:
        scores = scores + logits
    elig = _blocks(eligible, block_size)
    scores = jnp.where(elig, scores, -jnp.inf)
    k = masks_per_block(rates, block_counts(eligible, block_size))
    descending = -jnp.sort(-scores, axis=-1)
    threshold = jnp.take_along_axis(descending, jnp.maximum(k - 1, 0)[..., None], axis=-1)
    return ((scores >= threshold) & elig).reshape(batch, length)


def position_dependent_mask(
    key: jax.Array, rates: jax.Array, eligible: jax.Array, block_size: int, half_life: float
) -> jax.Array:
    """Efficient-DLM: k tokens per block with weights w_i = exp(lambda (1 - m) i). Bool [B, L]."""
    return exact_count_mask(key, rates, eligible, block_size, position_logits(rates, block_size, half_life))


def uniform_mask(key: jax.Array, rates: jax.Array, eligible: jax.Array, block_size: int) -> jax.Array:
    """MDLM / LLaDA: k tokens per block, every k-subset of the eligible tokens equally likely. Bool [B, L].

    This is the law of independent masking with t ~ U(0, 1) given at least one mask: integrating
    t^k (1 - t)^(n - k) over t makes every count k in {0, ..., n} equally likely and the subset
    uniform given k, so only the empty mask (no supervision) is left out.
    """
    return exact_count_mask(key, rates, eligible, block_size)


def elbo_weight(mask: jax.Array, eligible: jax.Array, block_size: int) -> jax.Array:
    """Per-token ELBO weight [B, L]: n / k on the masked tokens of a block (n eligible, k masked), else 0.

    1 / (the block's realised masked fraction), computed from the mask itself, so a primary mask, its
    complement and a partly padded block are weighted by the same rule (docs/METHOD.md section 3).
    """
    n = block_counts(eligible, block_size).astype(jnp.float32)
    k = block_counts(mask & eligible, block_size).astype(jnp.float32)
    per_block = jnp.where(k > 0, n / jnp.maximum(k, 1.0), 0.0)
    return jnp.repeat(per_block, block_size, axis=1) * (mask & eligible)


def apply_mask(tokens: jax.Array, mask: jax.Array, mask_token_id: int) -> jax.Array:
    return jnp.where(mask, jnp.asarray(mask_token_id, tokens.dtype), tokens)


def predecessor_in_document(segment_ids: jax.Array) -> jax.Array:
    """[B, L] bool: token i has a token i-1 of the same (non-padding) document before it."""
    same = segment_ids[:, 1:] == segment_ids[:, :-1]
    same = jnp.concatenate([jnp.zeros_like(same[:, :1]), same], axis=1)
    return same & (segment_ids > 0)


def mask_embedding_noise(
    key: jax.Array, embeddings: jax.Array, noise_mask: jax.Array, std: float, step: jax.Array, until_step: int
) -> jax.Array:
    """Adds N(0, std^2) to embeddings at [MASK] positions while step < until_step (LLaDA2.0)."""
    noise = std * jax.random.normal(key, embeddings.shape, jnp.float32)
    active = noise_mask[..., None] & (step < until_step)
    return embeddings + jnp.where(active, noise, 0.0).astype(embeddings.dtype)
