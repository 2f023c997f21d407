"""Reductions over the vocabulary that XLA lowers slowly as written in jnp.

`jnp.argmax` becomes one variadic (value, index) reduce, which XLA:CPU runs as a scalar loop: on the demo
model's [8, 16, 3072] block logits it took 1.75 ms, as long as the LM-head matmul that produced them, while
a max followed by "first index equal to the max" (two plain reduces, both vectorised) took 0.3 ms
including the confidence's exp-sum (benchmarks: docs/BENCHMARKS.md, sampler overhead, session 9). Greedy
decoding takes an argmax over the vocabulary at every position of every step, so this is on the hot path
of every sampler, the speculative verifier and the loss's argmax-agreement statistics.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def max_and_argmax(x: jax.Array, axis: int = -1) -> tuple[jax.Array, jax.Array]:
    """(max with the axis kept, int32 index of its first occurrence with the axis dropped), exactly as
    jnp.max / jnp.argmax give them: a NaN is the maximum (its first occurrence is the index), and a row of
    equal values (all -inf too) gives index 0."""
    axis = axis % x.ndim
    top = jnp.max(x, axis=axis, keepdims=True)
    hit = (x == top) | jnp.isnan(x)
    index = jax.lax.broadcasted_iota(jnp.int32, x.shape, axis)
    return top, jnp.min(jnp.where(hit, index, x.shape[axis]), axis=axis)


def argmax(x: jax.Array, axis: int = -1) -> jax.Array:
    """int32 index of the first maximum along `axis` (jnp.argmax's result, vectorised reduces)."""
    return max_and_argmax(x, axis)[1]
