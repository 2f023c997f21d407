"""The ml_collections config at the CLI edge, and its one conversion into the packages' typed configs.

A recipe in configs/ is a short Python file whose `get_config()` starts from `base_config()` and sets
what differs (big_vision style). Every verb of `edlm` takes `--config=configs/x.py` and
`--config.section.key=value` overrides; `typed(config)` then turns the ConfigDict into a `Config` of
frozen, typed sections, naming an unknown or mistyped key and rejecting inconsistent values with one
line (`validate(config)` is the same check for callers that keep the ConfigDict).

Each package owns its section, a frozen dataclass whose fields and defaults are the schema and whose
`validate()` holds the section's rules: model (models/config.py), init, train and opd
(train/config.py), lora (train/config.py), diffusion (diffusion/config.py), data (data/config.py), mesh (parallel/config.py),
sample and bench (sample/config.py), demo (demo/config.py). This module composes them explicitly and
adds the checks that span sections, so every verb validates every section the same way.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Any, Mapping

from ml_collections import ConfigDict, config_dict

from efficient_dlm.data.config import DataConfig
from efficient_dlm.demo.config import DemoConfig
from efficient_dlm.diffusion.config import DiffusionConfig
from efficient_dlm.errors import UserError
from efficient_dlm.models.config import ModelConfig
from efficient_dlm.parallel.config import MeshConfig
from efficient_dlm.sample.config import BenchConfig, SampleConfig
from efficient_dlm.section import field_types, optional_kind
from efficient_dlm.train.config import InitConfig, LoraSection, OpdConfig, TrainConfig


@dataclasses.dataclass(frozen=True)
class Config:
    """The whole config, typed: one frozen section per package (what library code receives)."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    init: InitConfig = dataclasses.field(default_factory=InitConfig)
    diffusion: DiffusionConfig = dataclasses.field(default_factory=DiffusionConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    sample: SampleConfig = dataclasses.field(default_factory=SampleConfig)
    bench: BenchConfig = dataclasses.field(default_factory=BenchConfig)
    demo: DemoConfig = dataclasses.field(default_factory=DemoConfig)
    opd: OpdConfig = dataclasses.field(default_factory=OpdConfig)
    lora: LoraSection = dataclasses.field(default_factory=LoraSection)
    seed: int = 0
    run_dir: str = "runs/default"


# What an entry point (train, run_demo, run_ablation) accepts: the typed Config, or the CLI's ConfigDict
# (or its plain dict) that `typed` converts once; library code below the entry points takes Config only.
ConfigLike = Config | ConfigDict | Mapping[str, Any]

SECTIONS: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(Config) if f.default_factory is not dataclasses.MISSING}
SCALARS = {f.name: f.default for f in dataclasses.fields(Config) if f.name not in SECTIONS}


def section(values) -> ConfigDict:
    """A typed section as a ConfigDict; None fields become typed placeholders (so --config.s.x=<int> works)
    and (name, value) pair tuples a nested section (mesh.rules: --config.mesh.rules.embed=fsdp)."""
    out = ConfigDict()
    for name, hint in field_types(type(values)).items():
        value = getattr(values, name)
        kind, _ = optional_kind(hint)
        if value is None:
            value = config_dict.placeholder(kind)
        elif value and isinstance(value, tuple) and all(isinstance(v, tuple) and len(v) == 2 for v in value):
            value = ConfigDict(dict(value))
        out[name] = value
    return out


def model_section(cfg: ModelConfig | None = None) -> ConfigDict:
    """ModelConfig fields as a ConfigDict (the `model` section)."""
    return section(cfg or ModelConfig())


def model_config(config: ConfigDict) -> ModelConfig:
    """The frozen ModelConfig from a config's `model` section."""
    return ModelConfig.from_dict(config.model.to_dict())


