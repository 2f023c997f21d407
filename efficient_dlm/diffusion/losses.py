"""Per-token cross-entropy from final hidden states, plain or chunked over the sequence.

Why our own code: the loss reads only the LM head matrix (`model.output_embedding()`) and must
(a) never let padded vocabulary rows win (their logits are -inf), (b) fit 150k-vocabulary models in
memory. The chunked path computes logits for `chunk` positions at a time under `jax.checkpoint`, so
neither the forward nor the backward pass ever holds the full [B, L, vocab] float32 tensor. It is
tested equal (value and gradient) to the plain path, which uses `model.logits`.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class TokenStats(NamedTuple):
    """Per-token results, each [B, L]: cross-entropy, log-partition (for z-loss), argmax == target."""

    ce: jax.Array
    lse: jax.Array
    correct: jax.Array


def _stats_from_logits(logits: jax.Array, targets: jax.Array, valid_vocab: int | None) -> TokenStats:
    if valid_vocab is not None and valid_vocab < logits.shape[-1]:
        ids = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
        logits = jnp.where(ids < valid_vocab, logits, -jnp.inf)
    lse = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return TokenStats(lse - target_logit, lse, correct)


def token_stats(model, hidden: jax.Array, targets: jax.Array, *, valid_vocab: int | None = None, chunk: int = 0) -> TokenStats:
    """Cross-entropy of `targets` [B, L] under the LM head applied to `hidden` [B, L, E].

    chunk == 0: plain (full logits). chunk > 0: `chunk` positions at a time (must divide L).
    """
    if not chunk or chunk >= hidden.shape[1]:
        return _stats_from_logits(model.logits(hidden), targets, valid_vocab)
    batch, length, embed = hidden.shape
    if length % chunk:
        raise ValueError(f"train.loss_chunk ({chunk}) must divide the sequence length ({length})")
    w = model.output_embedding().astype(hidden.dtype)
    n = length // chunk
    h = hidden.reshape(batch, n, chunk, embed).swapaxes(0, 1)
    t = targets.reshape(batch, n, chunk).swapaxes(0, 1)

    @jax.checkpoint
    def one_chunk(args):
        h_c, t_c = args
        logits = jnp.einsum("bte,ev->btv", h_c, w, preferred_element_type=jnp.float32)
        return _stats_from_logits(logits, t_c, valid_vocab)

    out = jax.lax.map(one_chunk, (h, t))
    return TokenStats(*(x.swapaxes(0, 1).reshape(batch, length) for x in out))
