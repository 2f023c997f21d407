"""Per-token cross-entropy from final hidden states, plain or chunked over the sequence.

Why our own code: the loss reads only the LM head matrix (`model.output_embedding()`) and must
(a) never let padded vocabulary rows win (their logits are -inf), (b) fit 150k-vocabulary models in
memory. The chunked path computes logits for `chunk` positions at a time under `jax.checkpoint`, so
neither the forward nor the backward pass ever holds the full [B, L, vocab] float32 tensor. It is
tested equal (value and gradient) to the plain path, which uses `model.logits`.

The predictive entropy (for the confidence-aware loss, docs/METHOD.md section 9) is computed in the
same pass, so the chunked path bounds its memory too.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from efficient_dlm.models.reductions import argmax


class TokenStats(NamedTuple):
    """Per-token results, each [B, L]: cross-entropy, log-partition (for z-loss), argmax == target, and
    the entropy of softmax(logits / temperature) (None unless asked for)."""

    ce: jax.Array
    lse: jax.Array
    correct: jax.Array
    entropy: jax.Array | None = None


def mask_padded_vocab(logits: jax.Array, valid_vocab: int | None) -> jax.Array:
    """Logits with ids >= valid_vocab (vocabulary padding) set to -inf: never predicted."""
    if valid_vocab is None or valid_vocab >= logits.shape[-1]:
        return logits
    ids = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    return jnp.where(ids < valid_vocab, logits, -jnp.inf)


def entropy_from_logits(logits: jax.Array, temperature: float = 1.0) -> jax.Array:
    """H(softmax(logits / temperature)) = lse - sum_v p_v z_v over the last axis, in nats. -inf logits
    (padded ids) have p = 0 and read z = 0 in the sum, so they add 0 to the value and to the gradient
    (p * z with z = -inf would be nan)."""
    z = logits.astype(jnp.float32) / temperature
    lse = jax.nn.logsumexp(z, axis=-1)
    p = jax.nn.softmax(z, axis=-1)
    return lse - jnp.sum(p * jnp.where(jnp.isfinite(z), z, 0.0), axis=-1)


def confidence_sum(count: jax.Array, correct: jax.Array, entropy: jax.Array) -> jax.Array:
    """CAP's numerator (docs/METHOD.md section 9): sum_i count_i [argmax_i == target_i] H_i. The
    selection is a constant (stop-gradient): only the entropy of the already-correct positions is
    pushed down, never which positions count as correct."""
    return jnp.sum(count * jax.lax.stop_gradient(correct) * entropy)


def _stats_from_logits(logits: jax.Array, targets: jax.Array, valid_vocab: int | None,
                       entropy_temperature: float | None = None) -> TokenStats:
    logits = mask_padded_vocab(logits, valid_vocab)
    lse = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    correct = (argmax(logits) == targets).astype(jnp.float32)
    entropy = None if entropy_temperature is None else entropy_from_logits(logits, entropy_temperature)
    return TokenStats(lse - target_logit, lse, correct, entropy)


def token_stats(model, hidden: jax.Array, targets: jax.Array, *, valid_vocab: int | None = None, chunk: int = 0,
                entropy_temperature: float | None = None) -> TokenStats:
    """Cross-entropy of `targets` [B, L] under the LM head applied to `hidden` [B, L, E].

    chunk == 0: plain (full logits). chunk > 0: `chunk` positions at a time (L is zero-padded to whole
    chunks; the padding's statistics are cut off). entropy_temperature: also the predictive entropy at
    that temperature (None: not computed).
    """
    if not chunk or chunk >= hidden.shape[1]:
        return _stats_from_logits(model.logits(hidden), targets, valid_vocab, entropy_temperature)
    batch, length, embed = hidden.shape
    w = model.output_embedding().astype(hidden.dtype)
    n = -(-length // chunk)
    pad = n * chunk - length
    h = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(batch, n, chunk, embed).swapaxes(0, 1)
    t = jnp.pad(targets, ((0, 0), (0, pad))).reshape(batch, n, chunk).swapaxes(0, 1)

    @jax.checkpoint
    def one_chunk(args):
        h_c, t_c = args
        logits = jnp.einsum("bte,ev->btv", h_c, w, preferred_element_type=jnp.float32)
        return _stats_from_logits(logits, t_c, valid_vocab, entropy_temperature)

    out = jax.lax.map(one_chunk, (h, t))
    return jax.tree.map(lambda x: x.swapaxes(0, 1).reshape(batch, n * chunk)[:, :length], out)
