"""Static-shape KV cache for decoding: finished tokens' keys and values, per layer and row.

Slots start <= j < length of row b are valid (left padding lives below `start`), and slot j holds the
token at position j - start: rows are contiguous from their first real token, which is what the
sliding window reads the cached positions from (models/attention.py). Shapes never change during a
generation, so the sampler compiles once per (batch, cache size).
With `model.quantize_kv` int8, k and v are qwix QArrays: int8 values [layers, batch, slots, kv_heads,
head_dim] with one float32 scale per slot and head [..., 1] (models/quant_ops.py); writes store the
int8 values and scales the forward produced, so nothing is quantized twice.
"""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
from qwix import QArray

from efficient_dlm.models.config import ModelConfig
from efficient_dlm.models.quant_ops import SCALE_DTYPE
from efficient_dlm.parallel.rules import CACHE_AXES, constrain


@flax.struct.dataclass
class KVCache:
    k: jax.Array | QArray  # [layers, batch, slots, kv_heads, head_dim]
    v: jax.Array | QArray  # [layers, batch, slots, kv_heads, head_dim]
    start: jax.Array  # [batch] int32, first valid slot
    length: jax.Array  # [batch] int32, one past the last valid slot
    # [batch] int32: the length the generation can reach per row (prompt + max_new_tokens), which fixes
    # dynamic RoPE's scale for every chunk decoded against this cache (models/rope.py); None otherwise.
    rope_length: jax.Array | None = None

    @property
    def size(self) -> int:
        return self.k.shape[2]

    @classmethod
    def empty(cls, cfg: ModelConfig, batch: int, size: int, dtype=None, rope_length: jax.Array | None = None) -> "KVCache":
        """An empty cache; `rope_length` [batch] (prompt + max_new_tokens per row) is required by dynamic RoPE."""
        if cfg.rope_type == "dynamic" and rope_length is None:
            raise ValueError("a KV cache for a dynamic-RoPE model needs rope_length (each row's prompt + max_new_tokens)")
        dtype = cfg.compute_dtype if dtype is None else dtype
        shape = (cfg.num_layers, batch, size, cfg.num_kv_heads, cfg.head_dim)
        zeros = jnp.zeros((batch,), jnp.int32)
        k, v = (_zeros(shape, dtype, cfg.quantize_kv == "int8") for _ in range(2))
        rope_length = None if cfg.rope_type != "dynamic" else jnp.broadcast_to(jnp.asarray(rope_length, jnp.int32), (batch,))
        return cls(k, v, zeros, zeros, rope_length)

    def write(self, k_new: jax.Array, v_new: jax.Array, offset: jax.Array) -> "KVCache":
        """Stores chunk keys/values [layers, batch, T, kv_heads, head_dim] at slot `offset` (same for all rows)."""
        index = (0, 0, offset, 0, 0)
        k, v = (update_parts(lambda c, n: jax.lax.dynamic_update_slice(c, n, index), old, new)
                for old, new in ((self.k, k_new), (self.v, v_new)))
        return self.replace(k=k, v=v)

    def write_rows(self, k_new: jax.Array, v_new: jax.Array, offsets: jax.Array) -> "KVCache":
        """Stores chunk keys/values [layers, batch, T, kv_heads, head_dim] at slot `offsets[b]` of each row b
        (speculative decoding: rows accept different numbers of tokens, so their caches end at different
        slots). The caller keeps offsets[b] + T <= size (dynamic_update_slice would clamp, not fail)."""

        def one_row(cache_row, new_row, offset):
            return jax.lax.dynamic_update_slice(cache_row, new_row, (0, offset, 0, 0))

        rows = jax.vmap(one_row, in_axes=(1, 1, 0), out_axes=1)
        k, v = (update_parts(lambda c, n: rows(c, n, offsets), old, new) for old, new in ((self.k, k_new), (self.v, v_new)))
        return self.replace(k=k, v=v)


def _zeros(shape, dtype, int8: bool):
    """An empty cache tensor (sharded inside a mesh): float, or int8 values with a scale per slot and head."""
    if not int8:
        return constrain(jnp.zeros(shape, dtype), CACHE_AXES)
    values = constrain(jnp.zeros(shape, jnp.int8), CACHE_AXES)
    return QArray(values, constrain(jnp.zeros((*shape[:-1], 1), SCALE_DTYPE), CACHE_AXES), qtype=jnp.int8)


def update_parts(update, old, new):
    """update(cache part, new part) for a float cache tensor, or for the int8 values and the scales of a
    quantized one; the new keys/values are cast to the cache's storage (a float cache only)."""
    if isinstance(old, QArray):
        if not isinstance(new, QArray):
            raise TypeError("an int8 KV cache stores the QArrays of a model with quantize_kv='int8'")
        return QArray(constrain(update(old.qvalue, new.qvalue), CACHE_AXES), constrain(update(old.scale, new.scale), CACHE_AXES),
                      qtype=old.qtype)
    return constrain(update(old, new.astype(old.dtype)), CACHE_AXES)
