"""Config checks for the diffusion, data and train sections (registered with config.validate).

Each check raises ValueError with one line naming the key, before any data or weights are touched.
"""
from __future__ import annotations

import math

from ml_collections import ConfigDict

from efficient_dlm.data.pipeline import FORMATS
from efficient_dlm.diffusion.objectives import MASKINGS, OBJECTIVES, WEIGHTINGS, check_confidence
from efficient_dlm.diffusion.opd import OBJECTIVE as OPD
from efficient_dlm.diffusion.schedule import parse_schedule
from efficient_dlm.errors import UserError
from efficient_dlm.models.config import DTYPES
from efficient_dlm.models.lora import TARGETS
from efficient_dlm.train.optim import SCHEDULES

MASK_TOKEN_MODES = ("model", "append")


def _choice(value, choices, key: str) -> None:
    if value not in choices:
        raise UserError(f"unknown {key} {value!r}; choose one of {', '.join(choices)}")


def check_diffusion(config: ConfigDict) -> None:
    d, seq_len = config.diffusion, config.data.seq_len
    _choice(d.objective, (*OBJECTIVES, OPD), "diffusion.objective")
    _choice(d.masking, MASKINGS, "diffusion.masking")
    _choice(d.loss_weighting, WEIGHTINGS, "diffusion.loss_weighting")
    _choice(d.mask_token, MASK_TOKEN_MODES, "diffusion.mask_token")
    if d.objective in ("block", "block_diffusion"):
        for step, size in parse_schedule(d.block_size_schedule, d.block_size):
            if size is None or size <= 0 or seq_len % size:
                where = "diffusion.block_size" if not d.block_size_schedule else f"diffusion.block_size_schedule (step {step})"
                raise UserError(f"{where} {size} does not divide data.seq_len {seq_len}")
    if not 0.0 < d.rate_min <= d.rate_max <= 1.0:
        raise UserError(f"diffusion.rate_min / rate_max must satisfy 0 < min <= max <= 1, got {d.rate_min}, {d.rate_max}")
    if d.vocab_multiple <= 0:
        raise UserError(f"diffusion.vocab_multiple must be positive, got {d.vocab_multiple}")
    try:
        check_confidence(d.objective, d.confidence_weight, d.confidence_temperature)
    except ValueError as e:
        raise UserError(str(e)) from None


def check_data_and_train(config: ConfigDict) -> None:
    d, t = config.data, config.train
    if d.seq_len <= 1:
        raise UserError(f"data.seq_len must be at least 2, got {d.seq_len}")
    _choice(t.schedule, SCHEDULES, "train.schedule")
    _choice(d.format, FORMATS, "data.format")
    if d.chat_template and d.format != "chat":
        raise UserError(f"data.chat_template is set ({d.chat_template!r}) but data.format is {d.format!r}; set data.format=chat")
    for key in ("steps", "batch_size", "grad_accum", "save_every", "keep_last", "log_every", "max_nonfinite_steps"):
        if t[key] <= 0:
            raise UserError(f"train.{key} must be positive, got {t[key]}")
    if t.batch_size % t.grad_accum:
        raise UserError(f"train.grad_accum ({t.grad_accum}) must divide train.batch_size ({t.batch_size})")
    if t.loss_chunk < 0 or (t.loss_chunk and d.seq_len % t.loss_chunk):
        raise UserError(f"train.loss_chunk ({t.loss_chunk}) must divide data.seq_len ({d.seq_len})")
    if t.warmup_steps < 0 or t.eval_every < 0 or t.eval_batches <= 0:
        raise UserError("train.warmup_steps and train.eval_every must be >= 0 and train.eval_batches > 0")
    if not (math.isfinite(t.learning_rate) and t.learning_rate > 0):
        raise UserError(f"train.learning_rate must be a positive number, got {t.learning_rate}")
    if not 0.0 <= t.min_lr_ratio <= 1.0:
        raise UserError(f"train.min_lr_ratio must be in [0, 1], got {t.min_lr_ratio}")
    if not (math.isfinite(t.max_param_norm_ratio) and (t.max_param_norm_ratio == 0 or t.max_param_norm_ratio > 1)):
        raise UserError(f"train.max_param_norm_ratio must be > 1 (0 disables the guard), got {t.max_param_norm_ratio}")
    if not 0.0 < t.wsd_decay_fraction <= 1.0:
        raise UserError(f"train.wsd_decay_fraction must be in (0, 1], got {t.wsd_decay_fraction}")



def check_lora(config: ConfigDict) -> None:
    """The lora section (train/lora.py): checked only when lora.rank > 0."""
    lo = config.get("lora")
    if lo is None or lo.rank == 0:
        return
    if not isinstance(lo.rank, int) or lo.rank < 0:
        raise UserError(f"lora.rank must be a non-negative integer (0 = off), got {lo.rank!r}")
    if not (math.isfinite(lo.alpha) and lo.alpha > 0):
        raise UserError(f"lora.alpha must be a positive number, got {lo.alpha}")
    if not 0.0 <= lo.dropout < 1.0:
        raise UserError(f"lora.dropout must be in [0, 1), got {lo.dropout}")
    targets = [t.strip() for t in lo.targets.split(",") if t.strip()]
    if not targets or any(t not in TARGETS for t in targets):
        raise UserError(f"lora.targets {lo.targets!r}: comma-separated names from {', '.join(TARGETS)}")
    if lo.base_dtype not in ("", *DTYPES):
        raise UserError(f"unknown lora.base_dtype {lo.base_dtype!r}; choose one of {', '.join(DTYPES)} (or '' for model.param_dtype)")
    if config.init.hf_dir:
        raise UserError("lora.rank > 0 trains adapters on a saved base: import init.hf_dir first (`edlm import-hf`) "
                        "and set init.checkpoint")
    if config.diffusion.objective != "ar" and config.diffusion.mask_token != "model":
        raise UserError("lora.rank > 0 keeps the base's vocabulary frozen: [MASK] must be in it (diffusion.mask_token='model')")
