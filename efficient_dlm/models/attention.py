"""The XLA reference implementation of attention: the "xla" backend of models/kernel_dispatch.py
(the single entry point the model calls, which picks a backend) and the oracle of every kernel.

`attention` serves the training-time patterns (causal, block, bidirectional, clean_context;
docs/METHOD.md section 1). `cached_attention` is the decode-time form: a chunk of queries
against a static-shape KV cache (valid slots [start, length) per row, slot j holding position
j - start; see models/cache.py) plus the chunk itself, with the sliding window of masks.py on both.
`xla_attention` is the oracle every kernel is tested against: GQA by grouping query heads, logits and
softmax in float32, rows that see no key return zeros instead of NaN.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from efficient_dlm.models.masks import MaskSpec, chunk_visible, dense_mask, within_window

_NEG_INF = -0.7 * float(jnp.finfo(jnp.float32).max)


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float | None = None) -> jax.Array:
    """q [B, Tq, H, D], k/v [B, Tk, Hkv, D], mask [B or 1, Tq, Tk] bool -> [B, Tq, H, D] in q.dtype."""
    batch, q_len, heads, dim = q.shape
    kv_heads = k.shape[2]
    scale = dim**-0.5 if scale is None else scale
    qg = q.reshape(batch, q_len, kv_heads, heads // kv_heads, dim)
    logits = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k, preferred_element_type=jnp.float32) * scale
    mask = mask[:, None, None, :, :]
    logits = jnp.where(mask, logits, _NEG_INF)
    probs = jax.nn.softmax(logits, axis=-1)
    probs = jnp.where(mask.any(axis=-1, keepdims=True), probs, 0.0)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(batch, q_len, heads, dim).astype(q.dtype)


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    spec: MaskSpec,
    segment_ids: jax.Array | None = None,
) -> jax.Array:
    """Self-attention over one physical sequence with the pattern `spec`, AND-ed with segment ids."""
    mask = dense_mask(spec, q.shape[1], k.shape[1], segment_ids, segment_ids)
    return xla_attention(q, k, v, mask)


def cached_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    cache_k: jax.Array,
    cache_v: jax.Array,
    cache_start: jax.Array,
    cache_length: jax.Array,
    positions: jax.Array,
    mode: str,
    block_size: int | None = None,
    sliding_window: int | None = None,
) -> jax.Array:
    """Chunk queries q [B, T, H, D] attend to cache slots start <= j < length, plus the chunk's own k/v.

    The cache holds keys/values of finished tokens only (static shape [B, S, Hkv, D]); the chunk's keys
    are visible to its queries according to `mode` over `positions` [B, T]. With `sliding_window` W a
    query at position q sees only keys (cached at position j - start, or in the chunk) with q - k < W.
    """
    slots = jnp.arange(cache_k.shape[1], dtype=jnp.int32)[None, None, :]
    cache_mask = (slots >= cache_start[:, None, None]) & (slots < cache_length[:, None, None])
    if sliding_window is not None:
        cache_mask = cache_mask & within_window(sliding_window, positions[:, :, None], slots - cache_start[:, None, None])
    cache_mask = jnp.broadcast_to(cache_mask, (q.shape[0], q.shape[1], cache_k.shape[1]))
    own_mask = chunk_visible(mode, block_size, positions[:, :, None], positions[:, None, :], sliding_window)
    mask = jnp.concatenate([cache_mask, own_mask], axis=-1)
    keys = jnp.concatenate([cache_k.astype(k.dtype), k], axis=1)
    values = jnp.concatenate([cache_v.astype(v.dtype), v], axis=1)
    return xla_attention(q, keys, values, mask)
