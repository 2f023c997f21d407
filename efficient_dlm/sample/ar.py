"""The AR baseline: causal decoding of the same model with its own static KV cache, one compiled program.

It exists so that every speed and accuracy comparison between the AR teacher and the dLM is made in
one harness (same prompts, layout, token choice, stop handling, statistics). The prompt is prefilled
causally in one forward pass whose last position yields the first token; each further forward pass
feeds one token (bounded lax.while_loop that stops when every row has committed a stop token).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from efficient_dlm.models.cache import KVCache
from efficient_dlm.sample.choice import choose_tokens
from efficient_dlm.sample.program import TRACES, Plan, finish, is_stop, step_key, stream


class _State(NamedTuple):
    cache: KVCache
    token: jax.Array  # [batch] last chosen token
    canvas: jax.Array  # [batch, max_new]
    canvas_step: jax.Array  # [batch, max_new]
    canvas_logits: jax.Array | None
    done: jax.Array  # [batch]
    row_forwards: jax.Array  # [batch]
    t: jax.Array  # scalar: tokens chosen so far (= forward passes run)


def _record(plan: Plan, knobs: dict, state: _State, choice, t) -> _State:
    """Stores the token chosen at step t for rows still running."""
    live = ~state.done
    token = choice.token[:, 0]
    canvas = state.canvas.at[:, t].set(jnp.where(live, token, plan.pad_id))
    canvas_step = state.canvas_step.at[:, t].set(jnp.where(live, t, -1))
    logits = state.canvas_logits
    if logits is not None:
        logits = logits.at[:, t].set(jnp.where(live[:, None], choice.logits[:, 0], 0.0))
    stream(plan, t, token[:, None], live[:, None])
    done = state.done | is_stop(knobs, token) | (t + 1 >= plan.max_new_tokens)
    return state._replace(
        token=token, canvas=canvas, canvas_step=canvas_step, canvas_logits=logits, done=done,
        row_forwards=state.row_forwards + live, t=t + 1,
    )


def ar_program(graphdef, plan: Plan, state, inputs: dict, knobs: dict) -> dict:
    """Greedy / sampled causal generation of up to max_new_tokens per row (jit with graphdef, plan static)."""
    TRACES["ar"] += 1
    model = nnx.merge(graphdef, state)
    allowed = plan.allowed()
    batch, width = inputs["prompt"].shape
    cache = KVCache.empty(
        model.config, batch, width + plan.max_new_tokens - 1, rope_length=inputs["lengths"] + plan.max_new_tokens
    ).replace(start=inputs["start"])
    hidden, (keys, values) = model.decode(inputs["prompt"], inputs["positions"], cache, attention="causal")
    cache = cache.write(keys, values, 0).replace(length=jnp.full((batch,), width, jnp.int32))
    choice = choose_tokens(model, hidden[:, -1:], step_key(knobs, 0), plan.sampling, knobs, allowed, plan.record_logits)
    canvas = jnp.full((batch, plan.max_new_tokens), plan.pad_id, jnp.int32)
    logits = jnp.zeros((*canvas.shape, plan.vocab_size), jnp.float32) if plan.record_logits else None
    zeros = jnp.zeros((batch,), jnp.int32)
    init = _State(cache, zeros, canvas, jnp.full_like(canvas, -1), logits, zeros.astype(bool), zeros, jnp.int32(0))
    state = _record(plan, knobs, init, choice, jnp.int32(0))

    def running(s: _State):
        return (s.t < plan.max_new_tokens) & ~s.done.all()

    def step(s: _State) -> _State:
        positions = (inputs["lengths"] + s.t - 1)[:, None]
        hidden, (keys, values) = model.decode(s.token[:, None], positions, s.cache, attention="causal")
        slot = width + s.t - 1
        cache = s.cache.write(keys, values, slot).replace(length=jnp.full((batch,), slot + 1, jnp.int32))
        choice = choose_tokens(model, hidden, step_key(knobs, s.t), plan.sampling, knobs, allowed, plan.record_logits)
        return _record(plan, knobs, s._replace(cache=cache), choice, s.t)

    state = jax.lax.while_loop(running, step, state)
    out = finish(plan, knobs, state.canvas, state.canvas_step, jnp.zeros((batch,), jnp.int32), state.canvas_logits)
    out.update(forwards=state.t, row_forwards=state.row_forwards, blocks=state.t)
    return out
