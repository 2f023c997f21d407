"""What the training loop needs for OPD steps: the teacher, prompt batches, compiled steps, held-out KL.

`diffusion.objective = "opd"` makes every step an OPD step; another diffusion objective with
`opd.start_step >= 0` mixes them in (from that step on, every `opd.every`-th step), so OPD can follow
block-diffusion continued pretraining (phases) or alternate with it (interleaving) in one run, with
one optimizer state and one checkpoint. `OPDRun` is built once per run by the loop (train/loop.py)
and owns everything OPD adds to it; the loop itself stays objective-agnostic. With opd.target="self"
(trajectory self-distillation) there is no teacher: `OPDRun.teacher` is None.
"""
from __future__ import annotations

import os
from typing import Callable

import jax

from efficient_dlm import checkpoints
from efficient_dlm.config import Config
from efficient_dlm.data.pipeline import take
from efficient_dlm.data.prompts import PromptSpec, build_prompt_dataset
from efficient_dlm.diffusion.opd import OBJECTIVE, SELF_TARGET
from efficient_dlm.diffusion.schedule import block_size_at
from efficient_dlm.errors import UserError, UserFileNotFoundError
from efficient_dlm.models.config import ModelConfig
from efficient_dlm.train.config import OpdConfig
from efficient_dlm.train.opd import Teacher, make_opd_eval_step, make_opd_step, summarize
from efficient_dlm.train.state import split_model
from efficient_dlm.train.step import step_settings
from efficient_dlm.port.hf_import import from_hf


def is_opd_step(config: Config, step: int) -> bool:
    """Whether step `step` (0-based) is an OPD step (module docstring)."""
    o = config.opd
    if config.diffusion.objective == OBJECTIVE:
        return True
    return 0 <= o.start_step <= step and (step - o.start_step) % o.every == 0


def load_teacher(config: Config, mesh=None) -> Teacher:
    """The frozen AR teacher from opd.teacher (orbax checkpoint or HF directory), in opd.teacher_dtype,
    sharded over `mesh` by the same logical-axis rules as the student."""
    path, dtype = config.opd.teacher, config.opd.teacher_dtype
    overrides = {"attention_backend": config.model.attention_backend, "scan_layers": config.model.scan_layers,
                 "remat_policy": "none"}
    if os.path.exists(os.path.join(path, checkpoints.CONFIG_NAME)):
        model = checkpoints.load(path, mesh=mesh, dtype=dtype, **overrides)
    else:
        model = from_hf(path, dtype=dtype, mesh=mesh, **overrides)
    return Teacher(model.config, split_model(model)[1])


def check_teacher(teacher_cfg: ModelConfig, cfg: ModelConfig, valid_vocab: int | None) -> None:
    """The student must be able to express every teacher token (same tokenizer, vocabulary at least as large)."""
    student_vocab = valid_vocab or cfg.vocab_size
    if teacher_cfg.vocab_size > student_vocab:
        raise UserError(
            f"opd.teacher has a vocabulary of {teacher_cfg.vocab_size} tokens, more than the student's "
            f"{student_vocab}; "
            "teacher and student must share the tokenizer"
        )


# The settings a compiled OPD step depends on (besides the architectures and the rollout length).
STEP_OPD_KEYS = ("block_size", "strategy", "steps_per_block", "threshold", "temperature", "states", "top_k", "kl_chunk",
                 "target", "quantize", "quantize_kv")
_COMPILED: dict[tuple, Callable] = {}


def _cached(factory, config: Config, cfg: ModelConfig, teacher_cfg: ModelConfig | None, max_new_tokens: int):
    """One compiled step per (settings, architectures, rollout length), reused across runs in a process
    (a resumed run, or OPD steps inside a mixed recipe, do not recompile)."""
    d = config.diffusion
    settings = (tuple(getattr(config.opd, k) for k in STEP_OPD_KEYS), step_settings(config.train),
                d.token_shift, d.valid_vocab_size, d.confidence_weight, d.confidence_temperature, config.lora)
    key = (factory.__name__, settings, cfg, teacher_cfg, max_new_tokens)
    if key not in _COMPILED:
        _COMPILED[key] = factory(config, cfg, teacher_cfg, max_new_tokens=max_new_tokens)
    return _COMPILED[key]


