"""The serving programs: one call advances every slot of a fixed slot batch by one block (dLM) or one token (AR).

Continuous batching needs a program whose shapes do not depend on which requests are in flight. The
whole-generation sampler (sample/diffusion.py) decodes a batch from first block to last in one call;
here the host owns each slot's progress (slots.py) and hands the program, per call, the chunk each
slot decodes next, so a request can join at any block boundary and leave as soon as it is finished.

A call decodes, for every slot, the chunk [clean context ; block]: the first step runs the chunk
block-causally against the slot's own cache region (as the sampler's first step does: the clean
context is the previous block, or for a newly admitted slot its whole prompt prefix, so the prefill
rides along), its clean part's keys/values are scattered into the slot's region at host-given slots
(`write_slot`, out-of-range = not written: padding), and the remaining steps denoise the block
bidirectionally against the updated cache until no position is open. Rows keep their own cache
start/length, positions and RNG step (`forwards`), so a slot computes exactly what a batch-of-one
`generate` computes for its request, whatever the other slots hold.

Variants (static): the chunk width (2B in steady state; prompt bucket + B in a call that admits),
and whether any slot samples (then sampled rows draw with their own key, vmapped, and greedy rows
keep the greedy path). So the program compiles once per (width, sampling) pair and never in steady
state. Token choice, commit strategies, stop tests and the cache are the sampler's own pieces.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from efficient_dlm.models.cache import KVCache, update_parts
from efficient_dlm.sample.choice import Choice, Sampling, allowed_ids, choose_tokens
from efficient_dlm.sample.program import TRACES, is_stop
from efficient_dlm.sample.strategies import commit_mask


@dataclasses.dataclass(frozen=True)
class SlotPlan:
    """Static description of a serving program (with the input shapes, the jit key)."""

    kind: str  # "diffusion" or "ar"
    strategy: str  # a diffusion strategy, or "ar"
    block_size: int  # 1 for AR
    tokens_per_step: int
    sampled: bool  # some slot samples (temperature > 0)
    entropy: bool  # the entropy-bounded strategy needs per-position entropy
    token_shift: bool
    vocab_size: int
    banned_ids: tuple[int, ...]
    valid_vocab_size: int | None

    def allowed(self):
        return allowed_ids(self.vocab_size, self.banned_ids, self.valid_vocab_size)


def write_rows(cache: KVCache, keys, values, slots) -> KVCache:
    """Scatters chunk keys/values [layers, S, T, ...] into each row's own cache slots [S, T]; slots
    outside the cache (padding of the chunk) are dropped. (KVCache.write_rows writes a contiguous chunk
    per row; here a row writes only the real tail of a chunk padded to the call's width.)"""
    rows = jnp.arange(slots.shape[0])[:, None]

    def scatter(old, new):
        return old.at[:, rows, slots].set(new, mode="drop")

    return cache.replace(k=update_parts(scatter, cache.k, keys), v=update_parts(scatter, cache.v, values))


def _choose(model, plan: SlotPlan, hidden, knobs: dict, forwards) -> Choice:
    """Token choice per row: the sampler's greedy path for greedy rows; sampled rows draw with their own
    key fold_in(key(seed), forwards), each as a batch of one (so what a row draws is its own business)."""
    allowed = plan.allowed()
    greedy = choose_tokens(model, hidden, None, Sampling(greedy=True, entropy=plan.entropy), knobs, allowed, False)
    if not plan.sampled:
        return greedy
    sampling = Sampling(greedy=False, top_p=True, entropy=plan.entropy)

    def one(h, seed, step, temperature, top_p):
        key = jax.random.fold_in(jax.random.key(seed), step)
        row_knobs = {"temperature": jnp.maximum(temperature, 1e-6), "top_p": top_p}
        return choose_tokens(model, h[None], key, sampling, row_knobs, allowed, False)

    drawn = jax.vmap(one)(hidden, knobs["seed"], forwards, knobs["temperature"], knobs["top_p"])
    pick = (knobs["temperature"] > 0)[:, None]
    return Choice(*(jnp.where(pick, d[:, 0], g) for d, g in zip(drawn[:3], greedy[:3])), None)


def _first_stop(knobs, tokens, step):
    stopped = (step >= 0) & is_stop(knobs, tokens)
    return jnp.min(jnp.where(stopped, jnp.arange(tokens.shape[1])[None, :], tokens.shape[1]), axis=1)


def _denoise(model, plan: SlotPlan, knobs, state, tokens, positions, cache, attention):
    """One forward on a chunk ending with the block, one commit; state = (block, open, step, forwards, before)."""
    block, open_, step, forwards, before = state
    size = plan.block_size
    hidden, kv = model.decode(tokens, positions, cache, attention=attention, block_size=size)
    if plan.token_shift:
        before = hidden[:, -size - 1] if tokens.shape[1] > size else before
        hidden = jnp.concatenate([before[:, None], hidden[:, -size:-1]], axis=1)
    choice = _choose(model, plan, hidden[:, -size:], knobs, forwards)
    commit = commit_mask(plan.strategy, choice.confidence, choice.entropy, open_, knobs, plan.tokens_per_step)
    block = jnp.where(commit, choice.token, block)
    step = jnp.where(commit, forwards[:, None], step)
    open_ = open_ & ~commit & (jnp.arange(size)[None, :] < _first_stop(knobs, block, step)[:, None])
    forwards = forwards + state[1].any(axis=1)
    return (block, open_, step, forwards, before), kv


def diffusion_step(graphdef, plan: SlotPlan, params, cache: KVCache, inputs: dict, knobs: dict):
    """Decodes one block in every slot. Returns (cache, {"block", "step", "forwards"}).

    inputs: tokens/positions [S, W] (the chunk; its last B are the block: prompt tokens or [MASK]),
    write_slot [S, W - B], start/length [S] (cache valid before the write), length_after [S], open [S, B],
    rope_length [S]. step: the row's forward (0-based, relative to its request) that committed each
    position, -1 for positions not generated.
    """
    TRACES["serve_diffusion"] += 1
    model = nnx.merge(graphdef, params)
    size = plan.block_size
    rope = inputs["rope_length"] if cache.rope_length is not None else None
    cache = cache.replace(start=inputs["start"], length=inputs["length"], rope_length=rope)
    tokens, positions = inputs["tokens"], inputs["positions"]
    batch = tokens.shape[0]
    before = jnp.zeros((batch, model.config.hidden_size), model.config.compute_dtype)
    state = (tokens[:, -size:], inputs["open"], jnp.full((batch, size), -1, jnp.int32), knobs["forwards"], before)
    state, (keys, values) = _denoise(model, plan, knobs, state, tokens, positions, cache, "block")
    clean = tokens.shape[1] - size
    cache = write_rows(cache, keys[:, :, :clean], values[:, :, :clean], inputs["write_slot"])
    cache = cache.replace(length=inputs["length_after"])
    block_positions = positions[:, -size:]

    def cond(carry):
        return carry[0][1].any() & (carry[1] < size - 1)

    def body(carry):
        state, i = carry
        state, _ = _denoise(model, plan, knobs, state, state[0], block_positions, cache, "bidirectional")
        return state, i + 1

    state, _ = jax.lax.while_loop(cond, body, (state, jnp.int32(0)))
    block, _, step, forwards, _ = state
    return cache, {"block": block, "step": step, "forwards": forwards}


def ar_step(graphdef, plan: SlotPlan, params, cache: KVCache, inputs: dict, knobs: dict):
    """One causal token in every slot: the chunk (a new slot's whole prompt, else its last token) is run
    against the slot's cache, written at write_slot [S, W], and its last position chooses the token."""
    TRACES["serve_ar"] += 1
    model = nnx.merge(graphdef, params)
    rope = inputs["rope_length"] if cache.rope_length is not None else None
    cache = cache.replace(start=inputs["start"], length=inputs["length"], rope_length=rope)
    hidden, (keys, values) = model.decode(inputs["tokens"], inputs["positions"], cache, attention="causal")
    cache = write_rows(cache, keys, values, inputs["write_slot"]).replace(length=inputs["length_after"])
    choice = _choose(model, plan, hidden[:, -1:], knobs, knobs["forwards"])
    return cache, {"block": choice.token, "step": jnp.where(inputs["open"], knobs["forwards"][:, None], -1),
                   "forwards": knobs["forwards"] + inputs["open"][:, 0]}


diffusion_step_jit = jax.jit(diffusion_step, static_argnums=(0, 1), donate_argnums=(3,))
ar_step_jit = jax.jit(ar_step, static_argnums=(0, 1), donate_argnums=(3,))
