"""Lossless speculative decoding: the dLM drafts a block, an AR verifier keeps what it would have said
(docs/METHOD.md, "Speculative decoding"), both in one compiled program.

Each iteration, per row:
1. The drafter (the dLM) fills the rest of its current block: `draft_steps` denoising steps against its
   exact prefix cache (the first runs [clean previous block ; block] block-causally and caches the clean
   half, as the block-diffusion sampler's first step does; the last step commits every position still
   masked), giving n = B - r draft tokens when r tokens of the block are already final.
2. The verifier runs [last final token ; n drafts] causally against its own exact cache in ONE forward.
   Greedy: the longest draft prefix equal to the verifier's argmax is accepted, plus the verifier's
   own token after it. Sampled (temperature > 0): draft i is kept with probability
   min(1, p_i(d_i) / q_i(d_i)); at the first rejection a token is drawn from norm(max(0, p - q)), and
   after n acceptances the extra token from p (Leviathan et al. 2023, Chen et al. 2023), so every
   emitted token is distributed as the verifier's own sampling would have drawn it.
3. Both caches advance exactly: the verifier caches the keys/values of the accepted prefix (a causal
   key depends only on the tokens before it, all final now); the drafter caches a block once all its
   tokens are final. Rows accept different counts, so each row writes at its own slot
   (`KVCache.write_rows`) and reads its own current block from the canvas.

Why the sampled drafter commits left to right: the acceptance ratio needs q_i = P(d_i | d_<i), the
drafter's true conditional. A step commits a contiguous run starting at the first open position,
chosen from the most likely token's probability (not the drawn one's), so which positions a step
commits depends only on tokens before them, and tokens drawn in one step are independent given the
context: q_i is then exactly the distribution d_i was drawn from. Greedy drafting may commit in any
order (the output is the verifier's argmax chain whatever the draft is).

The prompt rides along in the first iteration of both models (no prefill forward), as in the
block-diffusion and AR samplers.

Fused self-speculation (verifier="self", one-step drafts; `fuse_draft`): the verifier's forward also
drafts the next block. One pass over the weights (`Decoder.decode_pair`) runs [last final token ;
drafts] causally against the verifier cache AND [the current block, drafts taken as final ; the next
block, all [MASK]] block-causally against the drafter cache, the drafter's first step of the next
block assuming the whole draft is accepted. When it is (and the row goes on), the next iteration
starts from that draft, its first position replaced by the verifier's own token, with no drafter
forward of its own, and the drafter cache keeps the block's clean keys from the same pass; when it is
not, the pre-draft is dropped and the row drafts afresh. A fully accepted block then costs one forward
for B tokens. The output is unchanged (what is kept is still decided by the verifier alone); only the
forward count falls. A drafter forward runs in an iteration only if some row needs it, and counts
(row_forwards) only for the rows that needed it.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from efficient_dlm.errors import UserError
from efficient_dlm.models.cache import KVCache
from efficient_dlm.models.decoder import Chunk
from efficient_dlm.sample import layout as layout_lib
from efficient_dlm.sample.choice import choose_tokens, filtered_logits
from efficient_dlm.sample.diffusion import block_hidden, initial_canvas
from efficient_dlm.sample.program import TRACES, Plan, finish, is_stop, step_key
from efficient_dlm.sample.strategies import commit_mask


@dataclasses.dataclass(frozen=True)
class SpecPlan:
    """Static description of one speculative program (with the shapes, its jit key)."""

    draft: Plan  # the drafter's block-diffusion plan (its vocabulary cut to the verifier's ids)
    verify: Plan  # the verifier's causal plan: the ids and sampling strategy="ar" would use
    draft_steps: int  # denoising steps per draft; the last commits every position still masked
    self_verify: bool  # the verifier is the drafter's own weights in causal mode
    fused: bool = False  # self-verification with one-step drafts: the next draft rides in the verifier's forward


class _Draft(NamedTuple):
    tokens: jax.Array  # [batch, B] the current block: final tokens, then the draft
    open: jax.Array  # [batch, B] positions still masked
    logits: jax.Array | None  # [batch, B, V] drafter logits at commit (sampled mode only)
    before: jax.Array | None  # [batch, E] hidden state before the block (token shift only)


class _Carry(NamedTuple):
    draft_cache: KVCache
    verify_cache: KVCache
    canvas: jax.Array  # [batch, W_c] the drafter's canvas: final tokens, [MASK] after them
    out: jax.Array  # [batch, max_new + B + 1] generated tokens
    out_step: jax.Array  # [batch, max_new + B + 1] forward (0-based) that committed each token; -1 none
    generated: jax.Array  # [batch] tokens generated so far
    pending: jax.Array  # [batch] the last final token (the verifier's next input)
    done: jax.Array  # [batch]
    forwards: jax.Array  # scalar: forwards run (drafter + verifier), also the RNG step index
    draft_forwards: jax.Array  # scalar
    verify_forwards: jax.Array  # scalar
    row_forwards: jax.Array  # [batch] forwards in which the row was still generating
    row_verify: jax.Array  # [batch] verifier forwards in which the row was still generating
    proposed: jax.Array  # [batch] draft tokens offered to the verifier (within max_new)
    accepted: jax.Array  # [batch] draft tokens it accepted
    pre: _Draft | None = None  # fused: the draft of the row's current block made by the last forward
    pre_valid: jax.Array | None = None  # fused: [batch] that draft applies (the last draft was fully accepted)


def _start_draft(plan: SpecPlan, drafter, tokens, open_, before=None) -> _Draft:
    """A draft before its first commit: the block's tokens and open positions, zero drafter logits (sampled
    mode) and the state before the block (token shift: `before`, or zeros until a forward gives it)."""
    batch, size = tokens.shape
    dplan, cfg = plan.draft, drafter.config
    logits = jnp.zeros((batch, size, dplan.vocab_size), jnp.float32) if _sampled(plan) else None
    if dplan.token_shift and before is None:
        before = jnp.zeros((batch, cfg.hidden_size), cfg.compute_dtype)
    return _Draft(tokens, open_, logits, before if dplan.token_shift else None)


class _Context(NamedTuple):
    drafter: nnx.Module
    verifier: nnx.Module
    plan: SpecPlan
    knobs: dict
    positions: jax.Array  # [batch, W_c] position of each canvas slot
    first: jax.Array  # [batch] canvas index of the first generated token
    prompt_lengths: jax.Array  # [batch]
    verify_start: jax.Array  # [batch] first valid verifier cache slot (slot = start + position)
    prefix_len: int  # D0: drafter cache slots of the prompt's full blocks


def _row_slice(x: jax.Array, starts: jax.Array, width: int) -> jax.Array:
    """x[b, starts[b] : starts[b] + width] for every row b."""
    return jax.vmap(lambda row, s: jax.lax.dynamic_slice_in_dim(row, s, width, axis=0))(x, starts)


def _row_update(x: jax.Array, starts: jax.Array, window: jax.Array, keep: jax.Array) -> jax.Array:
    """x with x[b, starts[b] + j] = window[b, j] where keep[b, j]."""
    width = window.shape[1]
    merged = jnp.where(keep, window, _row_slice(x, starts, width))
    return jax.vmap(lambda row, w, s: jax.lax.dynamic_update_slice_in_dim(row, w, s, axis=0))(x, merged, starts)


def _leading(ok: jax.Array) -> jax.Array:
    """[batch] length of the leading run of True."""
    return jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1)


def _sampled(plan: SpecPlan) -> bool:
    return not plan.draft.sampling.greedy


def _draft_step(ctx: _Context, drf: _Draft, forwards, tokens, positions, cache, attention: str, last) -> tuple:
    """One drafter forward on a chunk ending with the block, then one commit. Returns (draft, kv)."""
    plan = ctx.plan.draft
    hidden, kv = ctx.drafter.decode(tokens, positions, cache, attention=attention, block_size=plan.block_size)
    hidden, before = block_hidden(plan, hidden, drf.before)
    return draft_commit(ctx, drf._replace(before=before), forwards, hidden, last), kv


def draft_commit(ctx: _Context, drf: _Draft, forwards, hidden, last, key=None) -> _Draft:
    """The commit of one draft step from the hidden states predicting the block [batch, B, E] (`last`: commit
    every position still open; `key`: the sampling key, default the forward's). The serving engine
    (serve/speculative.py) runs it per row too."""
    plan = ctx.plan.draft
    sampled = _sampled(ctx.plan)
    key = step_key(ctx.knobs, forwards) if key is None else key
    choice = choose_tokens(ctx.drafter, hidden, key, plan.sampling, ctx.knobs, plan.allowed(), sampled)
    if sampled:  # left to right, chosen from the most likely token's probability (module docstring)
        z = filtered_logits(choice.logits, plan.sampling, ctx.knobs, plan.allowed())
        best = jnp.exp(jnp.max(z, axis=-1) - jax.nn.logsumexp(z, axis=-1))
        run = jnp.cumprod((~drf.open | (best >= ctx.knobs["threshold"])).astype(jnp.int32), axis=1).astype(bool)
        first_open = drf.open & (jnp.cumsum(drf.open, axis=1) == 1)
        commit = drf.open & (run | first_open)
    else:
        commit = commit_mask("threshold", choice.confidence, choice.entropy, drf.open, ctx.knobs)
    commit = jnp.where(last, drf.open, commit)
    logits = None if drf.logits is None else jnp.where(commit[..., None], choice.logits, drf.logits)
    return _Draft(jnp.where(commit, choice.token, drf.tokens), drf.open & ~commit, logits, drf.before)


def _draft(ctx: _Context, carry: _Carry, cur, offset, live, prefix) -> tuple[_Draft, KVCache, jax.Array]:
    """The drafter's part of an iteration: caches the clean previous block and drafts the current one
    (canvas block `cur`, of which `offset` tokens are final). Returns (draft, drafter cache, forwards)."""
    plan = ctx.plan.draft
    size = plan.block_size
    chunk = _row_slice(carry.canvas, (cur - 1) * size, 2 * size)
    chunk_positions = _row_slice(ctx.positions, (cur - 1) * size, 2 * size)
    index = cur[:, None] * size + jnp.arange(size)[None, :]
    open_ = (index >= (cur * size + offset)[:, None]) & live[:, None]
    drf = _start_draft(ctx.plan, ctx.drafter, chunk[:, size:], open_)
    width = 0
    if prefix is not None:  # the prompt's full blocks before canvas block 0 (first iteration only)
        width = prefix[0].shape[1]
        chunk, chunk_positions = (jnp.concatenate(pair, axis=1) for pair in zip(prefix, (chunk, chunk_positions)))
    cached = ctx.prefix_len - size + (cur - 1) * size  # drafter cache slots before the clean block
    cache = carry.draft_cache.replace(length=cached - width)
    drf, (keys, values) = _draft_step(ctx, drf, carry.forwards, chunk, chunk_positions, cache, "block",
                                      ctx.plan.draft_steps == 1)
    clean = chunk.shape[1] - size
    cache = cache.write_rows(keys[:, :, :clean], values[:, :, :clean], cached - width).replace(length=cached + size)
    block_positions = chunk_positions[:, -size:]

    def more(state):
        drf, step = state
        return drf.open.any() & (step < ctx.plan.draft_steps)

    def body(state):
        drf, step = state
        drf, _ = _draft_step(ctx, drf, carry.forwards + step, drf.tokens, block_positions, cache, "bidirectional",
                             step == ctx.plan.draft_steps - 1)
        return drf, step + 1

    drf, steps = jax.lax.while_loop(more, body, (drf, jnp.int32(1)))
    return drf, cache, steps


def _reused(ctx: _Context, carry: _Carry, cur) -> _Draft:
    """Fused: the pre-draft of canvas block `cur`, its first position (the verifier's token, final) in place."""
    size = ctx.plan.draft.block_size
    first = _row_slice(carry.canvas, cur * size, 1)
    tokens = jnp.concatenate([first, carry.pre.tokens[:, 1:]], axis=1)
    return carry.pre._replace(tokens=tokens, open=jnp.zeros_like(carry.pre.open))


def _draft_fused(ctx: _Context, carry: _Carry, cur, offset, live) -> tuple[_Draft, KVCache, jax.Array, jax.Array]:
    """Fused, after the first iteration: rows whose pre-draft applies reuse it; the others draft afresh, in
    one drafter forward that runs only if some live row needs it. Returns (draft, cache, forwards, need)."""
    reused = _reused(ctx, carry, cur)
    need = live & ~carry.pre_valid

    def fresh(_):
        drf, cache, steps = _draft(ctx, carry, cur, offset, live, None)
        keep = lambda a, b: jnp.where(carry.pre_valid.reshape((-1,) + (1,) * (a.ndim - 1)), a, b)  # noqa: E731
        return jax.tree.map(keep, reused, drf), cache, steps

    def skip(_):
        return reused, carry.draft_cache, jnp.int32(0)

    drf, cache, steps = jax.lax.cond(need.any(), fresh, skip, None)
    return drf, cache, steps, need


def _pre_draft(ctx: _Context, hidden, key, live) -> _Draft:
    """Fused: the drafter's one-step draft of the next block from the drafter half of the fused forward
    ([current block ; next block] hidden states), as `_draft` would make it once the block is final."""
    plan = ctx.plan.draft
    batch, size = hidden.shape[0], plan.block_size
    block, before = block_hidden(plan, hidden, None)
    empty = _start_draft(ctx.plan, ctx.drafter, jnp.full((batch, size), plan.mask_id, jnp.int32),
                         jnp.broadcast_to(live[:, None], (batch, size)), before)
    return draft_commit(ctx, empty, None, block, True, key=key)


def accept(ctx: _Context, drafts, q_logits, n_drafts, hidden, key) -> tuple[jax.Array, jax.Array]:
    """(tokens [batch, B + 1], count [batch]): the accepted drafts followed by the verifier's own token."""
    plan = ctx.plan.verify
    size = drafts.shape[1]
    valid = jnp.arange(size)[None, :] < n_drafts[:, None]
    if not _sampled(ctx.plan):
        choice = choose_tokens(ctx.verifier, hidden, key, plan.sampling, ctx.knobs, plan.allowed(), False)
        accepted = _leading(valid & (drafts == choice.token[:, :size]))
        return choice.token, accepted
    vocab = plan.vocab_size
    log_p = jax.nn.log_softmax(filtered_logits(ctx.verifier.logits(hidden), plan.sampling, ctx.knobs, plan.allowed()), axis=-1)
    q = jax.nn.softmax(filtered_logits(q_logits, ctx.plan.draft.sampling, ctx.knobs, ctx.plan.draft.allowed()), axis=-1)
    q = q[..., :vocab]  # the drafter's vocabulary may carry extra ids ([MASK] appended); they have no mass
    p = jnp.exp(log_p)
    p_draft = jnp.take_along_axis(p[:, :size], drafts[..., None], axis=-1)[..., 0]
    q_draft = jnp.take_along_axis(q, drafts[..., None], axis=-1)[..., 0]
    accept_key, bonus_key = jax.random.split(key)
    u = jax.random.uniform(accept_key, q_draft.shape)
    accepted = _leading(valid & (u * q_draft < p_draft))
    p_at = jnp.take_along_axis(p, accepted[:, None, None], axis=1)[:, 0]  # verifier's distribution after the run
    q_at = jnp.take_along_axis(jnp.pad(q, ((0, 0), (0, 1), (0, 0))), accepted[:, None, None], axis=1)[:, 0]
    residual = jnp.maximum(p_at - q_at, 0.0)
    rejected = (accepted < n_drafts)[:, None] & (residual.sum(-1, keepdims=True) > 0)
    bonus_probs = jnp.where(rejected, residual, p_at)
    bonus = jax.random.categorical(bonus_key, jnp.log(bonus_probs), axis=-1).astype(jnp.int32)
    tokens = jnp.concatenate([drafts, jnp.zeros_like(drafts[:, :1])], axis=1)
    tokens = jnp.where(jnp.arange(size + 1)[None, :] == accepted[:, None], bonus[:, None], tokens)
    return tokens, accepted


def _iterate(ctx: _Context, carry: _Carry, prefixes=None) -> _Carry:
    """One draft + verify iteration for every row (prefixes: the prompts' leading parts, first iteration)."""
    size = ctx.plan.draft.block_size
    max_new = ctx.plan.draft.max_new_tokens
    live = ~carry.done
    position = ctx.prompt_lengths + carry.generated  # of the next token
    canvas_index = ctx.first + carry.generated
    cur, offset = canvas_index // size, canvas_index % size
    fused = ctx.plan.fused
    if fused and prefixes is None:
        drf, draft_cache, steps, need = _draft_fused(ctx, carry, cur, offset, live)
    else:
        drf, draft_cache, steps = _draft(ctx, carry, cur, offset, live, None if prefixes is None else prefixes[0])
        need = live
    # The drafts: the block's positions from `offset` on, moved to the front.
    gather = jnp.minimum(offset[:, None] + jnp.arange(size)[None, :], size - 1)
    drafts = jnp.take_along_axis(drf.tokens, gather, axis=1)
    q_logits = None if drf.logits is None else jnp.take_along_axis(drf.logits, gather[..., None], axis=1)
    n_drafts = size - offset
    verify_forward = carry.forwards + steps
    tokens = jnp.concatenate([carry.pending[:, None], drafts], axis=1)
    positions = position[:, None] - 1 + jnp.arange(size + 1)[None, :]
    width = 0
    if prefixes is not None:
        width = prefixes[1][0].shape[1]
        tokens, positions = (jnp.concatenate(pair, axis=1) for pair in zip(prefixes[1], (tokens, positions)))
    offsets = ctx.verify_start + position - 1 - width
    cache = carry.verify_cache.replace(length=offsets)
    verify_key = step_key(ctx.knobs, verify_forward)
    if fused:  # the next block's draft rides along: [block, drafts taken as final ; next block] (module docstring)
        block_slot = ctx.prefix_len - size + cur * size  # drafter cache slot of canvas block `cur`
        draft_tokens = jnp.concatenate([drf.tokens, jnp.full_like(drf.tokens, ctx.plan.draft.mask_id)], axis=1)
        draft_chunk = Chunk(draft_tokens, _row_slice(ctx.positions, cur * size, 2 * size),
                            draft_cache.replace(length=block_slot), "block", size)
        (hidden, (keys, values)), (draft_hidden, draft_kv) = ctx.drafter.decode_pair(
            Chunk(tokens, positions, cache, "causal"), draft_chunk)
    else:
        hidden, (keys, values) = ctx.verifier.decode(tokens, positions, cache, attention="causal")
    cache = cache.write_rows(keys, values, offsets)
    new, accepted = accept(ctx, drafts, q_logits, n_drafts, hidden[:, -(size + 1):], verify_key)
    # Keep the accepted run and the verifier's token, up to the first stop and within max_new_tokens.
    count = jnp.minimum(accepted + 1, max_new - carry.generated)
    slot = jnp.arange(size + 1)[None, :]
    stops = (slot < count[:, None]) & is_stop(ctx.knobs, new)
    count = jnp.where(stops.any(axis=1), jnp.argmax(stops, axis=1) + 1, count)
    count = jnp.where(live, count, 0)
    keep = slot < count[:, None]
    generated = carry.generated + count
    last = jnp.take_along_axis(new, jnp.maximum(count - 1, 0)[:, None], axis=1)[:, 0]
    done = carry.done | stops.any(axis=1) | (generated >= max_new)
    fused_state = {}
    if fused:  # keep the pre-draft and the block's clean keys where the whole draft was accepted
        full = live & ~done & (accepted == n_drafts) & (count == n_drafts + 1)
        clean = jax.tree.map(lambda a: a[:, :, :size], draft_kv)
        draft_cache = draft_cache.write_rows(*clean, block_slot)
        draft_cache = draft_cache.replace(length=jnp.where(full, block_slot + size, draft_cache.length))
        pre = _pre_draft(ctx, draft_hidden, jax.random.fold_in(verify_key, 1), live)
        fused_state = dict(pre=pre, pre_valid=full)
    return carry._replace(
        **fused_state,
        draft_cache=draft_cache,
        verify_cache=cache.replace(length=offsets + width + count),
        canvas=_row_update(carry.canvas, canvas_index, new, keep),
        out=_row_update(carry.out, carry.generated, new, keep),
        out_step=_row_update(carry.out_step, carry.generated, jnp.broadcast_to(verify_forward, new.shape), keep),
        generated=generated,
        pending=jnp.where(count > 0, last, carry.pending),
        done=done,
        forwards=verify_forward + 1,
        draft_forwards=carry.draft_forwards + steps,
        verify_forwards=carry.verify_forwards + 1,
        row_forwards=carry.row_forwards + need * steps + live,
        row_verify=carry.row_verify + live,
        proposed=carry.proposed + jnp.where(live, jnp.minimum(n_drafts, max_new - carry.generated), 0),
        accepted=carry.accepted + jnp.where(live, jnp.minimum(accepted, max_new - carry.generated), 0),
    )


def speculative_program(draft_graphdef, verify_graphdef, plan: SpecPlan, draft_state, verify_state, inputs: dict,
                        knobs: dict) -> dict:
    """The whole speculative generation for one batch (jit with both graphdefs and the plan static)."""
    TRACES["speculative"] += 1
    drafter = nnx.merge(draft_graphdef, draft_state)
    verifier = drafter if plan.self_verify else nnx.merge(verify_graphdef, verify_state)
    dplan, size, max_new = plan.draft, plan.draft.block_size, plan.draft.max_new_tokens
    batch, prefix_len = inputs["prefix"].shape
    width = inputs["prompt"].shape[1]
    canvas, positions = initial_canvas(dplan, inputs, dplan.num_blocks + 3)  # room for windows past the end
    ctx = _Context(drafter, verifier, plan, knobs, positions, inputs["remainder"] + size, inputs["lengths"],
                   inputs["start"], prefix_len)
    zeros = jnp.zeros((batch,), jnp.int32)
    out = jnp.full((batch, max_new + size + 1), plan.verify.pad_id, jnp.int32)
    final_length = inputs["lengths"] + max_new  # fixes dynamic RoPE's scale for the whole generation
    carry = _Carry(
        KVCache.empty(drafter.config, batch, prefix_len + (dplan.num_blocks + 1) * size, rope_length=final_length)
        .replace(start=inputs["shift"]),
        KVCache.empty(verifier.config, batch, width + max_new + size, rope_length=final_length).replace(start=inputs["start"]),
        canvas, out, jnp.full_like(out, -1), zeros, inputs["prompt"][:, -1], zeros.astype(bool),
        jnp.int32(0), jnp.int32(0), jnp.int32(0), zeros, zeros, zeros, zeros,
    )
    if plan.fused:  # no pre-draft yet: the first iteration drafts (an empty draft of the right structure)
        empty = jnp.zeros((batch, size), jnp.int32)
        carry = carry._replace(pre=_start_draft(plan, drafter, empty, empty.astype(bool)), pre_valid=zeros.astype(bool))
    draft_prefix = (inputs["prefix"][:, : prefix_len - size], inputs["prefix_positions"][:, : prefix_len - size])
    # Left padding rides along in the first chunk: its position must lie beyond every query of that chunk
    # (the layout's P is only beyond the prompt's), so causal attention hides it from the drafts too.
    padding = jnp.arange(width)[None, :] < inputs["start"][:, None]
    verify_positions = jnp.where(padding, width + size, inputs["positions"])
    verify_prefix = (inputs["prompt"][:, :-1], verify_positions[:, :-1])
    carry = _iterate(ctx, carry, (draft_prefix if prefix_len > size else None, verify_prefix))

    def running(carry: _Carry):
        return ~carry.done.all()

    carry = jax.lax.while_loop(running, functools.partial(_iterate, ctx), carry)
    result = finish(plan.verify, knobs, carry.out, carry.out_step, zeros)
    result.update(
        forwards=carry.forwards, row_forwards=carry.row_forwards, blocks=carry.verify_forwards,
        draft_forwards=carry.draft_forwards, verifier_forwards=carry.verify_forwards,
        row_verifier_forwards=carry.row_verify, proposed=carry.proposed, accepted=carry.accepted,
    )
    return result


_speculative_jit = jax.jit(speculative_program, static_argnums=(0, 1, 2))


def check_verifier(model, verifier, draft_steps) -> None:
    """Rejects a verifier that cannot check this drafter's tokens, and a bad draft_steps (one line each)."""
    if isinstance(draft_steps, bool) or not isinstance(draft_steps, (int, np.integer)) or draft_steps < 1:
        raise UserError(f"draft_steps must be an integer >= 1, got {draft_steps!r}")
    if verifier is None:
        raise UserError("strategy='speculative' needs verifier= an AR model (or 'self': the dLM's weights in causal mode)")
    if isinstance(verifier, str) and verifier != "self":
        raise UserError(f"verifier must be a model or 'self', got {verifier!r}")
    if not isinstance(verifier, str) and not hasattr(verifier, "decode"):
        raise UserError(f"verifier must be a model or 'self', got a {type(verifier).__name__}")


def spec_plan(model, verifier, plan: Plan, *, block_size: int, num_blocks: int, draft_steps: int, token_shift: bool,
              valid_vocab_size: int | None, fuse_draft: bool = False) -> SpecPlan:
    """The drafter's and the verifier's plans from the call's `plan` (verifier: a model or "self"). fuse_draft:
    fused self-speculation where it applies (self-verification, draft_steps == 1; module docstring)."""
    self_verify = isinstance(verifier, str)
    verifier = model if self_verify else verifier
    vcfg, dcfg = verifier.config, model.config
    verify_pad = next((t for t in (vcfg.pad_token_id, vcfg.eos_token_id) if t is not None), 0)
    # What strategy="ar" on the verifier would choose from: its own [MASK] and vocabulary padding banned.
    verify_spec = getattr(verifier, "spec", None)
    verify = dataclasses.replace(
        plan, strategy="ar", pad_id=int(verify_pad), vocab_size=vcfg.vocab_size,
        banned_ids=() if vcfg.mask_token_id is None else (vcfg.mask_token_id,),
        valid_vocab_size=valid_vocab_size if self_verify else getattr(verify_spec, "valid_vocab_size", None),
    )
    limit = min(vcfg.vocab_size, valid_vocab_size or vcfg.vocab_size)  # the drafter drafts only ids the verifier knows
    draft = dataclasses.replace(
        plan, block_size=block_size, num_blocks=num_blocks, mask_id=dcfg.mask_token_id, token_shift=token_shift,
        valid_vocab_size=limit,
    )
    return SpecPlan(draft, verify, int(draft_steps), self_verify, bool(fuse_draft and self_verify and draft_steps == 1))


def prepare_speculative(model, verifier, rows, plan: Plan, *, block_size: int, draft_steps: int, token_shift: bool,
                        prompt_bucket: int | None, valid_vocab_size: int | None, fuse_draft: bool = True):
    """(jitted program, its arguments without the knobs, prompt lengths, shapes) of one speculative call."""
    spec = spec_plan(model, verifier, plan, block_size=block_size, num_blocks=1, draft_steps=draft_steps,
                     token_shift=token_shift, valid_vocab_size=valid_vocab_size, fuse_draft=fuse_draft)
    self_verify = spec.self_verify
    verifier = model if self_verify else verifier
    vcfg, dcfg = verifier.config, model.config
    lay = layout_lib.block_layout(
        rows, block_size=block_size, max_new_tokens=plan.max_new_tokens, mask_id=dcfg.mask_token_id,
        pad_id=plan.pad_id, max_positions=layout_lib.position_limit(dcfg), capacity=prompt_bucket,
    )
    ar = layout_lib.ar_layout(rows, max_new_tokens=plan.max_new_tokens, pad_id=spec.verify.pad_id,
                              max_positions=layout_lib.position_limit(vcfg), capacity=prompt_bucket)
    spec = dataclasses.replace(spec, draft=dataclasses.replace(spec.draft, num_blocks=lay.num_blocks))
    draft_graphdef, draft_state = nnx.split(model)
    verify_graphdef, verify_state = (None, None) if self_verify else nnx.split(verifier)
    inputs = lay.arrays() | ar.arrays()  # host numpy: jit transfers them (api.prepare)
    shapes = {"prompt_bucket": lay.prefix_len, "verifier_prompt_bucket": ar.prompt_len, "block_size": block_size,
              "cache_size": lay.cache_size, "draft_steps": int(draft_steps), "fused": spec.fused}
    args = (draft_graphdef, verify_graphdef, spec, draft_state, verify_state, inputs)
    return _speculative_jit, args, lay.prompt_lengths, shapes
