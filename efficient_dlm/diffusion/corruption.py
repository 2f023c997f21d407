"""Corruption (METHOD.md section 2): which tokens become [MASK], sampled on device from a PRNG key.

Why our own code: no library implements per-block position-dependent masking. Everything here is a
pure function of (tokens, key) so it runs inside the jitted train step, sharded like the batch and
reproducible from (seed, step).

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


def masks_per_block(rates: jax.Array, block_size: int) -> jax.Array:
    """k = round(m B), at least 1: the exact number of masked tokens in a full block."""
    return jnp.maximum(1, jnp.round(rates * block_size)).astype(jnp.int32)


def _blocks(x: jax.Array, block_size: int) -> jax.Array:
    return x.reshape(x.shape[0], x.shape[1] // block_size, block_size)


def position_dependent_mask(
    key: jax.Array, rates: jax.Array, eligible: jax.Array, block_size: int, half_life: float
) -> jax.Array:
    """Exactly k = round(m B) eligible tokens per block, drawn without replacement with weights w_i.

    Gumbel-top-k: the k largest of log w_i + Gumbel noise are a weighted sample without replacement.
    Blocks with fewer than k eligible tokens mask all of them. Returns bool [B, L].
    """
    batch, length = eligible.shape
    scores = position_logits(rates, block_size, half_life) + jax.random.gumbel(
        key, (batch, length // block_size, block_size), jnp.float32
    )
    elig = _blocks(eligible, block_size)
    scores = jnp.where(elig, scores, -jnp.inf)
    k = masks_per_block(rates, block_size)
    descending = -jnp.sort(-scores, axis=-1)
    threshold = jnp.take_along_axis(descending, (k - 1)[..., None], axis=-1)
    return ((scores >= threshold) & elig).reshape(batch, length)


def uniform_mask(key: jax.Array, rates: jax.Array, eligible: jax.Array, block_size: int) -> jax.Array:
    """Each eligible token masked independently with its block's rate (MDLM / LLaDA). Bool [B, L]."""
    per_token = jnp.repeat(rates, block_size, axis=1)
    return (jax.random.uniform(key, eligible.shape) < per_token) & eligible


def complement_rates(mask: jax.Array, eligible: jax.Array, block_size: int, rate_min: float) -> jax.Array:
    """Rate of the complementary mask: its masked fraction of each block's eligible tokens.

    For a full block with k masked this is 1 - k / B, the rate whose ELBO weight 1/m matches the
    number of tokens it supervises. Floored at rate_min so the weight stays bounded.
    """
    comp = _blocks(eligible & ~mask, block_size).sum(-1)
    total = jnp.maximum(_blocks(eligible, block_size).sum(-1), 1)
    return jnp.maximum(comp / total, rate_min).astype(jnp.float32)


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
