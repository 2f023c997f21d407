"""Block-decode attention: a chunk's queries against a ragged prefix KV cache plus the chunk itself.

No library kernel fits the diffusion sampler's step: every row has its own valid cache range
[start, length) in a static-shape cache, and the chunk's own keys are visible bidirectionally (a
diffusion block), causally or block-causally (a prompt prefill), decided from the chunk's positions.
Paged/ragged decode kernels assume one query per row and causal visibility. This kernel:
- tiles queries, the chunk's own keys and the cache, so a long chunk (a 2k-token prompt prefill)
  fits VMEM as well as a 4-token block: grid (row, query tile, own key tiles then cache tiles);
- builds the chunk's visibility in the kernel from positions (`masks.chunk_visible`), never as a
  dense [T, T] table in HBM; a sliding window also hides cache slots whose position (slot - start)
  is `sliding_window` or more before the query (tiles are still visited: the window hides, it does
  not skip);
- reads the row's start/length by scalar prefetch and visits cache tiles first..last only: a grid step
  outside the valid range maps to the same tile index (no DMA) and skips compute (`pl.when`), so
  work beyond the valid prefix is bounded by one tile per end;
- loads one cache tile for all kv heads in the cache's native [B, S, Hkv, D] layout (no transpose of
  the cache per step) and processes each kv head's query group [G * T, D] as one matrix (GQA);
- keeps an online softmax (running max, sum, accumulator) in VMEM scratch; masked logits contribute
  exactly zero, so a row that sees no key returns zeros, as the XLA reference.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from efficient_dlm.models.masks import chunk_visible, within_window

NEG_INF = -0.7 * float(jnp.finfo(jnp.float32).max)  # the XLA reference's mask value
DEFAULT_TILE = 512
VMEM_LIMIT = 32 * 2**20  # scoped VMEM for one grid step's double-buffered tiles: above the 16 MiB default, within every TPU's VMEM
_LANES = 128  # a key tile's positions form a lane vector: a multiple of 128 or the whole chunk
_NT = (((1,), (1,)), ((), ()))  # a @ b.T


def cache_tile(slots: int, max_tile: int = DEFAULT_TILE) -> int:
    """The largest tile <= max_tile that divides the cache size (a partial tile would shift slots)."""
    tile = min(max_tile, slots)
    while slots % tile:
        tile -= 1
    return tile


def _row_tile(rows: int, max_tile: int) -> int:
    """The largest divisor of rows <= max_tile that is a multiple of 8 (sublanes), else all rows."""
    for tile in range(min(max_tile, rows), 7, -1):
        if rows % tile == 0 and tile % 8 == 0:
            return tile
    return rows


def _own_layout(width: int, max_tile: int) -> tuple[int, int]:
    """(padded chunk width, own key tile): one tile up to max_tile (at least 128), else 128-multiples of
    the width padded to 128."""
    limit = max(max_tile, _LANES)
    if width <= limit:
        return width, width
    padded = -(-width // _LANES) * _LANES
    tile = max(t for t in range(_LANES, limit + 1, _LANES) if padded % t == 0)
    return padded, tile


def _tile_range(start, length, tile: int):
    """(first tile, number of tiles) overlapping the valid slots [start, length) of one row."""
    first = lax.div(start, tile)
    end = lax.div(length + tile - 1, tile)
    return first, jnp.maximum(end - first, 0)


def _online_update(m_ref, l_ref, acc_ref, h: int, s: jax.Array, mask: jax.Array, v: jax.Array) -> None:
    """Folds logits s [rows, keys] where mask is True, with values v [keys, D], into head h's state."""
    m_prev = m_ref[h]
    m_new = jnp.maximum(m_prev, jnp.max(jnp.where(mask, s, NEG_INF), axis=-1, keepdims=True))
    p = jnp.where(mask, jnp.exp(s - m_new), 0.0)
    alpha = jnp.exp(m_prev - m_new)
    pv = jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    l_ref[h] = jnp.sum(p, axis=-1, keepdims=True) + alpha * l_ref[h]
    acc_ref[h] = pv + alpha * acc_ref[h]
    m_ref[h] = m_new


