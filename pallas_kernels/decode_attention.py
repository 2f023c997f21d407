"""Block-decode attention: the active block's queries against a ragged prefix KV cache plus themselves.

No library kernel fits the diffusion sampler's step: every row has its own valid cache range
[start, length) in a static-shape cache, and the block's own keys are visible bidirectionally (or
causal / block-causal, given as `own_mask`). Paged/ragged decode kernels assume one query per row
and causal visibility. This kernel:
- reads the row's start/length by scalar prefetch and visits cache tiles first..last only: a grid step
  outside the valid range maps to the same tile index (no DMA) and skips compute (`pl.when`), so
  work beyond the valid prefix is bounded by one tile per end;
- loads one cache tile for all kv heads in the cache's native [B, S, Hkv, D] layout (no transpose of
  the cache per step) and processes each kv head's query group [G * T, D] as one matrix (GQA);
- keeps an online softmax (running max, sum, accumulator) in VMEM scratch.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

NEG_INF = -0.7 * float(jnp.finfo(jnp.float32).max)  # the XLA reference's mask value
DEFAULT_TILE = 512
_NT = (((1,), (1,)), ((), ()))  # a @ b.T


def cache_tile(slots: int, max_tile: int = DEFAULT_TILE) -> int:
    """The largest tile <= max_tile that divides the cache size (a partial tile would shift slots)."""
    tile = min(max_tile, slots)
    while slots % tile:
        tile -= 1
    return tile


def _tile_range(start, length, tile: int):
    """(first tile, number of tiles) overlapping the valid slots [start, length) of one row."""
    first = lax.div(start, tile)
    end = lax.div(length + tile - 1, tile)
    return first, jnp.maximum(end - first, 0)


def _online_update(m_ref, l_ref, acc_ref, h: int, s: jax.Array, v: jax.Array, first: bool) -> None:
    """Folds logits s [rows, keys] and values v [keys, D] into head h's running softmax state."""
    m_prev = jnp.full((s.shape[0], 1), NEG_INF, jnp.float32) if first else m_ref[h]
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=-1, keepdims=True))
    p = jnp.exp(s - m_new)
    alpha = jnp.exp(m_prev - m_new)
    pv = jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    l_ref[h] = jnp.sum(p, axis=-1, keepdims=True) + (0.0 if first else alpha * l_ref[h])
    acc_ref[h] = pv + (0.0 if first else alpha * acc_ref[h])
    m_ref[h] = m_new


def _kernel(start_ref, length_ref, q_ref, k_ref, v_ref, own_ref, ck_ref, cv_ref, o_ref, m_ref, l_ref, acc_ref,
            *, tile: int, num_tiles: int, scale: float, kv_heads: int):
    b, j = pl.program_id(0), pl.program_id(1)
    start, length = start_ref[b], length_ref[b]
    first, count = _tile_range(start, length, tile)
    offset = (first + j) * tile
    in_range = lambda slot: (slot >= start) & (slot < length)
    valid_keys = in_range(offset + lax.broadcasted_iota(jnp.int32, (1, tile), 1))  # for logits [rows, tile]
    valid_rows = in_range(offset + lax.broadcasted_iota(jnp.int32, (tile, 1), 0))  # for values [tile, D]
    for h in range(kv_heads):
        q = q_ref[h]

        @pl.when(j == 0)
        def _own_block():  # every query sees itself, so the state is finite from here on
            s = lax.dot_general(q, k_ref[h], _NT, preferred_element_type=jnp.float32) * scale
            _online_update(m_ref, l_ref, acc_ref, h, jnp.where(own_ref[...] != 0, s, NEG_INF), v_ref[h], True)

        @pl.when(j < count)
        def _cache_tile():
            s = lax.dot_general(q, ck_ref[:, h, :].astype(q.dtype), _NT, preferred_element_type=jnp.float32) * scale
            v = jnp.where(valid_rows, cv_ref[:, h, :].astype(q.dtype), 0)  # stale slots may hold NaN
            _online_update(m_ref, l_ref, acc_ref, h, jnp.where(valid_keys, s, NEG_INF), v, False)

        @pl.when(j == num_tiles - 1)
        def _finish():
            o_ref[h] = (acc_ref[h] / l_ref[h]).astype(o_ref.dtype)


