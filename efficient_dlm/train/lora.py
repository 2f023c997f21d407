"""LoRA runs: the `lora` config section as a LoraConfig, and the base model a run's adapters belong to.

A LoRA run trains adapters (models/adapters.py) on a frozen base that is an efficient_dlm checkpoint
(`init.checkpoint`: an `edlm import-hf` output, a saved model, or a training run's step). The run's
checkpoints hold the adapters and their optimizer state only; model_config.json's extra["lora"]
records the adapter settings and the base (absolute path, step, SHA-256 of its checksum manifest),
so a resume and `efficient_dlm.load(run_dir)` reload the same base and refuse a changed one.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from efficient_dlm import checkpoints
from efficient_dlm.config import Config
from efficient_dlm.errors import UserError
from efficient_dlm.models.lora import LoraConfig
from efficient_dlm.train.config import InitConfig


def lora_config(config: Config) -> LoraConfig | None:
    """The section's LoraConfig (train/config.py LoraSection.adapters), None when lora.rank is 0."""
    return config.lora.adapters()


def require_base(init: InitConfig) -> None:
    """A new LoRA run needs its base as a checkpoint. Checked when a run starts, not in validate:
    `edlm aot` plans a LoRA step from the recipe's model section, without weights."""
    if not init.checkpoint:
        raise UserError("lora.rank > 0 trains adapters on a saved base: set init.checkpoint (an `edlm import-hf`, "
                        "`edlm train` or save output)")


def run_record(lora: LoraConfig, init: InitConfig) -> dict[str, Any]:
    """extra["lora"] of a new run's model_config.json: the adapter settings and the base reference."""
    return {**dataclasses.asdict(lora), "base": checkpoints.base_reference(init.checkpoint)}
