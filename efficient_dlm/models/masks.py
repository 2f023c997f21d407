"""Attention visibility as predicates over indices (docs/METHOD.md section 1).

Masks are never stored: `visible(spec, q_idx, k_idx)` answers "may query q attend to key k" from
integer indices alone, so the same definition serves the XLA reference (evaluated on device into a
boolean tile), splash attention's computable masks and the Pallas kernels. Segment ids (packed
documents) are AND-ed on top by the callers.

Index convention for `clean_context`: the physical sequence is [x_t ; x_0] of length 2L; index i < L
is x_t at position i, index i >= L is x_0 at position i - L.

Sliding window W (Mistral, Qwen2 `use_sliding_window`), in every mode and in decoding: on top of the
mode's pattern, a query at position q never sees a key at position k <= q - W, i.e. it sees keys with
q - k < W (transformers' `sliding_window_overlay`). Keys after the query, which the block-causal and
bidirectional patterns show, are not limited by the window: the window bounds how far back a token
looks, the diffusion block how far ahead. One rule for training and decoding keeps the two identical.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

MODES = ("causal", "block", "bidirectional", "clean_context")


@dataclasses.dataclass(frozen=True)
class MaskSpec:
    """Static description of a training-time attention pattern over one physical sequence.

    seq_len is L, the length of one stream (for clean_context the physical length is 2L).
    sliding_window hides keys `sliding_window` or more positions before the query (module docstring).
    """

    mode: str
    block_size: int | None = None
    seq_len: int | None = None
    sliding_window: int | None = None

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown attention mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if self.mode in ("block", "clean_context"):
            if self.block_size is None or self.block_size <= 0:
                raise ValueError(f"attention mode {self.mode!r} needs a positive block_size, got {self.block_size}")
            if self.seq_len is not None and self.seq_len % self.block_size:
                raise ValueError(f"block_size {self.block_size} does not divide sequence length {self.seq_len}")
        if self.mode == "clean_context" and self.seq_len is None:
            raise ValueError("attention mode 'clean_context' needs seq_len (the length L of one stream)")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(f"sliding_window must be positive or None, got {self.sliding_window}")

    @property
    def physical_len(self) -> int | None:
        if self.seq_len is None:
            return None
        return 2 * self.seq_len if self.mode == "clean_context" else self.seq_len


def stream_and_position(spec: MaskSpec, idx):
    """(stream s, position) of physical index idx: s = 0 for x_t, 1 for x_0 (clean_context only)."""
    if spec.mode != "clean_context":
        return jnp.zeros_like(idx), idx
    stream = (idx >= spec.seq_len).astype(idx.dtype)
    return stream, idx - stream * spec.seq_len


def within_window(window: int, q_pos, k_pos):
    """The sliding-window condition q - k < window on positions."""
    return q_pos - k_pos < window


def visible(spec: MaskSpec, q_idx, k_idx):
    """Boolean visibility for broadcastable integer arrays of query and key physical indices."""
    ok = _pattern_visible(spec, q_idx, k_idx)
    if spec.sliding_window is None:
        return ok
    _, q_pos = stream_and_position(spec, q_idx)
    _, k_pos = stream_and_position(spec, k_idx)
    return ok & within_window(spec.sliding_window, q_pos, k_pos)


def _pattern_visible(spec: MaskSpec, q_idx, k_idx):
    if spec.mode == "bidirectional":
        return jnp.ones(jnp.broadcast_shapes(jnp.shape(q_idx), jnp.shape(k_idx)), dtype=bool)
    if spec.mode == "causal":
        return k_idx <= q_idx
    if spec.mode == "block":
        return k_idx // spec.block_size <= q_idx // spec.block_size
    q_stream, q_pos = stream_and_position(spec, q_idx)
    k_stream, k_pos = stream_and_position(spec, k_idx)
    q_block, k_block = q_pos // spec.block_size, k_pos // spec.block_size
    # Stream equality as a zero difference: Mosaic (splash's in-kernel mask) cannot lower `==` of two
    # widened booleans.
    same_block_same_stream = (q_block == k_block) & (q_stream - k_stream == 0)
    noisy_sees_clean_past = (q_stream == 0) & (k_stream == 1) & (k_block < q_block)
    clean_sees_clean_past = (q_stream == 1) & (k_stream == 1) & (k_block <= q_block)
    return same_block_same_stream | noisy_sees_clean_past | clean_sees_clean_past


def chunk_visible(mode: str, block_size: int | None, q_pos: jnp.ndarray, k_pos: jnp.ndarray,
                  sliding_window: int | None = None) -> jnp.ndarray:
    """Visibility inside a decoded chunk from positions: causal, block-causal or bidirectional, and the window."""
    if mode == "causal":
        ok = k_pos <= q_pos
    elif mode == "block":
        ok = visible(MaskSpec("block", block_size), q_pos, k_pos)
    elif mode == "bidirectional":
        ok = jnp.ones(jnp.broadcast_shapes(q_pos.shape, k_pos.shape), dtype=bool)
    else:
        raise ValueError(f"attention mode {mode!r} cannot be used with a KV cache; use causal, block or bidirectional")
    return ok if sliding_window is None else ok & within_window(sliding_window, q_pos, k_pos)


def dense_mask(spec: MaskSpec, q_len: int, k_len: int, q_segment_ids=None, kv_segment_ids=None):
    """[batch or 1, q_len, k_len] boolean mask, built on device from indices (XLA reference path)."""
    q_idx = jnp.arange(q_len, dtype=jnp.int32)[:, None]
    k_idx = jnp.arange(k_len, dtype=jnp.int32)[None, :]
    mask = visible(spec, q_idx, k_idx)[None]
    if q_segment_ids is not None:
        mask = mask & (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :])
    return mask