def _cost(q: jax.Array, cache_k: jax.Array, keys: int) -> pl.CostEstimate:
    """For XLA's cost analysis, which cannot see inside a Mosaic kernel."""
    batch, width, heads, dim = q.shape
    return pl.CostEstimate(
        flops=4 * batch * heads * width * keys * dim,
        transcendentals=batch * heads * width * keys,
        bytes_accessed=2 * cache_k.size * cache_k.dtype.itemsize + 2 * q.size * q.dtype.itemsize,
    )


def decode_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    cache_k: jax.Array,
    cache_v: jax.Array,
    cache_start: jax.Array,
    cache_length: jax.Array,
    own_mask: jax.Array,
    *,
    max_tile: int = DEFAULT_TILE,
    interpret: bool = False,
) -> jax.Array:
    """q [B, T, H, D]; k/v [B, T, Hkv, D] of the block; cache_k/v [B, S, Hkv, D] valid on
    cache_start[b] <= slot < cache_length[b]; own_mask [B, T, T] bool (query, key) inside the block,
    which must show every query itself. Returns [B, T, H, D], softmax scale D^-0.5.
    """
    batch, width, heads, dim = q.shape
    kv_heads, slots = k.shape[2], cache_k.shape[1]
    group = heads // kv_heads
    tile = cache_tile(slots, max_tile)
    num_tiles = slots // tile
    # Rows of a kv head's group are ordered (query head in group, position): [G * T, D] per kv head.
    qg = q.reshape(batch, width, kv_heads, group, dim).transpose(0, 2, 3, 1, 4).reshape(batch, kv_heads, group * width, dim)
    own = jnp.tile(own_mask.astype(jnp.int32), (1, group, 1))

    def cache_index(b, j, start_ref, length_ref):
        first, count = _tile_range(start_ref[b], length_ref[b], tile)
        return b, jnp.minimum(first + jnp.minimum(j, jnp.maximum(count - 1, 0)), num_tiles - 1), 0, 0

    per_row = lambda shape: pl.BlockSpec((None, *shape), lambda b, j, *_: (b,) + (0,) * len(shape))
    cache_spec = pl.BlockSpec((None, tile, kv_heads, dim), cache_index)
    out = pl.pallas_call(
        functools.partial(_kernel, tile=tile, num_tiles=num_tiles, scale=dim**-0.5, kv_heads=kv_heads),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(batch, num_tiles),
            in_specs=[
                per_row((kv_heads, group * width, dim)),
                per_row((kv_heads, width, dim)),
                per_row((kv_heads, width, dim)),
                per_row((group * width, width)),
                cache_spec,
                cache_spec,
            ],
            out_specs=per_row((kv_heads, group * width, dim)),
            scratch_shapes=[
                pltpu.VMEM((kv_heads, group * width, 1), jnp.float32),
                pltpu.VMEM((kv_heads, group * width, 1), jnp.float32),
                pltpu.VMEM((kv_heads, group * width, dim), jnp.float32),
            ],
        ),
        out_shape=jax.ShapeDtypeStruct((batch, kv_heads, group * width, dim), q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        cost_estimate=_cost(q, cache_k, width + slots),  # upper bound: the whole cache valid
        interpret=interpret,
    )(
        cache_start.astype(jnp.int32),
        cache_length.astype(jnp.int32),
        qg,
        k.transpose(0, 2, 1, 3),
        v.transpose(0, 2, 1, 3),
        own,
        cache_k,
        cache_v,
    )
    return out.reshape(batch, kv_heads, group, width, dim).transpose(0, 3, 1, 2, 4).reshape(batch, width, heads, dim)