def sibling_recipe(anchor: str, name: str) -> ConfigDict:
    """get_config() of the recipe `name`.py next to the file `anchor` (a recipe's __file__): recipes
    build on one another (qwen3_8b_opd on qwen3_8b_bd on qwen3_8b) without configs/ being a package."""
    path = os.path.join(os.path.dirname(os.path.abspath(anchor)), f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"edlm_recipe_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def base_config() -> ConfigDict:
    """Every section at its package's defaults, plus the run's seed and directory."""
    c = ConfigDict()
    for name, cls in SECTIONS.items():
        c[name] = section(cls())
    for name, value in SCALARS.items():
        c[name] = value
    return c


def typed(config: ConfigLike) -> Config:
    """The ConfigDict as typed sections (each validated by its package), then the checks across sections.

    The one place a ConfigDict becomes typed configs: an unknown or mistyped key, or an inconsistent
    value, is one UserError line naming the key. A Config is returned as it is (already checked), so
    an entry point such as `train` takes either."""
    if isinstance(config, Config):
        return config
    unknown = sorted(set(config) - set(SECTIONS) - set(SCALARS))
    if unknown:
        raise UserError(f"unknown config section or key {unknown[0]!r} (see efficient_dlm/config.py)")
    parts: dict[str, Any] = {}
    for name, cls in SECTIONS.items():
        values = config.get(name) or {}
        values = values.to_dict() if isinstance(values, ConfigDict) else dict(values)
        parts[name] = ModelConfig.from_dict(values) if cls is ModelConfig else cls.from_mapping(values)
    for name, default in SCALARS.items():
        value = config.get(name, default)
        if type(value) is not type(default):
            raise UserError(f"config.{name} must be {type(default).__name__}, got {value!r}")
        parts[name] = value
    typed_config = Config(**parts)
    check_across_sections(typed_config)
    return typed_config


def check_across_sections(c: Config) -> None:
    """The rules that span sections (each section's own rules are its validate())."""
    seq_len, d = c.data.seq_len, c.diffusion
    if d.has_blocks:
        for step, size in d.block_sizes():
            if seq_len % size:
                where = "diffusion.block_size" if not d.block_size_schedule else f"diffusion.block_size_schedule (step {step})"
                raise UserError(f"{where} {size} does not divide data.seq_len {seq_len}")
    if c.train.loss_chunk and seq_len % c.train.loss_chunk:
        raise UserError(f"train.loss_chunk ({c.train.loss_chunk}) must divide data.seq_len ({seq_len})")
    if c.opd.enabled(d.objective) and d.objective == "ar":
        raise UserError("opd.start_step needs a diffusion student; diffusion.objective 'ar' has no [MASK] token")
    if c.lora.rank and c.init.hf_dir:
        raise UserError("lora.rank > 0 trains adapters on a saved base: import init.hf_dir first (`edlm import-hf`) "
                        "and set init.checkpoint")
    if c.lora.rank and c.opd.enabled(d.objective) and c.opd.rollout_quantization().active:
        raise UserError("opd.quantize / opd.quantize_kv (quantized rollouts) are not supported with lora.rank > 0: "
                        "set them to none")
    if c.lora.rank and d.objective != "ar" and d.mask_token != "model":
        raise UserError("lora.rank > 0 keeps the base's vocabulary frozen: [MASK] must be in it (diffusion.mask_token='model')")


def validate(config: ConfigDict) -> ConfigDict:
    """Checks every section and their consistency (see `typed`); returns `config` unchanged."""
    typed(config)
    return config


def override(config: Config, values: Mapping[str, Any]) -> Config:
    """`config` with {"section.key": value} (or top-level "seed" / "run_dir") changed, every changed
    section re-validated and the checks across sections rerun: how library code derives a variant
    (a demo run's paths, an ablation's variant) from the typed config without a ConfigDict."""
    changes: dict[str, dict[str, Any]] = {}
    scalars: dict[str, Any] = {}
    for key, value in values.items():
        name, _, field = key.partition(".")
        if name in SCALARS and not field:
            scalars[name] = value
        elif name in SECTIONS and field in field_types(SECTIONS[name]):
            changes.setdefault(name, {})[field] = value
        else:
            raise UserError(f"unknown config key {key!r} (see efficient_dlm/config.py)")
    parts = {name: dataclasses.replace(getattr(config, name), **fields) for name, fields in changes.items()}
    result = dataclasses.replace(config, **parts, **scalars)
    check_across_sections(result)
    return result


def to_plain(config: Config | ConfigDict) -> dict[str, Any]:
    """JSON-ready dict (for checkpoints and reports), the same shape from a Config as from its ConfigDict
    (a run's recorded train_config reads back with `typed`)."""
    if isinstance(config, Config):
        plain: dict[str, Any] = {name: section(getattr(config, name)).to_dict() for name in SECTIONS}
        return {**plain, **{name: getattr(config, name) for name in SCALARS}}
    return config.to_dict()