class OPDRun:
    """The OPD side of one training run: teacher, prompt iterator, steps, evaluation."""

    ITERATOR_NAME = "prompts"  # its name in the run's checkpoints (beside the text pipeline's "data")

    def __init__(self, config: Config, cfg: ModelConfig, tokenizer: str | None, mesh=None):
        o = config.opd
        self.config, self.cfg = config, cfg
        self.schedule = o.rollout_schedule()
        longest = o.max_prompt_len + max(n for _, n in self.schedule) + o.block_size
        if longest > cfg.max_position_embeddings:
            raise UserError(
                f"opd.max_prompt_len + the longest rollout needs {longest} positions, beyond the model's "
                f"max_position_embeddings={cfg.max_position_embeddings}"
            )
        spec = self._spec(tokenizer)
        process = dict(process_index=jax.process_index(), process_count=jax.process_count())
        self.iterator = iter(build_prompt_dataset(o.prompt_files, spec, train=True, **process))
        held_out = build_prompt_dataset(o.eval_files, spec, train=False, **process) if o.eval_files else None
        self.eval_batches = take(held_out, o.eval_batches) if held_out is not None else []
        self.teacher = None if o.target == SELF_TARGET else load_teacher(config, mesh)
        if self.teacher is not None:
            check_teacher(self.teacher.config, cfg, config.diffusion.valid_vocab_size)

    def _spec(self, tokenizer: str | None) -> PromptSpec:
        o, cfg, count = self.config.opd, self.cfg, jax.process_count()
        if self.config.train.batch_size % count:
            raise UserError(
                f"train.batch_size ({self.config.train.batch_size}) must be a multiple of the process count ({count})"
            )
        pad_id = next((t for t in (cfg.pad_token_id, cfg.eos_token_id) if t is not None), 0)
        return PromptSpec(
            batch_size=self.config.train.batch_size // count, block_size=o.block_size, max_prompt_len=o.max_prompt_len,
            mask_id=cfg.mask_token_id, pad_id=pad_id, vocab_size=cfg.vocab_size, tokenizer=tokenizer or "",
            chat_template=o.chat_template, seed=self.config.seed, num_threads=self.config.data.num_threads,
            prefetch=self.config.data.prefetch,
        )

    def max_new_tokens(self, step: int) -> int:
        return block_size_at(self.schedule, step)

    def _teacher(self) -> tuple[ModelConfig | None, object]:
        """(config, params) of the teacher; (None, None) for the self target."""
        return (None, None) if self.teacher is None else (self.teacher.config, self.teacher.params)

    def step_fn(self, step: int) -> Callable:
        """fn(state, batch, rng) -> (state, metrics) for step `step`, teacher parameters bound."""
        teacher_cfg, teacher_params = self._teacher()
        fn = _cached(make_opd_step, self.config, self.cfg, teacher_cfg, self.max_new_tokens(step))
        return lambda state, batch, rng: fn(state, teacher_params, batch, rng)

    def evaluate(self, params, step: int, device_batch: Callable, frozen=None) -> dict[str, float]:
        """KL and teacher agreement (or the self target's trajectory NLL and accuracy) and tokens per forward
        of the current student on the held-out prompts (frozen: the LoRA base); "loss" is the KL or the
        trajectory NLL."""
        teacher_cfg, teacher_params = self._teacher()
        fn = _cached(make_opd_eval_step, self.config, self.cfg, teacher_cfg, self.max_new_tokens(step))
        key, totals = jax.random.PRNGKey(self.config.seed + 2), None
        for j, batch in enumerate(self.eval_batches):
            sums = fn(params, teacher_params, device_batch(batch), jax.random.fold_in(key, j), frozen)
            totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
        out = {k: float(v) for k, v in summarize(jax.device_get(totals)).items()}
        return {"loss": out["kl"] if self.teacher is not None else out["trajectory_nll"], **out}


def check_inputs(o: OpdConfig) -> None:
    """The teacher (unless opd.target=self) and prompt paths, checked when a run starts, before any weights load (recipes leave
    them to the command line, so `validate` does not require them)."""
    if o.target != SELF_TARGET:  # trajectory self-distillation reads no teacher
        if not o.teacher:
            raise UserError("opd.teacher is not set: give the AR model's Hugging Face directory or orbax checkpoint "
                            "(or opd.target=self: self-distillation needs none)")
        if not os.path.isdir(o.teacher):
            raise UserFileNotFoundError(f"opd.teacher {o.teacher!r} is not a directory")
    if not o.prompt_files:
        raise UserError("opd.prompt_files is not set: give JSONL prompts ({\"prompt\": text} per line)")
