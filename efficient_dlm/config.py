"""The ml_collections config schema: one section per concern, defaults in one place, clear validation.

A recipe in configs/ is a short Python file whose `get_config()` starts from `base_config()` and sets
what differs (big_vision style). Every verb of `edlm` takes `--config=configs/x.py` and
`--config.section.key=value` overrides; `validate(config)` then rejects inconsistent values with one
line naming the key.

Sections: model (architecture, `ModelConfig` fields), init (where weights and tokenizer come from),
diffusion (objective and corruption), data, train, mesh, sample, bench. Each package owns the
meaning of its section; the defaults live here so a reader sees the whole schema at once.
"""
from __future__ import annotations

import dataclasses
import typing
from typing import Any, Callable

from ml_collections import ConfigDict, config_dict

from efficient_dlm.models.config import ModelConfig

# Section validators registered by the packages that own them (train, sample, mesh, ...).
_VALIDATORS: list[Callable[[ConfigDict], None]] = []


def register_validator(fn: Callable[[ConfigDict], None]) -> Callable[[ConfigDict], None]:
    _VALIDATORS.append(fn)
    return fn


def model_section(cfg: ModelConfig | None = None) -> ConfigDict:
    """ModelConfig fields as a ConfigDict; None fields become typed placeholders so CLI overrides work."""
    cfg = cfg or ModelConfig()
    hints = typing.get_type_hints(ModelConfig)
    section = ConfigDict()
    for field in dataclasses.fields(ModelConfig):
        value = getattr(cfg, field.name)
        if value is None:  # `int | None` -> a None placeholder that accepts --config.model.x=<int>
            (kind,) = [t for t in typing.get_args(hints[field.name]) if t is not type(None)]
            value = config_dict.placeholder(kind)
        section[field.name] = value
    return section


def model_config(config: ConfigDict) -> ModelConfig:
    """The frozen ModelConfig from a config's `model` section."""
    return ModelConfig.from_dict(config.model.to_dict())


def diffusion_section() -> ConfigDict:
    """Objective and corruption (METHOD.md sections 2-4). Owned by efficient_dlm/diffusion."""
    return ConfigDict(dict(objective="block_diffusion", block_size=32))


def data_section() -> ConfigDict:
    """Sources, tokenization, packing (grain). Owned by efficient_dlm/data."""
    return ConfigDict(dict(seq_len=256))


def train_section() -> ConfigDict:
    """Optimizer, schedule, checkpoints, eval, metrics. Owned by efficient_dlm/train."""
    return ConfigDict(dict(steps=100, batch_size=8))


def mesh_section() -> ConfigDict:
    """Device mesh and logical-axis rules. Owned by efficient_dlm/parallel."""
    return ConfigDict(dict(data=1, fsdp=-1, tensor=1, expert=1))


def sample_section() -> ConfigDict:
    """Decoding defaults for `edlm sample` / `generate`. Owned by efficient_dlm/sample."""
    return ConfigDict(dict(strategy="threshold", threshold=0.9, block_size=32, max_new_tokens=64))


def base_config() -> ConfigDict:
    c = ConfigDict()
    c.model = model_section()
    # Where weights come from: an HF directory, an orbax checkpoint from `edlm import-hf` / `save`, or
    # nothing (random init from `model`). The tokenizer defaults to the one stored with the weights.
    c.init = ConfigDict(dict(hf_dir="", checkpoint="", tokenizer="", seed=0))
    c.diffusion = diffusion_section()
    c.data = data_section()
    c.train = train_section()
    c.mesh = mesh_section()
    c.sample = sample_section()
    c.seed = 0
    c.run_dir = "runs/default"
    return c


def validate(config: ConfigDict) -> ConfigDict:
    """Checks cross-field consistency; raises ValueError with one line naming the offending key."""
    model_config(config)  # ModelConfig.__post_init__ validates the architecture
    if config.init.hf_dir and config.init.checkpoint:
        raise ValueError("set only one of init.hf_dir and init.checkpoint")
    for fn in _VALIDATORS:
        fn(config)
    return config


def to_plain(config: ConfigDict) -> dict[str, Any]:
    """JSON-ready dict (for checkpoints and reports)."""
    return config.to_dict()
