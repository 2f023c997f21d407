"""Lossless speculative decoding in the serving engine: one draft + verify iteration per slot per call.

The whole-generation program (sample/speculative.py) loops draft + verify iterations over a fixed
batch; here the host owns each slot's progress and every call runs exactly one iteration for every
occupied slot, so requests join and leave between iterations as they do between blocks in the
block-diffusion engine (step_program.py). A slot holds two cache regions, the drafter's (the block
layout of slots.py) and the verifier's (the AR layout: the prompt right-aligned to end at A, generated
token t at A + t), and its progress is just its generated tokens: with p = n B + r prompt tokens and g
generated, the drafter works on decoded block k = (r + g) // B, of which (r + g) mod B tokens are final.

Per call and slot (the same arithmetic as one iteration of the whole-generation program for a batch of one):
1. Drafter: the chunk [clean block k - 1 ; block k (final tokens, then [MASK])] runs block-causally
   against the drafter region (for a newly admitted slot: [its prompt's full blocks ; block 0], the
   prefill riding along), the clean part's keys/values are written at host-given slots, and up to
   draft_steps - 1 bidirectional steps follow; the last commits every position still open.
2. Verifier: [last final token ; the B - offset drafts] (newly admitted: [prompt ; drafts]) in ONE
   causal forward against the verifier region, written at host-given slots; the accepted run plus the
   verifier's own token are kept (within max_tokens, cut after a stop token), and the verifier region's
   length covers what is final. The token choice, the draft commit and the acceptance rule are
   sample/speculative.py's own (`draft_commit`, `accept`).

Sampled rows (temperature > 0) draw with their own key, fold_in(key(seed), forwards) where forwards counts
the request's own forwards as its solo run counts them (every draft step it took part in, plus the
verifier's), each row as a batch of one (vmapped), so what a request draws does not depend on the others.
Greedy rows take the batched greedy path. Greedy output is token for token the verifier's own AR decoding
and `generate(..., strategy="speculative")` on that prompt alone (tests/test_serve_speculative.py).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from efficient_dlm.models.cache import KVCache
from efficient_dlm.sample.choice import Sampling
from efficient_dlm.sample.diffusion import block_hidden
from efficient_dlm.sample.layout import bucket
from efficient_dlm.sample.program import TRACES, is_stop, step_key
from efficient_dlm.sample.speculative import SpecPlan, _Context, _Draft, accept, draft_commit
from efficient_dlm.serve.slots import SlotGeometry, SlotState
from efficient_dlm.serve.step_program import write_rows


@dataclasses.dataclass(frozen=True)
class SpecSlotPlan:
    """Static description of a serving speculative program: the greedy plans and whether any row samples."""

    spec: SpecPlan  # greedy drafter and verifier plans (sample/speculative.py)
    sampled: bool

    def sampled_spec(self) -> SpecPlan:
        """The plans sampled rows use (top-p always on: its value is each row's knob; 1 keeps every id)."""
        sampling = Sampling(greedy=False, top_p=True)
        return dataclasses.replace(self.spec, draft=dataclasses.replace(self.spec.draft, sampling=sampling),
                                   verify=dataclasses.replace(self.spec.verify, sampling=sampling))


@dataclasses.dataclass(frozen=True)
class SpecGeometry:
    """Static sizes: the drafter regions follow `draft` (slots.py's block layout); the verifier regions
    hold A = max_prompt_tokens prompt slots, then max_new_tokens + B slots (a draft may run past the end)."""

    draft: SlotGeometry
    verify_pad: int

    @property
    def verify_prefix(self) -> int:
        return self.draft.max_prompt_tokens

    @property
    def verify_cache_size(self) -> int:
        return self.verify_prefix + self.draft.max_new_tokens + self.draft.block_size

    def widths(self, prompt_len: int | None) -> tuple[int, int]:
        """(drafter, verifier) chunk widths of a call whose longest admitted prompt has prompt_len tokens."""
        size = self.draft.block_size
        if prompt_len is None:
            return 2 * size, size + 1
        blocks = max(prompt_len // size, 1)
        drafter = (min(bucket(blocks), self.draft.prefix_len // size) + 1) * size
        return drafter, min(bucket(prompt_len, 16), self.verify_prefix) + size

    def all_widths(self) -> list[tuple[int, int]]:
        """Every width pair a call can have (the programs compiled by `Engine.warmup`)."""
        return [self.widths(None), *sorted({self.widths(p) for p in range(1, self.draft.max_prompt_tokens + 1)})]


def empty_inputs(geo: SpecGeometry, widths: tuple[int, int]) -> dict[str, np.ndarray]:
    d, size, s = geo.draft, geo.draft.block_size, geo.draft.slots
    wd, wv = widths
    zeros = lambda: np.zeros((s,), np.int32)  # noqa: E731
    return {
        "d_tokens": np.full((s, wd), d.pad_id, np.int32), "d_positions": np.full((s, wd), d.pad_position, np.int32),
        "d_write": np.full((s, wd - size), d.cache_size, np.int32), "d_start": zeros(), "d_length": zeros(),
        "d_length_after": zeros(), "open": np.zeros((s, size), bool), "offset": zeros(),
        "v_tokens": np.full((s, wv), geo.verify_pad, np.int32),
        "v_positions": np.full((s, wv), geo.verify_cache_size + d.pad_position, np.int32),
        "v_write": np.full((s, wv), geo.verify_cache_size, np.int32), "v_start": zeros(), "v_length": zeros(),
        "v_base": zeros(), "remaining": zeros(), "live": np.zeros((s,), bool), "rope_length": np.ones((s,), np.int32),
    }


def _fill(geo: SpecGeometry, inputs: dict, row: int, slot: SlotState) -> None:
    d = geo.draft
    size, d0, a = d.block_size, d.prefix_len, geo.verify_prefix
    p, g = len(slot.prompt), len(slot.generated)
    n, r = divmod(p, size)
    region = np.concatenate([slot.prompt[n * size:], np.asarray(slot.generated, np.int32)])  # from position nB on
    k, offset = divmod(r + g, size)
    wd, wv = inputs["d_tokens"].shape[1], inputs["v_tokens"].shape[1]
    tokens, positions, write = inputs["d_tokens"][row], inputs["d_positions"][row], inputs["d_write"][row]
    if g == 0:  # admission: the prompt's full blocks ride along in the first draft step
        whole = n * size
        tokens[wd - size - whole: wd - size] = slot.prompt[:whole]
        positions[wd - size - whole: wd - size] = np.arange(whole)
        write[wd - size - whole:] = d0 - whole + np.arange(whole)
        inputs["d_length"][row] = 0
    else:  # the clean block before block k: decoded block k - 1, or for k = 0 the prompt's last full block
        clean = region[(k - 1) * size: k * size] if k else (slot.prompt[(n - 1) * size: n * size] if n else None)
        if clean is not None:
            tokens[wd - 2 * size: wd - size] = clean
            positions[wd - 2 * size: wd - size] = (n + k - 1) * size + np.arange(size)
            write[wd - 2 * size:] = d0 + (k - 1) * size + np.arange(size)
        inputs["d_length"][row] = d0 + (k - 1) * size
    tokens[-size:] = d.mask_id
    tokens[wd - size: wd - size + offset] = region[k * size: k * size + offset]
    positions[-size:] = (n + k) * size + np.arange(size)
    inputs["d_start"][row], inputs["d_length_after"][row] = d0 - n * size, d0 + k * size
    inputs["open"][row], inputs["offset"][row] = np.arange(size) >= offset, offset
    vt, vp, vw = inputs["v_tokens"][row], inputs["v_positions"][row], inputs["v_write"][row]
    if g == 0:  # the prompt rides along; its last token leads the drafts
        vt[wv - size - p: wv - size], vp[wv - size - p: wv - size] = slot.prompt, np.arange(p)
        vw[wv - size - p: wv - size] = a - p + np.arange(p)
        inputs["v_length"][row] = 0
    else:
        vt[wv - size - 1], vp[wv - size - 1], vw[wv - size - 1] = slot.generated[-1], p + g - 1, a + g - 1
        inputs["v_length"][row] = a + g - 1
    vp[wv - size:], vw[wv - size:] = p + g + np.arange(size), a + g + np.arange(size)
    inputs["v_start"][row], inputs["v_base"][row] = a - p, a + g - 1
    inputs["remaining"][row], inputs["live"][row] = slot.max_new - g, True
    inputs["rope_length"][row] = p + slot.max_new


def build_inputs(geo: SpecGeometry, slots: list[SlotState | None]) -> dict[str, np.ndarray]:
    admitting = [len(s.prompt) for s in slots if s is not None and not s.generated]
    inputs = empty_inputs(geo, geo.widths(max(admitting) if admitting else None))
    for row, slot in enumerate(slots):
        if slot is not None:
            _fill(geo, inputs, row, slot)
    return inputs


def _row_knobs(knobs: dict) -> dict:
    """The knobs of one row inside a vmap over rows, shaped as a batch-of-one `generate` has them."""
    return {"threshold": knobs["threshold"][0], "temperature": jnp.maximum(knobs["temperature"], 1e-6),
            "top_p": knobs["top_p"], "seed": knobs["seed"], "stop_ids": knobs["stop_ids"][:, 0]}


_ROW_AXES = {"threshold": 0, "temperature": 0, "top_p": 0, "seed": 0, "stop_ids": 1}


def _per_row(fn, knobs: dict, *args):
    """vmaps fn(row_knobs, *row_args) over rows, each row's arrays given a batch dimension of one."""
    def one(row, *xs):
        out = fn(_row_knobs(row), *jax.tree.map(lambda x: x[None], xs))
        return jax.tree.map(lambda x: x[0], out)

    return jax.vmap(one, in_axes=({k: _ROW_AXES[k] for k in _ROW_AXES}, *[0] * len(args)))(
        {k: knobs[k] for k in _ROW_AXES}, *args)


def _commit(ctx: _Context, sctx: _Context | None, knobs, drf: _Draft, forwards, hidden, last) -> _Draft:
    """One draft commit: greedy rows batched, sampled rows each with its own key (sctx: the sampled plans)."""
    greedy = draft_commit(ctx, drf._replace(logits=None), jnp.int32(0), hidden, last)  # greedy: no key used
    if sctx is None:
        return greedy._replace(logits=drf.logits)

    def one(row_knobs, drf, forwards, hidden):
        return draft_commit(sctx._replace(knobs=row_knobs), drf, forwards[0], hidden, last)

    drawn = _per_row(one, knobs, drf, forwards, hidden)
    pick = knobs["temperature"] > 0
    tokens, open_ = (jnp.where(pick[:, None], s, g) for s, g in ((drawn.tokens, greedy.tokens), (drawn.open, greedy.open)))
    return _Draft(tokens, open_, drawn.logits, drf.before)


def _draft(ctx, sctx, knobs, inputs, cache: KVCache):
    """The drafter's part: (the block with its drafts, drafter logits at commit or None, cache, steps per row)."""
    plan = ctx.plan.draft
    size, batch = plan.block_size, inputs["d_tokens"].shape[0]
    drafter = ctx.drafter
    before = jnp.zeros((batch, drafter.config.hidden_size), drafter.config.compute_dtype) if plan.token_shift else None
    logits = None if sctx is None else jnp.zeros((batch, size, plan.vocab_size), jnp.float32)
    drf = _Draft(inputs["d_tokens"][:, -size:], inputs["open"] & inputs["live"][:, None], logits, before)
    forwards = knobs["forwards"]
    last = ctx.plan.draft_steps == 1
    hidden, (keys, values) = drafter.decode(inputs["d_tokens"], inputs["d_positions"], cache, attention="block",
                                            block_size=size)
    hidden, before = block_hidden(plan, hidden, drf.before)
    drf = _commit(ctx, sctx, knobs, drf._replace(before=before), forwards, hidden, last)
    clean = inputs["d_tokens"].shape[1] - size
    cache = write_rows(cache, keys[:, :, :clean], values[:, :, :clean], inputs["d_write"])
    cache = cache.replace(length=inputs["d_length_after"])
    block_positions = inputs["d_positions"][:, -size:]
    steps = jnp.ones((batch,), jnp.int32)  # per row: draft forwards it took part in (its solo run's count)

    def more(state):
        drf, _, step = state
        return drf.open.any() & (step < ctx.plan.draft_steps)

    def body(state):
        drf, steps, step = state
        hidden, _ = drafter.decode(drf.tokens, block_positions, cache, attention="bidirectional", block_size=size)
        hidden, before = block_hidden(plan, hidden, drf.before)
        active = drf.open.any(axis=1)
        drf = _commit(ctx, sctx, knobs, drf._replace(before=before), forwards + steps, hidden,
                      step == ctx.plan.draft_steps - 1)
        return drf, steps + active, step + 1

    drf, steps, _ = jax.lax.while_loop(more, body, (drf, steps, jnp.int32(1)))
    return drf, cache, steps


def _verify(ctx, sctx, knobs, inputs, drf: _Draft, cache: KVCache, key_step):
    """The verifier's forward on [last final token ; drafts] and the acceptance: (tokens [S, B + 1], count, cache)."""
    size = ctx.plan.draft.block_size
    offset = inputs["offset"]
    gather = jnp.minimum(offset[:, None] + jnp.arange(size)[None, :], size - 1)
    drafts = jnp.take_along_axis(drf.tokens, gather, axis=1)
    n_drafts = size - offset
    tokens = inputs["v_tokens"].at[:, -size:].set(drafts)
    hidden, (keys, values) = ctx.verifier.decode(tokens, inputs["v_positions"], cache, attention="causal")
    cache = write_rows(cache, keys, values, inputs["v_write"])
    hidden = hidden[:, -(size + 1):]
    new, accepted = accept(ctx, drafts, None, n_drafts, hidden, None)
    if sctx is not None:
        q_logits = jnp.take_along_axis(drf.logits, gather[..., None], axis=1)

        def one(row_knobs, drafts, q_logits, n_drafts, hidden, step):
            return accept(sctx._replace(knobs=row_knobs), drafts, q_logits, n_drafts, hidden, step_key(row_knobs, step[0]))

        drawn, taken = _per_row(one, knobs, drafts, q_logits, n_drafts, hidden, key_step)
        pick = knobs["temperature"] > 0
        new, accepted = jnp.where(pick[:, None], drawn, new), jnp.where(pick, taken, accepted)
    count = jnp.minimum(accepted + 1, inputs["remaining"])
    slot = jnp.arange(size + 1)[None, :]
    stops = (slot < count[:, None]) & is_stop(knobs, new)
    count = jnp.where(stops.any(axis=1), jnp.argmax(stops, axis=1) + 1, count)
    count = jnp.where(inputs["live"], count, 0)
    return new, count, stops.any(axis=1), jnp.minimum(accepted, count), cache.replace(length=inputs["v_base"] + count)


def spec_step(draft_graphdef, verify_graphdef, plan: SpecSlotPlan, draft_params, verify_params, draft_cache: KVCache,
              verify_cache: KVCache, inputs: dict, knobs: dict):
    """One draft + verify iteration in every slot. Returns (drafter cache, verifier cache, outputs):
    tokens [S, B + 1] of which the first `count` [S] are final, stopped [S], accepted drafts [S], and
    each row's forward counter after the iteration (its RNG step, as a solo run counts it)."""
    TRACES["serve_speculative"] += 1
    drafter = nnx.merge(draft_graphdef, draft_params)
    verifier = drafter if plan.spec.self_verify else nnx.merge(verify_graphdef, verify_params)
    greedy_knobs = {**knobs, "seed": jnp.uint32(0)}  # the batched greedy path draws nothing: one dummy key
    ctx = _Context(drafter, verifier, plan.spec, greedy_knobs, None, None, None, None, 0)
    sctx = ctx._replace(plan=plan.sampled_spec()) if plan.sampled else None
    rope = inputs["rope_length"] if draft_cache.rope_length is not None else None
    draft_cache = draft_cache.replace(start=inputs["d_start"], length=inputs["d_length"], rope_length=rope)
    drf, draft_cache, steps = _draft(ctx, sctx, knobs, inputs, draft_cache)
    rope = inputs["rope_length"] if verify_cache.rope_length is not None else None
    verify_cache = verify_cache.replace(start=inputs["v_start"], length=inputs["v_length"], rope_length=rope)
    verify_step = knobs["forwards"] + steps
    new, count, stopped, accepted, verify_cache = _verify(ctx, sctx, knobs, inputs, drf, verify_cache, verify_step)
    out = {"tokens": new, "count": count, "stopped": stopped, "accepted": accepted,
           "proposed": jnp.minimum(jnp.int32(plan.spec.draft.block_size) - inputs["offset"], inputs["remaining"]),
           "forwards": verify_step + 1}
    return draft_cache, verify_cache, out


spec_step_jit = jax.jit(spec_step, static_argnums=(0, 1, 2), donate_argnums=(5, 6))
