"""On-policy distillation (OPDLM, docs/METHOD.md section 5): training states from a student rollout and the
forward KL from the frozen AR teacher.

A rollout (efficient_dlm.sample, run inside the train step) leaves, for every row, the decoded tokens
and the forward pass that committed each of them (`Trajectory`). That is the whole trajectory: the
state the student saw before forward pass s is "prompt tokens and every token committed before s
visible, everything else [MASK]". So a state is chosen by choosing a step, uniformly over the steps
the row actually ran (`choose_steps`), and rebuilt without storing any intermediate canvas.

The student reads that state as the sampler decodes it: with the clean-context layout [x_t ; x_0]
(docs/METHOD.md section 1), block k of x_t sees x_t block k and the finished blocks < k of x_0, exactly
the block plus its prefix KV cache at decode time. Under this pattern x_t blocks never see each other,
so one forward can also train one state of *every* block (states="block") at the cost of one.

The AR teacher reads the finished sequence causally; its logits at position i - 1 are the target
distribution for token i. Loss: KL(teacher || student) at the positions that were [MASK] in the chosen
state and belong to the kept output (through the first stop token), over the full vocabulary or the
teacher's renormalised top-k tokens.

Trajectory self-distillation (opd.target="self", docs/METHOD.md section 13) reuses all of this without a
teacher: the same rollout (made slow by its settings) and the same rebuilt states, with the trajectory's
own tokens (`Example.targets`) as hard targets at the trained positions.

Why our own code: distillation from an AR teacher onto a diffusion student's trajectory states is the
OPD workload itself; no library provides it.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from efficient_dlm.diffusion.losses import entropy_from_logits, mask_padded_vocab
from efficient_dlm.diffusion.objectives import Example, Objective
from efficient_dlm.models.reductions import argmax

OBJECTIVE = "opd"
STATE_MODES = ("sequence", "block")
SELF_TARGET = "self"
OPD_TARGETS = ("teacher", SELF_TARGET)  # opd.target: the frozen AR teacher's distributions, or the trajectory's tokens


class Trajectory(NamedTuple):
    """A finished rollout laid out left-aligned (index = position), each array [batch, W].

    tokens: prompt, then every decoded position as the sampler left it ([MASK] where nothing was
        committed); commits after a row's stop token are kept, since later states of their block saw them.
    steps: the forward pass that committed each position; -1 for prompt tokens and uncommitted positions.
    prompt_lengths, lengths [batch]: prompt tokens, and generated tokens kept (through the first stop).
    context [batch]: positions that existed while decoding (prompt and decoded blocks).
    """

    tokens: jax.Array
    steps: jax.Array
    prompt_lengths: jax.Array
    lengths: jax.Array
    context: jax.Array

    def index(self) -> jax.Array:
        return jnp.arange(self.tokens.shape[1], dtype=jnp.int32)[None, :]

    def prompt(self) -> jax.Array:
        return self.index() < self.prompt_lengths[:, None]

    def kept(self) -> jax.Array:
        """[batch, W] the generated tokens of the finished output (the teacher's targets)."""
        end = (self.prompt_lengths + self.lengths)[:, None]
        return ~self.prompt() & (self.index() < end)


def _groups(x: jax.Array, size: int) -> jax.Array:
    return x.reshape(x.shape[0], x.shape[1] // size, size)


def choose_steps(key: jax.Array, steps: jax.Array, group: int) -> jax.Array:
    """The chosen step of every position's group ([batch, W]; -1 where the group committed nothing).

    Each group (a whole row, or one block) takes one of the distinct steps that committed a token in
    it, uniformly: every step value gets an independent uniform score and the group takes the step of
    its best-scoring position (all positions of one step share the score). A step that ran for the row
    committed at least one token, so these are exactly the row's denoising steps.
    """
    batch, width = steps.shape
    scores = jax.random.uniform(key, (batch, width + 1))  # a step index is below the canvas width + 1
    position_score = jnp.where(steps >= 0, jnp.take_along_axis(scores, jnp.maximum(steps, 0), axis=1), -1.0)
    grouped_steps, grouped_scores = _groups(steps, group), _groups(position_score, group)
    best = jnp.argmax(grouped_scores, axis=-1)[..., None]
    chosen = jnp.take_along_axis(grouped_steps, best, axis=-1)
    chosen = jnp.where(jnp.take_along_axis(grouped_scores, best, axis=-1) >= 0, chosen, -1)
    return jnp.broadcast_to(chosen, grouped_steps.shape).reshape(batch, width)


def state_masks(traj: Trajectory, chosen: jax.Array, block_size: int) -> tuple[jax.Array, jax.Array]:
    """(visible, trained), each [batch, W] bool, for the state before step `chosen` of each position.

    visible: what the student saw (prompt, and tokens committed before the chosen step).
    trained: kept output positions still [MASK] in that state, in the block that ran the chosen step.
    """
    committed_before = (traj.steps >= 0) & (traj.steps < chosen)
    visible = traj.prompt() | committed_before
    ran_here = _groups(traj.steps == chosen, block_size).any(-1, keepdims=True)
    in_block = jnp.broadcast_to(ran_here, _groups(chosen, block_size).shape).reshape(chosen.shape) & (chosen >= 0)
    return visible, traj.kept() & ~visible & in_block


def student_example(traj: Trajectory, chosen: jax.Array, obj: Objective) -> Example:
    """The clean-context training example of the chosen states: inputs [x_t ; x_0], loss weight 1 at
    the trained positions (normalised later by their count, as the ELBO's masked-token count)."""
    visible, trained = state_masks(traj, chosen, obj.block_size)
    x_t = jnp.where(visible, traj.tokens, jnp.asarray(obj.mask_token_id, traj.tokens.dtype))
    segment_ids = (traj.index() < traj.context[:, None]).astype(jnp.int32)
    positions = jnp.broadcast_to(traj.index(), traj.tokens.shape)
    weight = trained.astype(jnp.float32)
    inputs = jnp.concatenate([x_t, traj.tokens], axis=1)
    return Example(inputs, segment_ids, positions, traj.tokens, weight, weight, ~visible)


def teacher_inputs(traj: Trajectory, pad_id: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(tokens, segment_ids, positions) of the finished sequences (prompt + kept output) for the teacher."""
    real = traj.prompt() | traj.kept()
    tokens = jnp.where(real, traj.tokens, jnp.asarray(pad_id, traj.tokens.dtype))
    return tokens, real.astype(jnp.int32), jnp.broadcast_to(traj.index(), tokens.shape)


def shift_right(h: jax.Array) -> jax.Array:
    """out[:, i] = h[:, i - 1]: the AR teacher's state that predicts token i (position 0 gets zeros)."""
    return jnp.pad(h[:, :-1], ((0, 0), (1, 0), (0, 0)))


class DistillStats(NamedTuple):
    """Per position [batch, L]: KL(teacher || student), whether the argmaxes agree, and the student's
    predictive entropy (CAP, docs/METHOD.md section 9; None unless asked for)."""

    kl: jax.Array
    agree: jax.Array
    entropy: jax.Array | None = None


def kl_from_logits(
    student: jax.Array, teacher: jax.Array, *, top_k: int = 0, valid_vocab: int | None = None,
    entropy_temperature: float | None = None,
) -> DistillStats:
    """KL(p || q) per position from float32 logits: student [..., Vs], teacher [..., Vt], Vt <= Vs.

    top_k = 0: p is the teacher's full softmax (student ids >= Vt get p = 0). top_k > 0: p is the
    teacher's top-k tokens renormalised, KL = sum_topk p (log p - log q), with q the student's full
    softmax; at k = Vt both agree. Student ids >= valid_vocab (vocabulary padding) are impossible.
    entropy_temperature: also H(softmax(student / temperature)) over the valid ids.
    """
    student = mask_padded_vocab(student, valid_vocab)
    teacher = jax.lax.stop_gradient(teacher)
    log_q = jax.nn.log_softmax(student, axis=-1)
    if top_k:
        values, ids = jax.lax.top_k(teacher, top_k)
        log_p = jax.nn.log_softmax(values, axis=-1)
        log_q_at = jnp.take_along_axis(log_q, ids, axis=-1)
    else:
        log_p = jax.nn.log_softmax(teacher, axis=-1)
        log_q_at = log_q[..., : teacher.shape[-1]]
    kl = jnp.sum(jnp.exp(log_p) * (log_p - log_q_at), axis=-1)
    agree = argmax(student) == argmax(teacher)
    entropy = None if entropy_temperature is None else entropy_from_logits(student, entropy_temperature)
    return DistillStats(kl, agree.astype(jnp.float32), entropy)


def distill_stats(student, h_s: jax.Array, teacher, h_t: jax.Array, *, top_k: int = 0,
                  valid_vocab: int | None = None, chunk: int = 0,
                  entropy_temperature: float | None = None) -> DistillStats:
    """`kl_from_logits` of the two LM heads applied to aligned hidden states [B, L, E_s] / [B, L, E_t].

    chunk > 0: `chunk` positions at a time under jax.checkpoint, so neither pass holds [B, L, V]
    logits (large vocabularies; as the trainer's chunked cross-entropy).
    """
    def stats(hs, ht):
        return kl_from_logits(student.logits(hs), teacher.logits(ht), top_k=top_k, valid_vocab=valid_vocab,
                              entropy_temperature=entropy_temperature)

    batch, length = h_s.shape[:2]
    if not chunk or chunk >= length:
        return stats(h_s, h_t)
    count = -(-length // chunk)

    def split(h):  # zero-padded to whole chunks; the padding's statistics are cut off below
        h = jnp.pad(h, ((0, 0), (0, count * chunk - length), (0, 0)))
        return h.reshape(batch, count, chunk, h.shape[-1]).swapaxes(0, 1)

    out = jax.lax.map(jax.checkpoint(lambda args: stats(*args)), (split(h_s), split(h_t)))
    return jax.tree.map(lambda x: x.swapaxes(0, 1).reshape(batch, count * chunk)[:, :length], out)
