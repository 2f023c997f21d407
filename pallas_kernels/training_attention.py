"""Training-time attention with splash attention kernels (forward and backward) on one device.

The library kernel does the work; this module adapts the model's layout to it: [B, T, H, D] inputs
with GQA, packed-document segment ids, any length (padded up to a tile multiple, padding in its own
segment so it never mixes with real tokens), the mask from `splash_masks` (computed, zero memory).
Call it inside shard_map (efficient_dlm.models.kernel_dispatch does) when inputs are sharded: Mosaic
kernels cannot be partitioned automatically.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash

from efficient_dlm.models.masks import MaskSpec
from pallas_kernels.splash_masks import MaskFunction, mask_infos

LANES = 128  # splash needs tiles that are multiples of the TPU lane width
DEFAULT_TILE = 512


def tiling(length: int, max_tile: int = DEFAULT_TILE) -> tuple[int, int]:
    """(padded length, tile): pad to a multiple of 128, then the largest tile <= max_tile dividing it."""
    if max_tile % LANES:
        raise ValueError(f"splash tile size must be a multiple of {LANES}, got {max_tile}")
    padded = -(-length // LANES) * LANES
    tile = max_tile
    while padded % tile:
        tile -= LANES
    return padded, tile


def _block_sizes(tile: int) -> splash.BlockSizes:
    return splash.BlockSizes(
        block_q=tile, block_kv=tile, block_kv_compute=tile,
        block_q_dkv=tile, block_kv_dkv=tile, block_kv_dkv_compute=tile,
        block_q_dq=tile, block_kv_dq=tile,
    )


def make_kernel(spec: MaskSpec, length: int, max_tile: int = DEFAULT_TILE, interpret: bool = False):
    """The splash kernel for one [H, padded, D] example; mask info comes from the per-spec cache."""
    padded, tile = tiling(length, max_tile)
    fwd, dq, dkv = mask_infos(spec, length, padded, tile)
    return splash.SplashAttentionKernel(
        fwd, dq, dkv,
        block_sizes=_block_sizes(tile),
        is_mqa=False,
        save_residuals=False,
        mask_value=splash.DEFAULT_MASK_VALUE,
        attn_logits_soft_cap=None,
        residual_checkpoint_name=None,
        mask_function=MaskFunction(spec),
        interpret=interpret,
    )


def _padding_segments(segment_ids: jax.Array | None, batch: int, length: int, padded: int) -> jax.Array | None:
    """Segment ids with padding in a segment of its own (one past the row's largest id)."""
    if padded == length:
        return segment_ids
    if segment_ids is None:
        segment_ids = jnp.zeros((batch, length), jnp.int32)
    pad_id = jnp.max(segment_ids, axis=1, keepdims=True) + 1
    return jnp.concatenate([segment_ids, jnp.broadcast_to(pad_id, (batch, padded - length))], axis=1).astype(jnp.int32)


def splash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    spec: MaskSpec,
    segment_ids: jax.Array | None = None,
    *,
    max_tile: int = DEFAULT_TILE,
    interpret: bool = False,
) -> jax.Array:
    """q [B, T, H, D], k/v [B, T, Hkv, D], segment_ids [B, T] or None -> [B, T, H, D] (softmax scale D^-0.5)."""
    batch, length, heads, dim = q.shape
    if heads % k.shape[2]:
        raise ValueError(f"query heads ({heads}) must be a multiple of key/value heads ({k.shape[2]})")
    kernel = make_kernel(spec, length, max_tile, interpret)
    padded = kernel.fwd_mask_info.q_sequence.shape[0]
    segments = _padding_segments(segment_ids, batch, length, padded)

    def head_major(x: jax.Array) -> jax.Array:
        x = jnp.pad(x, ((0, 0), (0, padded - length), (0, 0), (0, 0)))
        return x.transpose(0, 2, 1, 3)

    q = head_major(q * jnp.asarray(dim**-0.5, q.dtype))
    k, v = head_major(k), head_major(v)
    if segments is None:
        out = jax.vmap(kernel)(q, k, v)
    else:
        out = jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=splash.SegmentIds(s, s)))(q, k, v, segments)
    return out.transpose(0, 2, 1, 3)[:, :length]
