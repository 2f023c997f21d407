"""The `init`, `train`, `opd` and `lora` config sections: where weights come from, the optimizer and loop,
on-policy distillation from the frozen AR teacher (docs/METHOD.md section 5) and LoRA adapters.

Their fields and defaults are the sections' schema (`--config.train.key=value`); `validate()` checks
what a section alone decides. Checks across sections (train.loss_chunk dividing data.seq_len, OPD
needing a diffusion student) are composed in efficient_dlm/config.py.
"""
from __future__ import annotations

import dataclasses
import math

from efficient_dlm.diffusion.opd import OBJECTIVE as OPD
from efficient_dlm.diffusion.opd import OPD_TARGETS, STATE_MODES
from efficient_dlm.diffusion.schedule import parse_schedule
from efficient_dlm.errors import UserError
from efficient_dlm.models.config import DTYPES
from efficient_dlm.models.lora import TARGETS, LoraConfig
from efficient_dlm.models.quantize import Quantization, check_quantization
from efficient_dlm.section import Section, choice

SCHEDULES = ("cosine", "wsd", "constant")
ROLLOUT_STRATEGIES = ("topk", "threshold")


@dataclasses.dataclass(frozen=True)
class InitConfig(Section):
    """Where weights come from: an HF directory, an orbax checkpoint from `edlm import-hf` / `save`, or
    nothing (random init from `model`). The tokenizer defaults to the one stored with the weights."""

    SECTION = "init"

    hf_dir: str = ""
    checkpoint: str = ""
    tokenizer: str = ""
    seed: int = 0

    def validate(self) -> None:
        if self.hf_dir and self.checkpoint:
            raise UserError("set only one of init.hf_dir and init.checkpoint")


