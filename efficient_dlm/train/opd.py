"""The on-policy distillation step: rollout, state choice, teacher, KL and update in one jitted program.

`make_opd_step(config, model_cfg, teacher_cfg, max_new_tokens=...)` (config: the typed `Config`, whose
opd, diffusion, train and lora sections shape the step) returns
`step(state, teacher_params, batch, rng) -> (state, metrics)` (opd.target="teacher", the default):
  1. the student decodes the batch's prompts with the sampler's compiled block-diffusion program
     (efficient_dlm.sample.diffusion; current parameters under stop_gradient: on-policy, and no
     gradient through the rollout), which also returns the raw canvas and the step of every commit;
     with opd.quantize / opd.quantize_kv the rollout decodes a quantized copy of the current
     parameters (made inside the step, models/quantize.py), exactly as `generate(student,
     quantize=..., quantize_kv=...)` would, while steps 2-4 use the full-precision student;
  2. one state per row (or per block, opd.states) is chosen and rebuilt (diffusion/opd.py);
  3. the frozen AR teacher runs causally on the finished sequences;
  4. loss = KL(teacher || student) at the state's [MASK] positions, normalised by their count
     (+ diffusion.confidence_weight x CAP's entropy term where the student's argmax is the teacher's,
     docs/METHOD.md section 9);
     gradients (accumulated over train.grad_accum micro-batches) and the optax update are the
     trainer's (train/step.py), so OPD shares the optimizer, schedule and non-finite handling.
The teacher's parameters are an argument, never donated and never differentiated: they stay bitwise
unchanged. One compiled step per rollout length (opd.max_new_tokens_schedule).

opd.target="self" (trajectory self-distillation, docs/METHOD.md section 13): no teacher (teacher_cfg and
teacher_params are None); steps 1-2 are the same, with the rollout settings making the trajectory slow
(e.g. one token per step), and step 4's loss is the cross-entropy toward the trajectory's own final
tokens at the chosen state's [MASK] positions (+ CAP), so the student learns to commit from earlier
states what its slow decoding commits later.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from efficient_dlm.config import Config, to_plain
from efficient_dlm.diffusion.losses import confidence_sum, token_stats
from efficient_dlm.diffusion.objectives import Objective, aux_losses, predict_hidden
from efficient_dlm.diffusion.opd import (
    SELF_TARGET, Trajectory, choose_steps, distill_stats, shift_right, student_example, teacher_inputs,
)
from efficient_dlm.diffusion.spec import DiffusionSpec, spec_from_recipe
from efficient_dlm.models.config import ModelConfig
from efficient_dlm.models.quantize import quantize_params, quantized_config
from efficient_dlm.train.config import OpdConfig
from efficient_dlm.sample.choice import Sampling
from efficient_dlm.sample.diffusion import diffusion_program
from efficient_dlm.sample.program import Plan, stop_id_array
from efficient_dlm.train.optim import make_optimizer
from efficient_dlm.train.lora import lora_config
from efficient_dlm.train.state import TrainState, graphdef_for
from efficient_dlm.train.step import accumulate, apply_gradients

@dataclasses.dataclass(frozen=True)
class Teacher:
    """The frozen AR teacher: its architecture (static, compiled in) and parameters (a step argument)."""

    config: ModelConfig
    params: nnx.State


def num_blocks(block_size: int, max_new_tokens: int) -> int:
    """Blocks the sampler decodes for any prompt remainder (as sample/layout.py's block_layout)."""
    return -(-(block_size - 1 + max_new_tokens) // block_size)


def rollout_plan(config: Config, cfg: ModelConfig, max_new_tokens: int) -> Plan:
    """The sampler's static plan for the student's rollouts (block size, strategy, greedy or sampled).

    Token shift and vocabulary padding come from the student's DiffusionSpec (what its checkpoint
    records), so rollouts decode the student exactly as `generate` would.
    """
    o = config.opd
    spec = spec_from_recipe(to_plain(config), cfg) or DiffusionSpec(mask_token_id=cfg.mask_token_id)
    pad_id = next((t for t in (cfg.pad_token_id, cfg.eos_token_id) if t is not None), 0)
    return Plan(
        strategy=o.strategy, max_new_tokens=max_new_tokens, sampling=Sampling(greedy=o.temperature == 0),
        pad_id=pad_id, banned_ids=(cfg.mask_token_id,), valid_vocab_size=spec.valid_vocab_size,
        vocab_size=cfg.vocab_size,
        block_size=o.block_size, num_blocks=num_blocks(o.block_size, max_new_tokens),
        tokens_per_step=o.block_size // o.steps_per_block, mask_id=cfg.mask_token_id,
        token_shift=spec.token_shift, record_canvas=True,
    )


def rollout_knobs(o: OpdConfig, cfg: ModelConfig, key: jax.Array) -> dict[str, jax.Array]:
    """The sampler's traced settings; the sampling seed comes from the step's key."""
    stops = () if cfg.eos_token_id is None else (cfg.eos_token_id,)
    return {
        "threshold": jnp.float32(o.threshold), "factor": jnp.float32(1.0), "entropy_bound": jnp.float32(0.0),
        "temperature": jnp.float32(max(o.temperature, 1e-6)), "top_p": jnp.float32(1.0),
        "seed": jax.random.bits(key, (), jnp.uint32), "stop_ids": jnp.asarray(stop_id_array(stops)),
    }


def trajectory(batch: dict[str, jax.Array], out: dict[str, jax.Array], block_size: int, mask_id: int) -> Trajectory:
    """The rollout left-aligned: [prompt's full blocks ; decoded blocks] shifted so index = position."""
    prefix, shift = batch["prefix"], batch["shift"]
    decoded, decoded_steps = out["canvas"][:, block_size:], out["canvas_step"][:, block_size:]
    tokens = jnp.concatenate([prefix, decoded], axis=1)
    steps = jnp.concatenate([jnp.full_like(prefix, -1), decoded_steps], axis=1)
    width = tokens.shape[1]
    index = jnp.arange(width, dtype=jnp.int32)[None, :] + shift[:, None]
    inside = index < width

    def align(x, fill):
        return jnp.where(inside, jnp.take_along_axis(x, jnp.minimum(index, width - 1), axis=1), fill)

    prompt_lengths = prefix.shape[1] - shift + batch["remainder"]
    return Trajectory(align(tokens, mask_id), align(steps, -1), prompt_lengths, out["lengths"], width - shift)


def rollout(graphdef, params, plan: Plan, batch: dict[str, jax.Array], knobs: dict) -> tuple[Trajectory, dict]:
    """The student's decoding of the batch's prompts (no gradient flows back through it)."""
    inputs = {k: batch[k] for k in ("prefix", "prefix_positions", "first_block", "shift", "remainder")}
    out = diffusion_program(graphdef, plan, jax.lax.stop_gradient(params), inputs, knobs)
    stats = {"generated": jnp.sum(out["lengths"]), "row_forwards": jnp.sum(out["row_forwards"])}
    stats = {k: v.astype(jnp.float32) for k, v in stats.items()}
    return trajectory(batch, out, plan.block_size, plan.mask_id), stats


def rollout_config(config: Config, cfg: ModelConfig) -> ModelConfig:
    """The student's architecture as its rollouts decode it: quantized per opd.quantize / opd.quantize_kv
    (models/quantize.py), or `cfg` itself."""
    q = config.opd.rollout_quantization()
    return quantized_config(cfg, q) if q.active else cfg


def rollout_params(params: nnx.State, rollout_cfg: ModelConfig) -> nnx.State:
    """The parameters the rollout decodes with: the student's current ones without gradient, their
    weights quantized per channel as rollout_cfg says (every step quantizes the current student)."""
    return quantize_params(jax.lax.stop_gradient(params), rollout_cfg)


@dataclasses.dataclass(frozen=True)
class Roller:
    """The student as its rollouts decode it: the sampler plan and the graph of `cfg` (rollout_config:
    the student's own architecture, or its quantized copy's). Called as roller(params, batch, knobs)
    with the student's full-precision parameters."""

    plan: Plan
    graphdef: nnx.GraphDef
    cfg: ModelConfig

    def __call__(self, params: nnx.State, batch: dict[str, jax.Array], knobs: dict) -> tuple[Trajectory, dict]:
        return rollout(self.graphdef, rollout_params(params, self.cfg), self.plan, batch, knobs)


def make_roller(config: Config, cfg: ModelConfig, student: nnx.GraphDef, max_new_tokens: int) -> Roller:
    """The Roller of student `cfg` (graph `student`) for rollouts of max_new_tokens."""
    rollout_cfg = rollout_config(config, cfg)
    graphdef = student if rollout_cfg == cfg else graphdef_for(rollout_cfg)  # (LoRA refuses quantized rollouts)
    return Roller(rollout_plan(config, cfg, max_new_tokens), graphdef, rollout_cfg)


def student_objective(config: Config, cfg: ModelConfig) -> Objective:
    """The clean-context pattern at the rollout's block size: how the sampler's KV cache decodes."""
    return Objective(kind="block_diffusion", block_size=config.opd.block_size, token_shift=config.diffusion.token_shift,
                     mask_token_id=cfg.mask_token_id)


@dataclasses.dataclass(frozen=True)
class _Parts:
    """What an OPD program closes over, built once outside any trace (graph definitions, plan)."""

    config: Config
    cfg: ModelConfig
    roller: Roller
    student: nnx.GraphDef
    teacher: nnx.GraphDef | None  # None: opd.target="self"
    objective: Objective

    @property
    def plan(self) -> Plan:
        return self.roller.plan


def _parts(config: Config, cfg: ModelConfig, teacher_cfg: ModelConfig | None, max_new_tokens: int) -> _Parts:
    student = graphdef_for(cfg, lora_config(config))  # LoRA: adapters on the frozen base, without dropout
    teacher = None if config.opd.target == SELF_TARGET else graphdef_for(teacher_cfg)
    return _Parts(config, cfg, make_roller(config, cfg, student, max_new_tokens), student, teacher,
                  student_objective(config, cfg))


def _student_state(params: nnx.State, frozen: nnx.State | None) -> nnx.State:
    """The whole student state the rollout decodes with: the params, or under LoRA base and adapters."""
    return params if frozen is None else nnx.merge_state(frozen, params)


def _states_and_teacher(p: _Parts, params, teacher_params, batch, rng):
    """Rollout, chosen states as a training Example, and the teacher's aligned hidden states (None for
    opd.target="self": the Example's targets, the trajectory's tokens, are the targets)."""
    o = p.config.opd
    roll_key, choose_key = jax.random.split(rng)
    traj, stats = p.roller(params, batch, rollout_knobs(o, p.cfg, roll_key))
    group = o.block_size if o.states == "block" else traj.tokens.shape[1]
    ex = student_example(traj, choose_steps(choose_key, traj.steps, group), p.objective)
    tokens, segment_ids, positions = teacher_inputs(traj, p.plan.pad_id)
    stats["tokens"] = jnp.sum(segment_ids).astype(jnp.float32)
    if p.teacher is None:
        return ex, None, stats
    teacher = nnx.merge(p.teacher, teacher_params)
    h_t, _ = teacher.hidden(tokens, attention="causal", segment_ids=segment_ids, positions=positions)
    return ex, jax.lax.stop_gradient(shift_right(h_t)), stats


def _distill_sums(p: _Parts, student, h_s, teacher_params, h_t, ex, cap: bool) -> tuple[jax.Array, dict]:
    """(numerator without CAP, sums) of the teacher target: KL(teacher || student) at the trained positions;
    CAP's "correct" is the student's argmax agreeing with the teacher's."""
    o, d = p.config.opd, p.config.diffusion
    stats = distill_stats(student, h_s, nnx.merge(p.teacher, teacher_params), h_t,
                          top_k=o.top_k, valid_vocab=d.valid_vocab_size, chunk=o.kl_chunk,
                          entropy_temperature=d.confidence_temperature if cap else None)
    sums = {"kl": jnp.sum(ex.count * stats.kl), "agree": jnp.sum(ex.count * stats.agree)}
    if cap:
        sums["confidence"] = confidence_sum(ex.count, stats.agree, stats.entropy)
    return jnp.sum(ex.weight * stats.kl), sums


def _self_sums(p: _Parts, student, h_s, ex, cap: bool) -> tuple[jax.Array, dict]:
    """(numerator without CAP, sums) of the self target: cross-entropy toward the trajectory's tokens at
    the trained positions; CAP's "correct" is the student's argmax being that token."""
    o, d = p.config.opd, p.config.diffusion
    stats = token_stats(student, h_s, ex.targets, valid_vocab=d.valid_vocab_size, chunk=o.kl_chunk,
                        entropy_temperature=d.confidence_temperature if cap else None)
    sums = {"ce": jnp.sum(ex.count * stats.ce), "correct": jnp.sum(ex.count * stats.correct)}
    if cap:
        sums["confidence"] = confidence_sum(ex.count, stats.correct, stats.entropy)
    return jnp.sum(ex.weight * stats.ce), sums


def _loss_fn(p: _Parts, teacher_params, accum: int = 1, train: bool = False):
    """loss(params, (example, teacher hidden), normaliser, key, step) in the trainer's grad_fn form; the
    student's auxiliary losses (MoE routers) are added as in block-diffusion training. train: MoE
    training routing (capacity on x_t; x_0 per model.clean_routing), as the train step; evaluation
    routes dropless. CAP (diffusion.confidence_weight, docs/METHOD.md section 9) adds its entropy term
    under the same normaliser."""
    d = p.config.diffusion
    cap = d.confidence_weight > 0

    def loss_fn(params, inputs, normaliser, key, step, frozen=None):
        ex, h_t = inputs
        student = nnx.merge(p.student, params, *([] if frozen is None else [frozen]))
        h_s, aux = predict_hidden(student, p.objective, ex, train=train)
        if p.teacher is None:
            loss, sums = _self_sums(p, student, h_s, ex, cap)
        else:
            loss, sums = _distill_sums(p, student, h_s, teacher_params, h_t, ex, cap)
        if cap:
            loss = loss + d.confidence_weight * sums["confidence"]
        loss = loss / normaliser
        sums["count"] = jnp.sum(ex.count)
        if "expert_counts" in aux:  # MoE routing counts: the trainer's bias update and load metrics
            sums["expert_counts"] = aux["expert_counts"]
        aux_loss = aux_losses(aux) / accum
        return loss + aux_loss, {**sums, "loss": loss, "aux_loss": aux_loss}

    return loss_fn


def summarize(sums: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Ratios from summed OPD statistics: KL per trained token and agreement with the teacher's argmax
    (opd.target="teacher") or the cross-entropy toward the trajectory's tokens and the student's accuracy
    on them (opd.target="self"), CAP's confidence_loss when on, and the rollouts' tokens per forward pass
    (generated tokens / row forward passes, as the sampler)."""
    count = jnp.maximum(sums["count"], 1.0)
    named = {"kl": "kl", "agree": "teacher_accuracy", "ce": "trajectory_nll", "correct": "trajectory_accuracy",
             "confidence": "confidence_loss"}
    return {
        **{name: sums[key] / count for key, name in named.items() if key in sums},
        "tokens_per_forward": sums["generated"] / jnp.maximum(sums["row_forwards"], 1.0),
        "trained_tokens": sums["count"],
        "generated_tokens": sums["generated"],
    }


def make_opd_step(
    config: Config, cfg: ModelConfig, teacher_cfg: ModelConfig | None, *, max_new_tokens: int,
    tx: optax.GradientTransformation | None = None, jit: bool = True, donate: bool = True,
) -> Callable[[TrainState, nnx.State, dict, jax.Array], tuple[TrainState, dict[str, Any]]]:
    """The OPD train step for student `cfg` (see the module docstring). batch: the prompt pipeline's
    layout arrays (data/prompts.py) with leading dimension train.batch_size. teacher_cfg None: the
    self target (the step's teacher_params are then ignored; pass None)."""
    tx = tx or make_optimizer(config.train)
    parts = _parts(config, cfg, teacher_cfg, max_new_tokens)
    accum = config.train.grad_accum

    def step(state: TrainState, teacher_params: nnx.State, batch: dict, rng: jax.Array):
        ex, h_t, stats = _states_and_teacher(parts, _student_state(state.params, state.frozen), teacher_params, batch, rng)
        grad_fn = jax.value_and_grad(_loss_fn(parts, teacher_params, accum, train=True), has_aux=True)
        normaliser = jnp.maximum(jnp.sum(ex.count), 1.0)
        grads, sums = accumulate(grad_fn, state.params, (ex, h_t), normaliser, rng, state.step, accum, state.frozen)
        state, metrics = apply_gradients(config.train, tx, cfg, state, grads, sums)
        return state, {**metrics, **summarize({**sums, **stats}), "tokens": stats["tokens"]}

    if not jit:
        return step
    return jax.jit(step, donate_argnums=(0,) if donate else ())


def make_opd_eval_step(
    config: Config, cfg: ModelConfig, teacher_cfg: ModelConfig | None, *, max_new_tokens: int, jit: bool = True
):
    """eval_step(params, teacher_params, batch, rng, frozen=None) -> summed statistics (kl and agree, or ce
    and correct for the self target; count, generated, row_forwards, tokens) of one held-out prompt batch;
    ratios from `summarize` over all batches. frozen: the LoRA base (TrainState.frozen)."""
    parts = _parts(config, cfg, teacher_cfg, max_new_tokens)

    def eval_step(params, teacher_params, batch, rng, frozen=None):
        ex, h_t, stats = _states_and_teacher(parts, _student_state(params, frozen), teacher_params, batch, rng)
        _, sums = _loss_fn(parts, teacher_params)(params, (ex, h_t), 1.0, rng, 0, frozen)
        return {k: v for k, v in {**sums, **stats}.items() if k not in ("loss", "aux_loss", "expert_counts")}

    return jax.jit(eval_step) if jit else eval_step