def _kernel(start_ref, length_ref, q_ref, qpos_ref, k_ref, v_ref, kpos_ref, ck_ref, cv_ref, o_ref, m_ref, l_ref, acc_ref,
            *, tile: int, num_tiles: int, own_tile: int, own_tiles: int, width: int, scale: float, kv_heads: int,
            mode: str, block_size: int | None, sliding_window: int | None):
    b, j = pl.program_id(0), pl.program_id(2)
    start, length = start_ref[b], length_ref[b]
    first, count = _tile_range(start, length, tile)

    @pl.when(j == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, NEG_INF, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    @pl.when(j < own_tiles)
    def _own_tile():
        key = j * own_tile + lax.broadcasted_iota(jnp.int32, (1, own_tile), 1)
        mask = chunk_visible(mode, block_size, qpos_ref[...], kpos_ref[...], sliding_window) & (key < width)
        for h in range(kv_heads):
            q = q_ref[h]
            s = lax.dot_general(q, k_ref[h], _NT, preferred_element_type=jnp.float32) * scale
            _online_update(m_ref, l_ref, acc_ref, h, s, mask, v_ref[h])

    c = j - own_tiles

    @pl.when((c >= 0) & (c < count))
    def _cache_tile():
        offset = (first + c) * tile
        in_range = lambda slot: (slot >= start) & (slot < length)
        valid_keys = in_range(offset + lax.broadcasted_iota(jnp.int32, (1, tile), 1))  # for logits [rows, tile]
        valid_rows = in_range(offset + lax.broadcasted_iota(jnp.int32, (tile, 1), 0))  # for values [tile, D]
        if sliding_window is not None:  # slot j holds position j - start
            slot_positions = offset + lax.broadcasted_iota(jnp.int32, (1, tile), 1) - start
            valid_keys = valid_keys & within_window(sliding_window, qpos_ref[...], slot_positions)
        for h in range(kv_heads):
            q = q_ref[h]
            s = lax.dot_general(q, ck_ref[:, h, :].astype(q.dtype), _NT, preferred_element_type=jnp.float32) * scale
            v = jnp.where(valid_rows, cv_ref[:, h, :].astype(q.dtype), 0)  # stale slots may hold NaN
            _online_update(m_ref, l_ref, acc_ref, h, s, valid_keys, v)

    @pl.when(j == own_tiles + num_tiles - 1)
    def _finish():
        for h in range(kv_heads):
            total = l_ref[h]
            o_ref[h] = (acc_ref[h] / jnp.where(total > 0, total, 1.0)).astype(o_ref.dtype)


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
    positions: jax.Array,
    *,
    mode: str,
    block_size: int | None = None,
    sliding_window: int | None = None,
    max_tile: int = DEFAULT_TILE,
    interpret: bool = False,
) -> jax.Array:
    """q [B, T, H, D]; k/v [B, T, Hkv, D] of the chunk at `positions` [B, T]; cache_k/v [B, S, Hkv, D]
    valid on cache_start[b] <= slot < cache_length[b]. The chunk's keys are visible to its queries by
    `mode` (causal, block with block_size, bidirectional) over positions, and with `sliding_window` W
    only keys less than W positions before the query (cache slot j is at position j - cache_start).
    Returns [B, T, H, D], softmax scale D^-0.5; a query that sees no key gets zeros.
    """
    batch, width, heads, dim = q.shape
    kv_heads, slots = k.shape[2], cache_k.shape[1]
    group = heads // kv_heads
    tile = cache_tile(slots, max_tile)
    num_tiles = slots // tile
    padded, own_tile = _own_layout(width, max_tile)
    own_tiles = padded // own_tile
    positions = positions.astype(jnp.int32)
    if padded > width:  # only long chunks (prefills) are padded; a decode step's block never is
        pad = lambda x: jnp.pad(x, [(0, 0), (0, padded - width)] + [(0, 0)] * (x.ndim - 2))
        q, k, v, positions = pad(q), pad(k), pad(v), pad(positions)
    rows = group * padded
    row_tile = _row_tile(rows, max(max_tile // 2, 8))  # a query tile holds G heads' rows: half the key tile
    # Rows of a kv head's group are ordered (query head in group, position): [G * T, D] per kv head.
    qg = q.reshape(batch, padded, kv_heads, group, dim).transpose(0, 2, 3, 1, 4).reshape(batch, kv_heads, rows, dim)
    q_positions = jnp.tile(positions, (1, group))[:, :, None]  # [B, rows, 1]

    def cache_index(b, r, j, start_ref, length_ref):
        first, count = _tile_range(start_ref[b], length_ref[b], tile)
        step = jnp.clip(j - own_tiles, 0, jnp.maximum(count - 1, 0))
        return b, jnp.minimum(first + step, num_tiles - 1), 0, 0

    own_index = lambda b, r, j, *_: (b, 0, jnp.minimum(j, own_tiles - 1), 0)
    row_index = lambda b, r, j, *_: (b, 0, r, 0)
    own_spec = pl.BlockSpec((None, kv_heads, own_tile, dim), own_index)
    cache_spec = pl.BlockSpec((None, tile, kv_heads, dim), cache_index)
    out = pl.pallas_call(
        functools.partial(
            _kernel, tile=tile, num_tiles=num_tiles, own_tile=own_tile, own_tiles=own_tiles, width=width,
            scale=dim**-0.5, kv_heads=kv_heads, mode=mode, block_size=block_size, sliding_window=sliding_window,
        ),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(batch, rows // row_tile, own_tiles + num_tiles),
            in_specs=[
                pl.BlockSpec((None, kv_heads, row_tile, dim), row_index),
                pl.BlockSpec((None, row_tile, 1), lambda b, r, j, *_: (b, r, 0)),
                own_spec,
                own_spec,
                pl.BlockSpec((None, 1, own_tile), lambda b, r, j, *_: (b, 0, jnp.minimum(j, own_tiles - 1))),
                cache_spec,
                cache_spec,
            ],
            out_specs=pl.BlockSpec((None, kv_heads, row_tile, dim), row_index),
            scratch_shapes=[
                pltpu.VMEM((kv_heads, row_tile, 1), jnp.float32),
                pltpu.VMEM((kv_heads, row_tile, 1), jnp.float32),
                pltpu.VMEM((kv_heads, row_tile, dim), jnp.float32),
            ],
        ),
        out_shape=jax.ShapeDtypeStruct((batch, kv_heads, rows, dim), q.dtype),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary"), vmem_limit_bytes=VMEM_LIMIT
        ),
        cost_estimate=_cost(q, cache_k, padded + slots),  # upper bound: the whole cache valid
        interpret=interpret,
    )(
        cache_start.astype(jnp.int32),
        cache_length.astype(jnp.int32),
        qg,
        q_positions,
        k.transpose(0, 2, 1, 3),
        v.transpose(0, 2, 1, 3),
        positions[:, None, :],
        cache_k,
        cache_v,
    )
    out = out.reshape(batch, kv_heads, group, padded, dim).transpose(0, 3, 1, 2, 4).reshape(batch, padded, heads, dim)
    return out[:, :width] if padded > width else out
