"""Splash-attention masks for the block-diffusion patterns, computed from indices, never stored.

Splash attention (jax.experimental.pallas.ops.tpu.splash_attention) skips tiles that a `MaskInfo`
marks empty and evaluates a `mask_function(q_idx, k_idx)` inside the kernel for the rest. The mask
function here is `efficient_dlm.models.masks.visible`, the single definition of the patterns.

Why not the library's `make_splash_mha(mask)`: its `process_mask` classifies tiles by evaluating the
mask tile by tile in Python, O(L^2) work (minutes for the clean-context layout at L=32768, 2L=65536).
Every pattern of docs/METHOD.md section 1 shows each query at most two contiguous key ranges, so
`visible_intervals` classifies all tiles with O(L) numpy work and `mask_infos` builds the same
(shrunk-grid) `MaskInfo` the library would; tests check both against the library on small shapes.
"""
from __future__ import annotations

import dataclasses
import functools

import numpy as np
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask_info as info_lib

from efficient_dlm.models.masks import MaskSpec, visible

EMPTY, PARTIAL, FULL = 0, 1, 2  # splash block_mask values


@dataclasses.dataclass(frozen=True)
class MaskFunction:
    """Hashable by value, so jit (which takes it as a static argument) caches across layers and calls."""

    spec: MaskSpec

    def __call__(self, q_idx, k_idx):
        return visible(self.spec, q_idx, k_idx)


class DiffusionMask(mask_lib._ComputableMask):
    """A splash computable mask for `spec` over `shape` = (padded length, padded length)."""

    def __init__(self, spec: MaskSpec, shape: tuple[int, int]):
        self.spec = spec
        super().__init__(shape=shape, mask_function=MaskFunction(spec))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DiffusionMask) and (self.spec, self.shape) == (other.spec, other.shape)

    def __hash__(self) -> int:
        return hash((DiffusionMask, self.spec, self.shape))


def visible_intervals(spec: MaskSpec, q_idx: np.ndarray, length: int) -> tuple[np.ndarray, ...]:
    """Keys visible to each query as two half-open ranges [lo1, hi1) | [lo2, hi2), clipped to [0, length).

    Equal to `visible(spec, q, k)` for k < length (tested exhaustively on small shapes).
    """
    q = np.asarray(q_idx, dtype=np.int64)
    lo1, hi1, lo2, hi2 = _pattern_intervals(spec, q, length)
    if spec.sliding_window is not None:  # keys at positions >= p - W + 1 for a query at position p
        n = spec.seq_len if spec.mode == "clean_context" else 0
        own_stream = n * (q >= n) if n else 0  # interval 1 lies in the query's stream, interval 2 in x_0
        earliest = q - own_stream - spec.sliding_window + 1
        lo1 = np.maximum(lo1, own_stream + earliest)
        lo2 = np.maximum(lo2, n + earliest)
    clip = lambda a: np.clip(a, 0, length)
    return clip(lo1), clip(hi1), clip(lo2), clip(hi2)


