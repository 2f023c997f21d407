"""Token choice and confidence: the one place where hidden states become (token, confidence, entropy).

Every strategy ranks masked positions by the confidence of the token chosen there (docs/METHOD.md
section 6): greedy takes the argmax and its probability; sampling draws from the tempered
distribution restricted by top-k / top-p and uses the drawn token's probability. Ids the model must
never emit (the [MASK] token, vocabulary padding past `valid_vocab_size`) are removed first.

With a kernel attention backend (splash / pallas) the greedy path uses the fused LM-head kernel
(`kernel_dispatch.lm_head_confidence`), which never materialises the [B, T, V] logits; sampling, and
runs that record logits, use the XLA path below.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from efficient_dlm.models import kernel_dispatch
from efficient_dlm.models.reductions import argmax, max_and_argmax

_NEG_INF = -jnp.inf


@dataclasses.dataclass(frozen=True)
class Sampling:
    """Static (compiled-in) part of token choice; temperature and top_p values are traced knobs."""

    greedy: bool = True
    top_k: int = 0  # 0: no top-k filter
    top_p: bool = False  # whether a top-p filter is applied (its value is the knob "top_p")
    entropy: bool = False  # whether per-position entropy is needed (entropy-bounded strategy)


class Choice(NamedTuple):
    token: jax.Array  # [B, T] int32
    confidence: jax.Array  # [B, T] float32, probability of `token`
    entropy: jax.Array  # [B, T] float32 (zeros when not requested)
    logits: jax.Array | None  # [B, T, V] float32 raw model logits (None from the fused kernel)


def allowed_ids(vocab_size: int, banned: tuple[int, ...], valid_vocab_size: int | None) -> np.ndarray:
    """Boolean [V] of ids the sampler may emit."""
    allowed = np.ones((vocab_size,), bool)
    allowed[[i for i in banned if i is not None]] = False
    if valid_vocab_size is not None:
        allowed[valid_vocab_size:] = False
    return allowed


def _top_k_filter(logits: jax.Array, k: int) -> jax.Array:
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits < kth, _NEG_INF, logits)


def _top_p_filter(logits: jax.Array, top_p: jax.Array) -> jax.Array:
    """Keeps the smallest set of most likely ids whose probability reaches top_p (always the best one)."""
    ordered = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(ordered, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each sorted id
    cutoff = jnp.min(jnp.where(before < top_p, ordered, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits < cutoff, _NEG_INF, logits)


def _fused_kernel(model, want_logits: bool, sampling: Sampling) -> bool:
    kernel = kernel_dispatch.resolve_backend(model.config.attention_backend) in ("splash", "pallas")
    # Quantized activations: the LM head must run qwix's quantized einsum (model.logits), not the float kernel.
    return kernel and sampling.greedy and not want_logits and not model.config.quantize_activations


def filtered_logits(raw: jax.Array, sampling: Sampling, knobs: dict, allowed: np.ndarray) -> jax.Array:
    """The logits tokens are drawn from when sampling: disallowed ids removed, tempered, top-k / top-p
    filtered (softmax of this is the sampling distribution; speculative decoding needs it explicitly)."""
    logits = jnp.where(jnp.asarray(allowed), raw, _NEG_INF) / knobs["temperature"]
    if sampling.top_k:
        logits = _top_k_filter(logits, sampling.top_k)
    if sampling.top_p:
        logits = _top_p_filter(logits, knobs["top_p"])
    return logits


def choose_tokens(
    model, hidden: jax.Array, key: jax.Array, sampling: Sampling, knobs: dict, allowed: np.ndarray, want_logits: bool
) -> Choice:
    """Chooses a token at every position of `hidden` [B, T, E] and reports its confidence.

    Only one pass of exponentials over the vocabulary (the log-partition) is needed for the
    confidence exp(z_token - logsumexp(z)); entropy costs a second pass and is computed only when asked.
    """
    if _fused_kernel(model, want_logits, sampling):
        confidence, token, entropy = kernel_dispatch.lm_head_confidence(
            hidden, model.output_embedding(), with_entropy=sampling.entropy, allowed=allowed,
            backend=model.config.attention_backend,
        )
        return Choice(token, confidence, jnp.zeros_like(confidence) if entropy is None else entropy, None)
    raw = model.logits(hidden)
    logits = jnp.where(jnp.asarray(allowed), raw, _NEG_INF)
    if sampling.greedy and not sampling.entropy:
        # The argmax's probability is 1 / sum(exp(z - max z)): one pass of exponentials, no gather.
        top, token = max_and_argmax(logits)
        confidence = 1.0 / jnp.sum(jnp.exp(logits - top), axis=-1)
        return Choice(token, confidence, jnp.zeros_like(confidence), raw)
    if sampling.greedy:
        token = argmax(logits)
    else:
        logits = filtered_logits(raw, sampling, knobs, allowed)
        token = jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
    log_partition = jax.nn.logsumexp(logits, axis=-1)
    chosen = jnp.take_along_axis(logits, token[..., None], axis=-1)[..., 0]
    confidence = jnp.exp(chosen - log_partition)
    if sampling.entropy:
        probs = jnp.exp(logits - log_partition[..., None])
        entropy = log_partition - jnp.sum(jnp.where(probs > 0, probs * logits, 0.0), axis=-1)
    else:
        entropy = jnp.zeros_like(confidence)
    return Choice(token, confidence, entropy, raw)