@dataclasses.dataclass(frozen=True)
class TrainConfig(Section):
    """Optimizer, schedule, checkpoints, eval, metrics."""

    SECTION = "train"

    steps: int = 100
    batch_size: int = 8  # global sequences per optimizer step
    grad_accum: int = 1  # micro-batches per step (batch_size must divide)
    learning_rate: float = 3e-4
    schedule: str = "cosine"  # cosine | wsd | constant, after linear warm-up
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    wsd_decay_fraction: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    adam_eps: float = 1e-8
    weight_decay: float = 0.1
    decay_norms: bool = False
    decay_biases: bool = False
    decay_embeddings: bool = False
    grad_clip: float = 1.0  # global-norm clipping; 0 disables
    z_loss: float = 0.0
    loss_chunk: int = 0  # >0: cross-entropy over this many positions at a time (large vocabularies)
    max_nonfinite_steps: int = 10  # stop after this many consecutive non-finite steps
    max_param_norm_ratio: float = 10.0  # stop when the parameter norm exceeds this times its start value; 0 = off
    save_every: int = 100
    keep_last: int = 3
    keep_best: bool = True  # also keep the checkpoint with the best eval loss
    async_checkpoint: bool = True
    resume: bool = True  # continue from the latest checkpoint in run_dir
    eval_every: int = 0  # 0: evaluate only at the end (when data.eval_files is set)
    eval_batches: int = 4
    log_every: int = 10
    tensorboard: bool = True
    progress: bool = True

    def validate(self) -> None:
        choice(self.schedule, SCHEDULES, "train.schedule")
        for key in ("steps", "batch_size", "grad_accum", "save_every", "keep_last", "log_every", "max_nonfinite_steps"):
            if getattr(self, key) <= 0:
                raise UserError(f"train.{key} must be positive, got {getattr(self, key)}")
        if self.batch_size % self.grad_accum:
            raise UserError(f"train.grad_accum ({self.grad_accum}) must divide train.batch_size ({self.batch_size})")
        if self.loss_chunk < 0:
            raise UserError(f"train.loss_chunk must be >= 0, got {self.loss_chunk}")
        if self.warmup_steps < 0 or self.eval_every < 0 or self.eval_batches <= 0:
            raise UserError("train.warmup_steps and train.eval_every must be >= 0 and train.eval_batches > 0")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise UserError(f"train.learning_rate must be a positive number, got {self.learning_rate}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise UserError(f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        ratio = self.max_param_norm_ratio
        if not (math.isfinite(ratio) and (ratio == 0 or ratio > 1)):
            raise UserError(f"train.max_param_norm_ratio must be > 1 (0 disables the guard), got {ratio}")
        if not 0.0 < self.wsd_decay_fraction <= 1.0:
            raise UserError(f"train.wsd_decay_fraction must be in (0, 1], got {self.wsd_decay_fraction}")


@dataclasses.dataclass(frozen=True)
class OpdConfig(Section):
    """On-policy distillation. diffusion.objective="opd" trains only with OPD; any other diffusion
    objective mixes OPD steps in from opd.start_step on (every opd.every-th step; -1 = never)."""

    SECTION = "opd"

    teacher: str = ""  # the AR model: a Hugging Face directory or an orbax checkpoint (never updated)
    teacher_dtype: str = "bfloat16"  # its parameters and compute
    prompt_files: str = ""  # comma-separated JSONL: {"prompt": text} | {"prompt_ids": [...]} | {"messages": [...]}
    eval_files: str = ""  # held-out prompts: KL and teacher agreement at evaluation
    eval_batches: int = 2
    chat_template: bool = False  # wrap prompts in the tokenizer's chat template (tokenizer_config.json)
    max_prompt_len: int = 64  # prompt capacity in tokens; longer prompts keep their last tokens
    max_new_tokens: int = 32  # rollout length ...
    max_new_tokens_schedule: str = ""  # ... or "step:tokens,..." (e.g. growing: "0:16,200:32,400:64")
    block_size: int = 4  # rollout block size (the paper: 4)
    strategy: str = "topk"  # topk: opd.steps_per_block steps per block | threshold (Fast-dLLM)
    steps_per_block: int = 4  # topk: block_size / steps_per_block tokens committed per step
    threshold: float = 0.9  # threshold strategy
    temperature: float = 0.0  # 0: greedy rollouts; > 0: sampled (seeded from the step)
    states: str = "sequence"  # sequence: one partially denoised state per row | block: one per block
    target: str = "teacher"  # teacher: KL from opd.teacher | self: CE toward the rollout's own tokens (no teacher; METHOD 13)
    top_k: int = 16  # KL over the teacher's top-k tokens (renormalised); 0 = the full vocabulary
    kl_chunk: int = 0  # > 0: logits of this many positions at a time (large vocabularies; KL or the self CE)
    start_step: int = -1  # mixed recipes: first OPD step (with another diffusion objective)
    every: int = 1  # mixed recipes: OPD on every n-th step from start_step
    # Quantized rollouts (models/quantize.py, qwix): the student decodes its rollouts as a per-channel
    # quantized copy of its current weights; the loss and gradients use the full-precision student.
    quantize: str = "none"  # none | int8 | fp8: the rollout copy's weights
    quantize_kv: str = "none"  # none | int8: its keys / values and KV cache, a scale per token and head

    def rollout_quantization(self) -> Quantization:
        """What the rollouts quantize (weights, LM head and embeddings per opd.quantize; K/V per opd.quantize_kv)."""
        return Quantization(quantize=self.quantize, quantize_kv=self.quantize_kv)

    def enabled(self, objective: str) -> bool:
        """Whether a run whose diffusion.objective is `objective` takes OPD steps."""
        return objective == OPD or self.start_step >= 0

    def rollout_schedule(self) -> list[tuple[int, int]]:
        """(step, rollout length) pairs of opd.max_new_tokens_schedule."""
        return parse_schedule(self.max_new_tokens_schedule, self.max_new_tokens, "opd.max_new_tokens_schedule")

    def validate(self) -> None:
        choice(self.strategy, ROLLOUT_STRATEGIES, "opd.strategy")
        choice(self.states, STATE_MODES, "opd.states")
        choice(self.target, OPD_TARGETS, "opd.target")
        choice(self.teacher_dtype, DTYPES, "opd.teacher_dtype")
        for key in ("block_size", "steps_per_block", "max_prompt_len", "max_new_tokens", "every", "eval_batches"):
            if getattr(self, key) < 1:
                raise UserError(f"opd.{key} must be >= 1, got {getattr(self, key)}")
        if self.strategy == "topk" and self.block_size % self.steps_per_block:
            raise UserError(f"opd.steps_per_block ({self.steps_per_block}) must divide opd.block_size ({self.block_size})")
        if not 0.0 <= self.threshold <= 1.0 or self.temperature < 0:
            raise UserError(
                f"opd.threshold must be in [0, 1] and opd.temperature >= 0, got {self.threshold}, {self.temperature}"
            )
        if self.top_k < 0 or self.kl_chunk < 0 or self.start_step < -1:
            raise UserError("opd.top_k and opd.kl_chunk must be >= 0 and opd.start_step >= -1")
        self.rollout_schedule()
        check_quantization(self.rollout_quantization(), "opd")


@dataclasses.dataclass(frozen=True)
class LoraSection(Section):
    """LoRA adapters (models/lora.py, README "LoRA"; the run side is train/lora.py). rank > 0 trains
    adapters on a frozen base (init.checkpoint); checkpoints hold the adapters only."""

    SECTION = "lora"

    rank: int = 0  # 0 = off (full fine-tuning)
    alpha: float = 16.0  # adapter output scaled by alpha / rank
    dropout: float = 0.0  # on the adapters' input (attention and MLP projections; not the routed experts)
    targets: str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"  # + "experts": MoE routed experts
    base_dtype: str = ""  # "" = model.param_dtype; "bfloat16": hold the frozen base in bfloat16

    def validate(self) -> None:
        if self.rank < 0:
            raise UserError(f"lora.rank must be a non-negative integer (0 = off), got {self.rank!r}")
        if self.rank == 0:
            return
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise UserError(f"lora.alpha must be a positive number, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        targets = self.target_names()
        if not targets or any(t not in TARGETS for t in targets):
            raise UserError(f"lora.targets {self.targets!r}: comma-separated names from {', '.join(TARGETS)}")
        if self.base_dtype not in ("", *DTYPES):
            raise UserError(
                f"unknown lora.base_dtype {self.base_dtype!r}; choose one of {', '.join(DTYPES)} (or '' for model.param_dtype)"
            )

    def target_names(self) -> tuple[str, ...]:
        return tuple(t.strip() for t in self.targets.split(",") if t.strip())

    def adapters(self) -> LoraConfig | None:
        """The adapters' static structure (models/lora.py), None when lora.rank is 0 (full fine-tuning)."""
        if not self.rank:
            return None
        return LoraConfig(self.rank, self.alpha, self.dropout, self.target_names(), self.base_dtype)