def _pattern_intervals(spec: MaskSpec, q: np.ndarray, length: int) -> tuple[np.ndarray, ...]:
    zero = np.zeros_like(q)
    if spec.mode == "bidirectional":
        lo1, hi1 = zero, zero + length
        lo2 = hi2 = zero
    elif spec.mode == "causal":
        lo1, hi1 = zero, q + 1
        lo2 = hi2 = zero
    elif spec.mode == "block":
        lo1, hi1 = zero, (q // spec.block_size + 1) * spec.block_size
        lo2 = hi2 = zero
    else:  # clean_context over [x_t ; x_0]
        n, size = spec.seq_len, spec.block_size
        clean = q >= n
        start = (q - clean * n) // size * size
        # x_t query: own block of x_t, then clean blocks before its own; x_0 query: clean blocks up to own.
        lo1 = np.where(clean, n, start)
        hi1 = np.where(clean, n + start + size, start + size)
        lo2, hi2 = np.where(clean, 0, n), np.where(clean, 0, n + start)
    return lo1, hi1, lo2, hi2


def _mark(counts: np.ndarray, rows: np.ndarray, first: np.ndarray, last: np.ndarray) -> None:
    """counts[rows, first..last] += 1 for every entry with first <= last (difference array, summed later)."""
    ok = first <= last
    np.add.at(counts, (rows[ok], first[ok]), 1)
    np.add.at(counts, (rows[ok], last[ok] + 1), -1)


def tile_block_mask(spec: MaskSpec, length: int, padded: int, block_q: int, block_kv: int) -> np.ndarray:
    """[q_tiles, kv_tiles] of EMPTY / PARTIAL / FULL for `spec` on `length` real and padded positions.

    Padding queries (index >= length) see only padding keys: the callers give padding its own segment id.
    """
    rows = np.arange(padded)
    intervals = visible_intervals(spec, rows, length)
    pad = rows >= length
    lo1 = np.where(pad, length, intervals[0])
    hi1 = np.where(pad, padded, intervals[1])
    lo2, hi2 = np.where(pad, 0, intervals[2]), np.where(pad, 0, intervals[3])
    q_tiles, kv_tiles = padded // block_q, padded // block_kv
    touched = np.zeros((q_tiles, kv_tiles + 1), np.int64)
    covered = np.zeros((q_tiles, kv_tiles + 1), np.int64)
    q_tile = rows // block_q
    for lo, hi in ((lo1, hi1), (lo2, hi2)):
        nonempty = hi > lo
        _mark(touched, q_tile[nonempty], lo[nonempty] // block_kv, (hi[nonempty] - 1) // block_kv)
        _mark(covered, q_tile, -(-lo // block_kv), hi // block_kv - 1)
    touched = np.cumsum(touched, axis=1)[:, :-1] > 0
    full = np.cumsum(covered, axis=1)[:, :-1] == block_q
    return np.where(touched, np.where(full, FULL, PARTIAL), EMPTY).astype(np.int32)


def _shrink_rows(block_mask: np.ndarray, pad_front: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the non-empty columns in order (data_next) and their block_mask, padded to one width.

    Padding repeats a valid index (so the pipeline fetches nothing new) with block_mask EMPTY (no compute).
    """
    nonzero = block_mask != EMPTY
    count = nonzero.sum(axis=1)
    width = max(int(count.max()), 1)
    order = np.argsort(~nonzero, axis=1, kind="stable")[:, :width]
    slot = np.arange(width)[None, :]
    if pad_front:
        shift = (width - count)[:, None]
        order = np.take_along_axis(order, np.clip(slot - shift, 0, width - 1), axis=1)
        valid = slot >= shift
    else:
        order = np.take_along_axis(order, np.minimum(slot, np.maximum(count - 1, 0)[:, None]), axis=1)
        valid = slot < count[:, None]
    values = np.where(valid, np.take_along_axis(block_mask, order, axis=1), EMPTY)
    return order.astype(np.int32), values.astype(np.int32)


def _small(array: np.ndarray) -> np.ndarray:
    """Scalar memory is scarce on TPU: the narrowest integer type that holds the values (as splash does)."""
    return info_lib._downcast_to_small_type(np.ascontiguousarray(array, dtype=np.int32))


@functools.lru_cache(maxsize=64)
def mask_infos(spec: MaskSpec, length: int, padded: int, block: int) -> tuple[info_lib.MaskInfo, info_lib.MaskInfo, info_lib.MaskInfo]:
    """(forward, dq, dkv) MaskInfo with shrunk grids for square tiles of `block`, shared by all heads.

    Cached: a transformer builds the same kernel once per layer and per step.
    """
    block_mask = tile_block_mask(spec, length, padded, block, block)
    q_sequence = np.arange(padded, dtype=np.int32)
    data_next, values = _shrink_rows(block_mask, pad_front=False)
    fwd = info_lib.MaskInfo(_small(data_next[None]), None, _small(values[None]), None, q_sequence)
    data_next, values = _shrink_rows(block_mask.T, pad_front=True)
    dkv = info_lib.MaskInfo(_small(data_next.T[None]), None, _small(values.T[None]), None, q_sequence)
    return fwd, fwd, dkv


def computed_tile_fraction(spec: MaskSpec, length: int, block: int) -> tuple[float, float]:
    """(fraction of tiles the forward kernel computes, fraction of the length x length mask visible)."""
    padded = -(-length // block) * block
    block_mask = tile_block_mask(spec, length, padded, block, block)
    lo1, hi1, lo2, hi2 = visible_intervals(spec, np.arange(length), length)
    visible_count = int((hi1 - lo1).clip(0).sum() + (hi2 - lo2).clip(0).sum())
    return float((block_mask != EMPTY).mean()), visible_count / float(length) ** 2
