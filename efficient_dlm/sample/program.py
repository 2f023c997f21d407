"""What the two compiled samplers (block diffusion, AR baseline) share.

- `Plan`: the static, hashable description of one program. Together with the array shapes it is the
  jit cache key, so a program is traced once per (batch, prompt bucket, max_new_tokens, block size,
  strategy, sampling mode); thresholds, temperature, top-p, stop tokens and the seed are traced
  values ("knobs"), so changing them never recompiles.
- `TRACES`: counts traces per program kind. Tracing happens exactly when jax compiles a new program,
  so tests read it to prove that calls of the same shape do not recompile.
- The streaming hook: a program compiled with `stream=True` hands each finished block to the host
  through an ordered `jax.debug.callback`; the Python callback itself is not part of the jit key.
- `finish`: turns the program's token canvas into generated tokens cut after the first stop token.
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from efficient_dlm.errors import UserError
from efficient_dlm.sample.choice import Sampling, allowed_ids

TRACES: collections.Counter = collections.Counter()

# The host function receiving (block index, tokens [B, T], generated mask [B, T]) while a program runs.
_stream_handler: list[Callable | None] = [None]


@dataclasses.dataclass(frozen=True)
class Plan:
    strategy: str  # "ar" or one of strategies.STRATEGIES
    max_new_tokens: int
    sampling: Sampling
    pad_id: int
    banned_ids: tuple[int, ...]  # never emitted ([MASK])
    valid_vocab_size: int | None
    vocab_size: int
    block_size: int = 1
    num_blocks: int = 1
    tokens_per_step: int = 1
    mask_id: int = -1
    token_shift: bool = False
    record_logits: bool = False
    stream: bool = False
    record_canvas: bool = False  # diffusion: also return the raw canvas and commit steps (on-policy distillation)

    def allowed(self) -> np.ndarray:
        return allowed_ids(self.vocab_size, self.banned_ids, self.valid_vocab_size)


MAX_STOP_TOKENS = 8  # knobs["stop_ids"] is an int32 [MAX_STOP_TOKENS] array padded with -1


def stop_id_array(stop_ids: tuple[int, ...]) -> np.ndarray:
    if len(stop_ids) > MAX_STOP_TOKENS:
        raise UserError(f"at most {MAX_STOP_TOKENS} stop tokens are supported, got {len(stop_ids)}")
    return np.array(list(stop_ids) + [-1] * (MAX_STOP_TOKENS - len(stop_ids)), np.int32)


def is_stop(knobs: dict, tokens: jax.Array) -> jax.Array:
    """Elementwise OR over the stop-id slots (no reduction: it fuses into its consumer in the step)."""
    stop_ids = knobs["stop_ids"]
    hit = tokens == stop_ids[0]
    for i in range(1, MAX_STOP_TOKENS):
        hit = hit | (tokens == stop_ids[i])
    return hit


def step_key(knobs: dict, step: jax.Array) -> jax.Array:
    """The RNG key of global step `step` (a pure function of the seed and the step)."""
    return jax.random.fold_in(jax.random.key(knobs["seed"]), step)


def _dispatch(block, tokens, generated) -> None:
    handler = _stream_handler[0]
    if handler is not None:
        handler(int(block), np.asarray(tokens), np.asarray(generated))


def stream(plan: Plan, block: jax.Array, tokens: jax.Array, generated: jax.Array) -> None:
    """Sends a finished block to the host (only in programs compiled with stream=True)."""
    if plan.stream:
        jax.debug.callback(_dispatch, block, tokens, generated, ordered=True)


class streaming:
    """Context manager installing `handler(block, tokens, generated)` for programs run inside it."""

    def __init__(self, handler: Callable | None):
        self.handler = handler

    def __enter__(self):
        self.previous, _stream_handler[0] = _stream_handler[0], self.handler

    def __exit__(self, *exc):
        if self.handler is not None:
            jax.effects_barrier()
        _stream_handler[0] = self.previous


def finish(plan: Plan, knobs: dict, canvas, canvas_step, first, logits=None) -> dict:
    """Generated tokens of each row: canvas[b, first[b] : first[b] + max_new], cut after the first stop.

    canvas_step holds the global step at which a position was committed (-1: never generated).
    """
    index = first[:, None] + jnp.arange(plan.max_new_tokens)[None, :]
    tokens = jnp.take_along_axis(canvas, index, axis=1)
    steps = jnp.take_along_axis(canvas_step, index, axis=1)
    generated = steps >= 0
    stops = generated & is_stop(knobs, tokens)
    last = jnp.where(stops.any(axis=1), jnp.argmax(stops, axis=1), plan.max_new_tokens)
    keep = generated & (jnp.arange(plan.max_new_tokens)[None, :] <= last[:, None])
    out = {
        "tokens": jnp.where(keep, tokens, plan.pad_id),
        "commit_step": jnp.where(keep, steps, -1),
        "lengths": jnp.sum(keep, axis=1).astype(jnp.int32),
    }
    if logits is not None:
        out["logits"] = jnp.take_along_axis(logits, index[..., None], axis=1)
    return out
