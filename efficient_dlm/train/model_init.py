"""Where the model being trained comes from, and the [MASK] token it learns to fill.

Architecture comes from the source (HF directory, orbax checkpoint, or the config for a random
init); numerics (dtype, param_dtype, remat, attention backend) always come from the recipe's `model`
section, since the training recipe decides how to compute. With diffusion.mask_token="append" a new
embedding row (and LM-head column) is appended for [MASK] and the vocabulary padded to a multiple of
diffusion.vocab_multiple (what the "vocab" sharding needs); padded rows are never predicted (the loss
gives them -inf) and `valid_vocab_size` is recorded in the run's model_config.json.
"""
from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
from flax import nnx

from efficient_dlm import checkpoints
from efficient_dlm.config import Config
from efficient_dlm.diffusion.config import DiffusionConfig
from efficient_dlm.errors import UserError
from efficient_dlm.models.config import ModelConfig
from efficient_dlm.models.decoder import MODEL_STATE, abstract_model, init_model
from efficient_dlm.models.quantize import Quantization
from efficient_dlm.port.hf_config import model_config_from_hf, read_config_json
from efficient_dlm.port.hf_import import from_hf

NUMERIC_FIELDS = ("dtype", "param_dtype", "remat_policy", "attention_backend", "scan_layers")


@dataclasses.dataclass
class InitialModel:
    model: nnx.Module
    tokenizer_dir: str | None
    valid_vocab_size: int | None
    source: str


def numeric_overrides(model: ModelConfig) -> dict:
    """The recipe's numerics (and its [MASK] id, when set) from its `model` section, applied to any source."""
    values = {name: getattr(model, name) for name in NUMERIC_FIELDS}
    if model.mask_token_id is not None:
        values["mask_token_id"] = model.mask_token_id
    return values


def load_source_model(config: Config, mesh=None) -> InitialModel:
    """The model named by config.init (hf_dir / checkpoint) or a random init from config.model."""
    tokenizer = config.init.tokenizer or None
    if config.init.checkpoint:
        model = checkpoints.load(config.init.checkpoint, mesh=mesh, **numeric_overrides(config.model))
        if Quantization.of(model.config).active:
            raise UserError(f"init.checkpoint {config.init.checkpoint}: a quantized checkpoint "
                            f"({Quantization.of(model.config).describe()}) is for inference; train from the float one")
        tokenizer = tokenizer or checkpoints.tokenizer_dir(config.init.checkpoint)
        spec = getattr(model, "spec", None)  # the checkpoint's DiffusionSpec (None: an AR model)
        valid = spec.valid_vocab_size if spec is not None else None
        return InitialModel(model, tokenizer, valid, os.path.abspath(config.init.checkpoint))
    if config.init.hf_dir:
        overrides = numeric_overrides(config.model)
        compute_dtype = overrides.pop("dtype")  # from_hf's own `dtype` argument is the parameter dtype
        model = from_hf(config.init.hf_dir, dtype=overrides.pop("param_dtype"), mesh=mesh, **overrides)
        if compute_dtype != model.config.dtype:
            model = checkpoints._with_config(model, model.config.replace(dtype=compute_dtype))
        hf_tok = config.init.hf_dir if os.path.exists(os.path.join(config.init.hf_dir, "tokenizer.json")) else None
        return InitialModel(model, tokenizer or hf_tok, None, os.path.abspath(config.init.hf_dir))
    return InitialModel(init_model(config.model, seed=config.init.seed), tokenizer, None, "random init")


def _pad_rows(table: jax.Array, rows: int) -> jax.Array:
    """Appends `rows` copies of the mean row (the [MASK] row and padding start as the average token)."""
    mean = jnp.mean(table.astype(jnp.float32), axis=0, keepdims=True).astype(table.dtype)
    return jnp.concatenate([table, jnp.broadcast_to(mean, (rows, table.shape[1]))], axis=0)


def _grown_vocab(vocab_size: int, multiple: int) -> int:
    """Vocabulary size after appending [MASK]: vocab + 1 rounded up to `multiple`."""
    return -(-(vocab_size + 1) // multiple) * multiple


def append_mask_token(model: nnx.Module, multiple: int) -> tuple[nnx.Module, int]:
    """A model with one more vocabulary row for [MASK] (id = old vocab size), padded to `multiple`.

    Returns (model, valid_vocab_size). Ids >= valid_vocab_size are padding.
    """
    cfg = model.config
    old, new = cfg.vocab_size, _grown_vocab(cfg.vocab_size, multiple)
    grown = abstract_model(cfg.replace(vocab_size=new, mask_token_id=old))

    def resize(path, leaf):
        names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        if "embed_tokens" in names:
            return _pad_rows(leaf, new - old)
        if "lm_head" in names:
            return _pad_rows(leaf.T, new - old).T
        return leaf

    nnx.update(grown, jax.tree_util.tree_map_with_path(resize, nnx.state(model, MODEL_STATE)))
    return grown, old + 1


def prepare_model(config: Config, mesh=None) -> InitialModel:
    """The source model, with a [MASK] token appended when the recipe asks for one."""
    init = load_source_model(config, mesh)
    needs_mask = config.diffusion.objective != "ar"
    if needs_mask and config.diffusion.mask_token == "append":
        model, valid = append_mask_token(init.model, config.diffusion.vocab_multiple)
        return dataclasses.replace(init, model=model, valid_vocab_size=valid)
    check_mask_token(config.diffusion, init.model.config)
    return init


def check_mask_token(diffusion: DiffusionConfig, cfg: ModelConfig) -> None:
    """A diffusion objective needs a [MASK] id: the model's, unless one is appended."""
    if diffusion.objective != "ar" and diffusion.mask_token == "model" and cfg.mask_token_id is None:
        raise UserError("no [MASK] token: set model.mask_token_id or diffusion.mask_token='append'")


def trained_config(config: Config) -> ModelConfig:
    """The ModelConfig the trainer trains: the source's, grown by the appended [MASK] row when asked
    (for AOT compilation and other planning that must not load weights)."""
    cfg = source_config(config)
    if config.diffusion.objective != "ar" and config.diffusion.mask_token == "append":
        cfg = cfg.replace(vocab_size=_grown_vocab(cfg.vocab_size, config.diffusion.vocab_multiple), mask_token_id=cfg.vocab_size)
    return cfg


def source_config(config: Config) -> ModelConfig:
    """The ModelConfig `load_source_model` will produce, read without loading weights (fail fast)."""
    if config.init.checkpoint:
        return checkpoints.read_model_config(config.init.checkpoint)[0].replace(**numeric_overrides(config.model))
    if config.init.hf_dir:
        return model_config_from_hf(read_config_json(config.init.hf_dir)).replace(**numeric_overrides(config.model))
    return config.model
