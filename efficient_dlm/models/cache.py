"""Static-shape KV cache for decoding: finished tokens' keys and values, per layer and row.

Slots start <= j < length of row b are valid (left padding lives below `start`), and slot j holds the
token at position j - start: rows are contiguous from their first real token, which is what the
sliding window reads the cached positions from (models/attention.py). Shapes never change during a
generation, so the sampler compiles once per (batch, cache size).
"""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from efficient_dlm.models.config import ModelConfig
from efficient_dlm.parallel.rules import CACHE_AXES, constrain


@flax.struct.dataclass
class KVCache:
    k: jax.Array  # [layers, batch, slots, kv_heads, head_dim]
    v: jax.Array  # [layers, batch, slots, kv_heads, head_dim]
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
        k, v = (constrain(jnp.zeros(shape, dtype), CACHE_AXES) for _ in range(2))  # sharded inside a mesh
        rope_length = None if cfg.rope_type != "dynamic" else jnp.broadcast_to(jnp.asarray(rope_length, jnp.int32), (batch,))
        return cls(k, v, zeros, zeros, rope_length)

    def write(self, k_new: jax.Array, v_new: jax.Array, offset: jax.Array) -> "KVCache":
        """Stores chunk keys/values [layers, batch, T, kv_heads, head_dim] at slot `offset` (same for all rows)."""
        index = (0, 0, offset, 0, 0)
        k = constrain(jax.lax.dynamic_update_slice(self.k, k_new.astype(self.k.dtype), index), CACHE_AXES)
        v = constrain(jax.lax.dynamic_update_slice(self.v, v_new.astype(self.v.dtype), index), CACHE_AXES)
        return self.replace(k=k, v=v)

    def write_rows(self, k_new: jax.Array, v_new: jax.Array, offsets: jax.Array) -> "KVCache":
        """Stores chunk keys/values [layers, batch, T, kv_heads, head_dim] at slot `offsets[b]` of each row b
        (speculative decoding: rows accept different numbers of tokens, so their caches end at different
        slots). The caller keeps offsets[b] + T <= size (dynamic_update_slice would clamp, not fail)."""

        def one_row(cache_row, new_row, offset):
            return jax.lax.dynamic_update_slice(cache_row, new_row.astype(cache_row.dtype), (0, offset, 0, 0))

        rows = jax.vmap(one_row, in_axes=(1, 1, 0), out_axes=1)
        k = constrain(rows(self.k, k_new, offsets), CACHE_AXES)
        v = constrain(rows(self.v, v_new, offsets), CACHE_AXES)
        return self.replace(k=k, v=v)
