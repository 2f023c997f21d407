"""Fused LM head for confidence-based decoding: softmax statistics without [N, vocab] logits in HBM.

The sampler needs, per position, only the max probability, its token and (for entropy-bounded
commits) the entropy. This kernel streams vocab tiles of the output embedding past a tile of hidden
states and keeps an online summary per position of the scaled logits z = h @ W / temperature:
    m = max z,  s = sum exp(z - m),  t = sum exp(z - m) (z - m),  token = first argmax
so max_prob = 1 / s and entropy = log s - t / s. Summaries of vocab shards combine exactly
(`combine` with pmax/psum/pmin inside shard_map), so a vocab-sharded embedding works too.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

NEG_INF = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite, so 0 * (z - m) never makes NaN
BLOCK_ROWS, BLOCK_VOCAB = 256, 512


class SoftmaxSummary(NamedTuple):
    """Per-position online-softmax state over (part of) the vocabulary; arrays of shape [N]."""

    max_logit: jax.Array
    sum_exp: jax.Array  # sum exp(z - max_logit)
    sum_exp_logit: jax.Array  # sum exp(z - max_logit) * (z - max_logit)
    token: jax.Array  # int32 global vocab index of the first maximum

    def max_prob(self) -> jax.Array:
        return 1.0 / self.sum_exp

    def entropy(self) -> jax.Array:
        return jnp.log(self.sum_exp) - self.sum_exp_logit / self.sum_exp


def check_temperature(temperature) -> None:
    if isinstance(temperature, (int, float)) and temperature <= 0:
        raise ValueError(f"temperature must be positive for softmax statistics, got {temperature}")


def merge(a: SoftmaxSummary, b_max, b_sum, b_sum_logit, b_token) -> SoftmaxSummary:
    """Summary of the union of two disjoint vocab parts (b comes later: ties keep a's token)."""
    m = jnp.maximum(a.max_logit, b_max)
    wa, wb = jnp.exp(a.max_logit - m), jnp.exp(b_max - m)
    return SoftmaxSummary(
        m,
        wa * a.sum_exp + wb * b_sum,
        wa * (a.sum_exp_logit + (a.max_logit - m) * a.sum_exp) + wb * (b_sum_logit + (b_max - m) * b_sum),
        jnp.where(b_max > a.max_logit, b_token, a.token),
    )


def combine(part: SoftmaxSummary, axis_name) -> SoftmaxSummary:
    """Exact summary over all vocab shards of mesh axis `axis_name` (inside shard_map)."""
    m = lax.pmax(part.max_logit, axis_name)
    w = jnp.exp(part.max_logit - m)
    big = jnp.iinfo(jnp.int32).max
    return SoftmaxSummary(
        m,
        lax.psum(w * part.sum_exp, axis_name),
        lax.psum(w * (part.sum_exp_logit + (part.max_logit - m) * part.sum_exp), axis_name),
        lax.pmin(jnp.where(part.max_logit == m, part.token, big), axis_name),
    )


def _kernel(offset_ref, inv_temperature_ref, h_ref, w_ref, allowed_ref, m_out, s_out, t_out, i_out, m_ref, s_ref, t_ref,
            i_ref, *, vocab: int, block_vocab: int, num_tiles: int):
    j = pl.program_id(1)

    @pl.when(j == 0)
    def _init():
        m_ref[...] = jnp.full_like(m_ref, NEG_INF)
        s_ref[...] = jnp.zeros_like(s_ref)
        t_ref[...] = jnp.zeros_like(t_ref)
        i_ref[...] = jnp.zeros_like(i_ref)

    z = jnp.dot(h_ref[...], w_ref[...], preferred_element_type=jnp.float32) * inv_temperature_ref[0]
    column = j * block_vocab + lax.broadcasted_iota(jnp.int32, z.shape, 1)
    # Ids the caller bans are out; so is whatever the last tile reads past the end of the vocabulary.
    z = jnp.where((column < vocab) & (allowed_ref[...] != 0), z, NEG_INF)
    tile_max = jnp.max(z, axis=-1, keepdims=True)
    tile_token = jnp.min(jnp.where(z == tile_max, column, jnp.iinfo(jnp.int32).max), axis=-1, keepdims=True)
    p = jnp.exp(z - tile_max)
    state = SoftmaxSummary(m_ref[...], s_ref[...], t_ref[...], i_ref[...])
    state = merge(state, tile_max, jnp.sum(p, -1, keepdims=True), jnp.sum(p * (z - tile_max), -1, keepdims=True), tile_token)
    m_ref[...], s_ref[...], t_ref[...], i_ref[...] = state

    @pl.when(j == num_tiles - 1)
    def _finish():
        m_out[...], s_out[...], t_out[...] = m_ref[...], s_ref[...], t_ref[...]
        i_out[...] = i_ref[...] + offset_ref[0]


def lm_head_summary(
    hidden: jax.Array,
    w_out: jax.Array,
    *,
    temperature: float | jax.Array = 1.0,
    token_offset: jax.Array | int = 0,
    allowed: jax.Array | None = None,
    block_rows: int = BLOCK_ROWS,
    block_vocab: int = BLOCK_VOCAB,
    interpret: bool = False,
) -> SoftmaxSummary:
    """hidden [N, E] and output embedding w_out [E, V] -> SoftmaxSummary of hidden @ w_out / temperature.

    token_offset is added to token ids (the first vocab id of this shard when w_out is a vocab shard);
    allowed [V] bool, if given, removes the ids where it is False (e.g. the [MASK] token).
    temperature may be traced (a sampler knob); a Python number must be positive.
    """
    check_temperature(temperature)
    rows, vocab = hidden.shape[0], w_out.shape[1]
    block_rows = min(block_rows, -(-rows // 8) * 8)
    block_vocab = min(block_vocab, -(-vocab // 128) * 128)
    padded_rows = -(-rows // block_rows) * block_rows
    hidden = jnp.pad(hidden, ((0, padded_rows - rows), (0, 0))).astype(w_out.dtype)
    num_tiles = pl.cdiv(vocab, block_vocab)
    column = pl.BlockSpec((block_rows, 1), lambda i, j, *_: (i, 0))
    out_shape = [jax.ShapeDtypeStruct((padded_rows, 1), jnp.float32)] * 3 + [jax.ShapeDtypeStruct((padded_rows, 1), jnp.int32)]
    outs = pl.pallas_call(
        functools.partial(_kernel, vocab=vocab, block_vocab=block_vocab, num_tiles=num_tiles),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(padded_rows // block_rows, num_tiles),
            in_specs=[
                pl.BlockSpec((block_rows, hidden.shape[1]), lambda i, j, *_: (i, 0)),
                pl.BlockSpec((w_out.shape[0], block_vocab), lambda i, j, *_: (0, j)),
                pl.BlockSpec((1, block_vocab), lambda i, j, *_: (0, j)),
            ],
            out_specs=[column] * 4,
            scratch_shapes=[pltpu.VMEM((block_rows, 1), jnp.float32)] * 3 + [pltpu.VMEM((block_rows, 1), jnp.int32)],
        ),
        out_shape=out_shape,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        cost_estimate=pl.CostEstimate(  # for XLA's cost analysis, which cannot see inside a Mosaic kernel
            flops=2 * padded_rows * hidden.shape[1] * vocab,
            transcendentals=padded_rows * vocab,
            bytes_accessed=hidden.size * hidden.dtype.itemsize + w_out.size * w_out.dtype.itemsize * (padded_rows // block_rows),
        ),
        interpret=interpret,
    )(
        jnp.reshape(jnp.asarray(token_offset, jnp.int32), (1,)),
        jnp.reshape(1.0 / jnp.asarray(temperature, jnp.float32), (1,)),
        hidden,
        w_out,
        jnp.ones((1, vocab), jnp.int32) if allowed is None else jnp.asarray(allowed, jnp.int32).reshape(1, vocab),
    )
    return SoftmaxSummary(*(x[:rows, 0] for x in outs))
