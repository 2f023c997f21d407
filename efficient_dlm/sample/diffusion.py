"""The block-diffusion sampler as one compiled program (docs/METHOD.md section 6).

Outer loop over blocks (a lax.while_loop that stops when every row is done), inner loop over
denoising steps (lax.scan for fixed-step strategies, a lax.while_loop bounded by the block size for
the others). Each step runs the block against the exact prefix KV cache (`Decoder.decode`) and
commits positions chosen by the strategy.

Why the first step of a block is special: once block k-1 is final, its clean keys and values must be
computed (bidirectionally inside the block, against the prefix) before they can be cached. Instead of
a separate forward, the first step of block k runs the chunk [clean block k-1 ; block k] with
block-causal attention: the clean half gets exactly the keys/values it had in training (x_0 stream),
block k sees the prefix, the clean block and itself (x_t stream), and the clean half's keys/values
are then written into the cache. For block 0 the clean block is the prompt's last full block (padding
if the prompt is shorter than B), and the prompt's earlier full blocks ride along in the same
block-causal forward pass (the prefill is block 0's first step; block 0 runs before the loop because
its first chunk is wider). So no forward pass is spent on cache writes alone: a prompt costs no extra
forward, as in AR decoding, where the prefill yields the first token. With token shift
(position i predicted from the hidden state at i - 1, as in training), the block's first position
reads the clean block's last hidden state, which the first step computes anyway.

The token canvas is [prompt's last full block ; decoded blocks], so "the clean block before block k"
is always canvas block k. The cache layout (layout.py) gives every row's block k the same slots, so
one write offset serves the batch while rows keep their own positions. Rows that are done (stop token
committed, or max_new_tokens reached) stay in the batch with nothing open and commit nothing.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from efficient_dlm.models.cache import KVCache
from efficient_dlm.sample.choice import choose_tokens
from efficient_dlm.sample.program import TRACES, Plan, finish, is_stop, step_key, stream
from efficient_dlm.sample.strategies import FIXED_STEPS, commit_mask


class Block(NamedTuple):
    tokens: jax.Array  # [batch, B]
    open: jax.Array  # [batch, B] masked positions the row may still commit
    step: jax.Array  # [batch, B] global step at which the position was committed; -1: not generated
    logits: jax.Array | None  # [batch, B, V] raw logits at commit time (record_logits only)
    before: jax.Array | None  # [batch, E] hidden state of the position before the block (token_shift only)


class Counters(NamedTuple):
    forwards: jax.Array  # scalar: forward passes run by the program (also the RNG step index)
    row_forwards: jax.Array  # [batch]: forward passes in which the row had positions to commit


class Carry(NamedTuple):
    cache: KVCache
    canvas: jax.Array  # [batch, (blocks + 1) * B]: the prompt's last full block, then the decoded blocks
    canvas_step: jax.Array  # [batch, (blocks + 1) * B] global step of each commit; -1: not generated
    canvas_logits: jax.Array | None
    done: jax.Array  # [batch] bool
    counters: Counters
    block: jax.Array  # scalar: next block to decode


class _Context(NamedTuple):
    model: nnx.Module
    plan: Plan
    knobs: dict
    positions: jax.Array  # [batch, canvas width] position of every canvas slot
    first: jax.Array  # [batch] canvas index of the first generated token (B + r_b)
    prefix_len: int  # D0: cache slots of the prompt's full blocks


def _first_stop(knobs: dict, tokens, step) -> jax.Array:
    """[batch] index of the first generated stop token in the block (block size when there is none)."""
    stopped = (step >= 0) & is_stop(knobs, tokens)
    return jnp.min(jnp.where(stopped, jnp.arange(tokens.shape[1])[None, :], tokens.shape[1]), axis=1)


def block_hidden(plan: Plan, hidden: jax.Array, before: jax.Array | None) -> tuple[jax.Array, jax.Array | None]:
    """(hidden states predicting the block's positions [batch, B, E], state before the block) from the hidden
    states of a chunk ending with the block. With token shift position i is predicted from the hidden
    state at i - 1, as in training; the block's first position reads the state before the block, which a
    chunk wider than the block computes and a block-only chunk takes from `before`."""
    size = plan.block_size
    if not plan.token_shift:
        return hidden[:, -size:], before
    if hidden.shape[1] > size:
        before = hidden[:, -size - 1]
    return jnp.concatenate([before[:, None], hidden[:, -size:-1]], axis=1), before


def _denoise(ctx: _Context, blk: Block, counters: Counters, tokens, positions, cache, attention: str):
    """One forward pass on a chunk ending with the block, then one commit. Returns (block, counters, kv)."""
    plan = ctx.plan
    size = plan.block_size
    hidden, kv = ctx.model.decode(tokens, positions, cache, attention=attention, block_size=size)
    hidden, before = block_hidden(plan, hidden, blk.before)
    blk = blk._replace(before=before)
    key = step_key(ctx.knobs, counters.forwards)
    choice = choose_tokens(ctx.model, hidden, key, plan.sampling, ctx.knobs, plan.allowed(), plan.record_logits)
    commit = commit_mask(plan.strategy, choice.confidence, choice.entropy, blk.open, ctx.knobs, plan.tokens_per_step)
    new_tokens = jnp.where(commit, choice.token, blk.tokens)
    step = jnp.where(commit, counters.forwards, blk.step)
    logits = None if blk.logits is None else jnp.where(commit[..., None], choice.logits, blk.logits)
    open_ = blk.open & ~commit & (jnp.arange(size)[None, :] < _first_stop(ctx.knobs, new_tokens, step)[:, None])
    counters = Counters(counters.forwards + 1, counters.row_forwards + blk.open.any(axis=1))
    return Block(new_tokens, open_, step, logits, blk.before), counters, kv


def _remaining_steps(ctx: _Context, blk: Block, counters: Counters, cache: KVCache, positions):
    """Denoising steps after the first, until the block has no open position."""
    size = ctx.plan.block_size

    def step(state):
        blk, counters = state
        blk, counters, _ = _denoise(ctx, blk, counters, blk.tokens, positions, cache, "bidirectional")
        return blk, counters

    if ctx.plan.strategy in FIXED_STEPS:
        steps = -(-size // ctx.plan.tokens_per_step) - 1

        def scan_body(state, _):
            return jax.lax.cond(state[0].open.any(), step, lambda s: s, state), None

        return jax.lax.scan(scan_body, (blk, counters), None, length=steps)[0]

    def cond(state):
        return state[0].open.any() & (state[2] < size - 1)

    def body(state):
        return (*step(state[:2]), state[2] + 1)

    return jax.lax.while_loop(cond, body, (blk, counters, jnp.int32(0)))[:2]


def _decode_block(ctx: _Context, carry: Carry, prefix: tuple[jax.Array, jax.Array] | None = None) -> Carry:
    """Decodes block k = carry.block (canvas block k + 1), caching clean canvas block k in its first step.

    prefix: (tokens, positions) of the prompt's full blocks before canvas block 0, prepended to block
    0's first chunk and cached with it (block 0 only).
    """
    plan = ctx.plan
    size, k = plan.block_size, carry.block
    batch = carry.canvas.shape[0]
    index = (k + 1) * size + jnp.arange(size)[None, :]  # canvas index of the block's positions
    generable = (index >= ctx.first[:, None]) & (index < ctx.first[:, None] + plan.max_new_tokens)
    blk = Block(
        jax.lax.dynamic_slice(carry.canvas, (0, (k + 1) * size), (batch, size)),
        generable & ~carry.done[:, None],
        jnp.full((batch, size), -1, jnp.int32),
        None if carry.canvas_logits is None else jnp.zeros((batch, size, plan.vocab_size), jnp.float32),
        jnp.zeros((batch, ctx.model.config.hidden_size), ctx.model.config.compute_dtype) if plan.token_shift else None,
    )
    chunk = jax.lax.dynamic_slice(carry.canvas, (0, k * size), (batch, 2 * size)).at[:, size:].set(blk.tokens)
    chunk_positions = jax.lax.dynamic_slice(ctx.positions, (0, k * size), (batch, 2 * size))
    if prefix is not None:
        chunk, chunk_positions = (jnp.concatenate(pair, axis=1) for pair in zip(prefix, (chunk, chunk_positions)))
    blk, counters, (keys, values) = _denoise(ctx, blk, carry.counters, chunk, chunk_positions, carry.cache, "block")
    clean = chunk.shape[1] - size  # tokens before the block, all final: cached now
    offset = ctx.prefix_len + k * size - clean
    cache = carry.cache.write(keys[:, :, :clean], values[:, :, :clean], offset)
    cache = cache.replace(length=jnp.full((batch,), offset + clean, jnp.int32))
    blk, counters = _remaining_steps(ctx, blk, counters, cache, chunk_positions[:, -size:])

    first_stop = _first_stop(ctx.knobs, blk.tokens, blk.step)
    stream(plan, k, blk.tokens, (blk.step >= 0) & (jnp.arange(size)[None, :] <= first_stop[:, None]))
    logits = carry.canvas_logits
    if logits is not None:
        logits = jax.lax.dynamic_update_slice(logits, blk.logits, (0, (k + 1) * size, 0))
    return Carry(
        cache,
        jax.lax.dynamic_update_slice(carry.canvas, blk.tokens, (0, (k + 1) * size)),
        jax.lax.dynamic_update_slice(carry.canvas_step, blk.step, (0, (k + 1) * size)),
        logits,
        carry.done | (first_stop < size) | ((k + 2) * size >= ctx.first + plan.max_new_tokens),
        counters,
        k + 1,
    )


def initial_canvas(plan: Plan, inputs: dict, blocks: int) -> tuple[jax.Array, jax.Array]:
    """The token canvas [batch, (blocks + 1) * B] before decoding (the prompt's last full block, block 0 with
    the prompt's remaining tokens, then [MASK]) and the position of each of its slots."""
    size = plan.block_size
    batch, prefix_len = inputs["prefix"].shape
    canvas = jnp.full((batch, (blocks + 1) * size), plan.mask_id, jnp.int32)
    canvas = canvas.at[:, :size].set(inputs["prefix"][:, -size:]).at[:, size : 2 * size].set(inputs["first_block"])
    block_start = prefix_len - inputs["shift"]  # position of block 0: n_b * B
    positions = jnp.concatenate(
        [inputs["prefix_positions"][:, -size:], block_start[:, None] + jnp.arange(blocks * size)[None, :]], axis=1
    )
    return canvas, positions


def diffusion_program(graphdef, plan: Plan, state, inputs: dict, knobs: dict) -> dict:
    """The whole generation for one batch (jit with graphdef and plan static)."""
    TRACES["diffusion"] += 1
    model = nnx.merge(graphdef, state)
    size, blocks = plan.block_size, plan.num_blocks
    batch, prefix_len = inputs["prefix"].shape
    final_length = prefix_len - inputs["shift"] + inputs["remainder"] + plan.max_new_tokens  # prompt + max_new_tokens
    cache = KVCache.empty(model.config, batch, prefix_len + (blocks - 1) * size, rope_length=final_length)
    cache = cache.replace(start=inputs["shift"])
    canvas, positions = initial_canvas(plan, inputs, blocks)
    ctx = _Context(model, plan, knobs, positions, inputs["remainder"] + size, prefix_len)
    counters = Counters(jnp.int32(0), jnp.zeros((batch,), jnp.int32))
    canvas_logits = jnp.zeros((*canvas.shape, plan.vocab_size), jnp.float32) if plan.record_logits else None
    carry = Carry(
        cache, canvas, jnp.full_like(canvas, -1), canvas_logits, jnp.zeros((batch,), bool), counters, jnp.int32(0)
    )

    def more_blocks(carry: Carry):
        return (carry.block < blocks) & ~carry.done.all()

    width = prefix_len - size  # the prompt's full blocks before canvas block 0
    if width:
        carry = _decode_block(ctx, carry, (inputs["prefix"][:, :width], inputs["prefix_positions"][:, :width]))
    carry = jax.lax.while_loop(more_blocks, functools.partial(_decode_block, ctx), carry)
    out = finish(plan, knobs, carry.canvas, carry.canvas_step, ctx.first, carry.canvas_logits)
    out.update(forwards=carry.counters.forwards, row_forwards=carry.counters.row_forwards, blocks=carry.block)
    if plan.record_canvas:  # every committed token and its step, also those after a stop (the exact trajectory)
        out.update(canvas=carry.canvas, canvas_step=carry.canvas_step)
    return out
