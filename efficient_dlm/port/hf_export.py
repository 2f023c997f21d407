"""Export to a Hugging Face model directory: `to_hf(model_or_checkpoint, out_dir, ...)`.

The directory holds config.json, generation_config.json, safetensors (sharded with an index when
larger than max_shard_size), the tokenizer files and a model card. A dLM (a model with a [MASK]
token) is written as model_type "edlm_<base>" with our PyTorch modeling files (port/modeling/), so
`transformers` loads it with trust_remote_code=True; a plain AR model is written in its original
architecture's format, so HF -> efficient_dlm -> HF reproduces the source tensors exactly.

Tensor names come from the per-family tables in keymaps.py (their `Layout.to_hf` is the exact
inverse of import). Parameters are gathered to the host one HF tensor at a time (one layer of a
stacked parameter), so host memory stays bounded by the largest single tensor.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from efficient_dlm import checkpoints
from efficient_dlm.diffusion.spec import DiffusionSpec, default_spec, spec_of
from efficient_dlm.errors import UserError, UserFileExistsError, UserFileNotFoundError
from efficient_dlm.models.config import DTYPES, ModelConfig
from efficient_dlm.models.decoder import MODEL_STATE
from efficient_dlm.models.quantize import Quantization
from efficient_dlm.outputs import check_output_dir
from efficient_dlm.port import hf_config_out, keymaps, model_card
from efficient_dlm.port.safetensors_writer import TensorSpec, parse_size, write_sharded

log = logging.getLogger("efficient_dlm")

FORMATS = ("auto", "dlm", "ar")
MODELING_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "modeling")
MODELING_FILES = ("configuration_edlm.py", "modeling_edlm.py", "moe_edlm.py", "decoding_edlm.py", "speculative_edlm.py")
# A tokenizer directory must hold one of these to be loadable by AutoTokenizer.
TOKENIZER_MAIN_FILES = ("tokenizer.json", "tokenizer.model")
METRICS_FILE = "metrics.jsonl"  # written by the trainer (train/metrics.py) in a run directory


# ---- inputs -------------------------------------------------------------------------------------------


def _describe_source(model) -> tuple[ModelConfig, dict[str, Any], str | None, DiffusionSpec | None]:
    """(config, checkpoint metadata "extra", checkpoint tokenizer dir, DiffusionSpec), without loading any weights."""
    if isinstance(model, (str, os.PathLike)):
        path = os.fspath(model)
        if not os.path.isdir(path):
            raise UserFileNotFoundError(f"{path}: checkpoint directory not found")
        cfg, extra = checkpoints.read_model_config(path)  # FileNotFoundError naming the path when not a checkpoint
        return cfg, extra, checkpoints.tokenizer_dir(path), checkpoints.read_diffusion_spec(path, cfg, extra)
    if not isinstance(getattr(model, "config", None), ModelConfig):
        raise UserError(f"to_hf takes an efficient_dlm model or a checkpoint directory, got {type(model).__name__}")
    return model.config, {}, None, spec_of(model)


def _check_out_dir(out_dir: str, overwrite: bool, sources: list[str | None]) -> None:
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserFileExistsError(f"{out_dir}: exists and is not a directory")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise UserFileExistsError(f"{out_dir}: directory is not empty (pass --overwrite / overwrite=True to replace it)")
    out = os.path.realpath(out_dir)
    for source in filter(None, sources):
        src = os.path.realpath(source)
        if src == out or src.startswith(out + os.sep):
            raise UserError(f"{out_dir}: output directory contains the source {source}; choose another --out")


def resolve_tokenizer(tokenizer_dir: str | None, checkpoint_tokenizer: str | None) -> str:
    """The tokenizer directory to copy: the explicit one, else the checkpoint's; one clear error otherwise."""
    if tokenizer_dir:
        if not os.path.isdir(tokenizer_dir):
            raise UserFileNotFoundError(f"--tokenizer_dir {tokenizer_dir}: not a directory")
        if not any(os.path.exists(os.path.join(tokenizer_dir, n)) for n in TOKENIZER_MAIN_FILES):
            raise UserFileNotFoundError(f"--tokenizer_dir {tokenizer_dir}: no {' or '.join(TOKENIZER_MAIN_FILES)} found")
        return tokenizer_dir
    if checkpoint_tokenizer:
        return checkpoint_tokenizer
    raise UserFileNotFoundError(
        "no tokenizer to export: the checkpoint has no tokenizer/ directory; pass --tokenizer_dir "
        "(tokenizer_dir=) pointing at a directory with tokenizer.json"
    )


def export_spec(spec: DiffusionSpec | None, cfg: ModelConfig, **given: Any) -> DiffusionSpec:
    """The spec written to config.json: the model's, with the decoding defaults given (not None)
    replaced; token shift and vocabulary padding are what the model was trained with (refused if
    contradicted: the export would decode wrongly)."""
    if cfg.mask_token_id is None:
        raise UserError("a dLM export needs model.mask_token_id (the [MASK] token the model was trained to fill)")
    spec = spec or default_spec(cfg)
    if given.get("token_shift") is not None and bool(given["token_shift"]) != spec.token_shift:
        raise UserError(f"token_shift={given['token_shift']} contradicts the model's diffusion spec "
                        f"(trained with token_shift={spec.token_shift}); leave it unset")
    changes = {k: v for k, v in given.items() if v is not None and k != "token_shift"}
    return spec.replace(**changes) if changes else spec


def recorded_metrics(checkpoint: str | None, step: int | None = None) -> dict[str, dict[str, Any]]:
    """The last logged record of each kind ("train", "eval") in a training run's metrics.jsonl, up to
    `step` when given (the exported step, so the card describes the weights it ships)."""
    path = os.path.join(checkpoint, METRICS_FILE) if checkpoint else ""
    last: dict[str, dict[str, Any]] = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a killed run; the card reports what was written
                if step is None or record.get("step", 0) <= step:
                    last[str(record.pop("kind", "train"))] = record
    return last


def _is_dlm(cfg: ModelConfig, fmt: str) -> bool:
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt == "dlm" and cfg.mask_token_id is None:
        raise UserError("format 'dlm' needs a model with model.mask_token_id set (this one is a plain AR model)")
    return fmt == "dlm" or (fmt == "auto" and cfg.mask_token_id is not None)


# ---- tensors ------------------------------------------------------------------------------------------


def _host(x: jax.Array) -> np.ndarray:
    """One tensor on this host: a local copy, or an all-gather when other processes hold shards."""
    if x.is_fully_addressable:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _state(model) -> dict[tuple[str, ...], Any]:
    return {tuple(str(p) for p in path): leaf for path, leaf in nnx.to_flat_state(nnx.state(model, MODEL_STATE))}


def tensor_plan(model, dtype: str) -> list[tuple[TensorSpec, keymaps.Rule, tuple[int, ...]]]:
    """(HF tensor spec, rule, index into the stacked parameter) for every tensor to write, in table order."""
    cfg: ModelConfig = model.config
    params = _state(model)
    rules = keymaps.rules_for(cfg)
    uncovered = sorted(set(params) - {rule.path for rule in rules})
    if uncovered:
        raise UserError(f"no HF tensor name for parameter(s) {', '.join('/'.join(p) for p in uncovered)}")
    np_dtype = np.dtype(jnp.dtype(dtype))
    plan = []
    for rule in rules:
        shape = params[rule.path].shape[len(keymaps.stack_shape(rule, cfg)):]
        hf_shape = tuple(rule.layout.to_hf(np.empty(shape, np.uint8), cfg).shape)
        # Non-trained state (the MoE selection bias) keeps its float32, as transformers keeps it.
        spec_dtype = np_dtype if isinstance(params[rule.path], nnx.Param) else np.dtype(params[rule.path].dtype)
        for name, index in keymaps.named_slices(rule, cfg):
            plan.append((TensorSpec(name, hf_shape, spec_dtype), rule, index))
    return plan


def _producer(model, plan):
    """produce(spec) -> the HF tensor, gathered from the model one layer (or expert) slice at a time."""
    cfg, params = model.config, _state(model)
    by_name = {spec.name: (rule, index) for spec, rule, index in plan}

    def produce(spec: TensorSpec) -> np.ndarray:
        rule, index = by_name[spec.name]
        value = params[rule.path][...][index]
        return rule.layout.to_hf(_host(value.astype(spec.dtype)), cfg)

    return produce


# ---- the export ---------------------------------------------------------------------------------------


def _copy_tokenizer(src: str, out: str) -> list[str]:
    names = [n for n in checkpoints.TOKENIZER_FILES if n != "generation_config.json" and os.path.exists(os.path.join(src, n))]
    for name in names:
        shutil.copy2(os.path.join(src, name), os.path.join(out, name))
    return names


def _special_tokens_config(cfg: ModelConfig, tokenizer_json: str) -> dict[str, Any]:
    """A tokenizer_config.json naming the special tokens, for a tokenizer that came without one.

    Without it, AutoTokenizer knows no EOS, pad or [MASK] token (batches cannot even be padded).
    The pad token falls back to EOS, as generate pads finished rows with it.
    """
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(tokenizer_json)
    ids = {"bos_token": cfg.bos_token_id, "eos_token": cfg.eos_token_id, "mask_token": cfg.mask_token_id}
    ids["pad_token"] = cfg.pad_token_id if cfg.pad_token_id is not None else cfg.eos_token_id
    out: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast"}
    for name, token_id in ids.items():
        token = tokenizer.id_to_token(token_id) if token_id is not None else None
        if token is not None:
            out[name] = token
    return out


def _write_json(path: str, payload: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
        f.write("\n")


def _write_modeling(out: str, base_model_type: str) -> None:
    """Copies the modeling files, naming the base family in the config class's model_type."""
    for name in MODELING_FILES:
        with open(os.path.join(MODELING_DIR, name)) as f:
            text = f.read()
        if name == "configuration_edlm.py":
            old = 'model_type = "edlm"'
            if text.count(old) != 1:
                raise RuntimeError(f"{name}: expected one `{old}` line to specialise")
            text = text.replace(old, f'model_type = "{hf_config_out.DLM_PREFIX}{base_model_type}"')
        with open(os.path.join(out, name), "w") as f:
            f.write(text)


def to_hf(
    model,
    out_dir: str,
    *,
    tokenizer_dir: str | None = None,
    dtype: str | None = None,
    overwrite: bool = False,
    max_shard_size: int | str = "5GB",
    format: str = "auto",
    block_size: int | None = None,
    token_shift: bool | None = None,
    strategy: str | None = None,
    threshold: float | None = None,
    step: int | None = None,
    tokens_per_step: int | None = None,
    factor: float | None = None,
    entropy_bound: float | None = None,
    merge_lora: bool = False,
) -> str:
    """Writes `model` (a Decoder, or an efficient_dlm checkpoint directory) as a Hugging Face directory.

    dtype: tensor dtype (float32 / bfloat16 / float16); default the model's parameter dtype.
    format: "auto" (dLM when the model has a mask token, else AR), "dlm" or "ar".
    block_size / strategy / threshold / tokens_per_step / factor / entropy_bound: the exported decoding
    defaults; unset ones come from the model's DiffusionSpec (the checkpoint's, or `model.spec`);
    token_shift may only restate the spec's.
    step: for a training run directory, the step to export (default: the newest; never an older one
    in its place: a missing or damaged newest step is an error).
    merge_lora: a LoRA run is exported as its base with the adapters merged into the weights (required
    for a LoRA run: its unmerged adapters export with port/peft_export.py, `--peft`).
    Everything is validated before any work; the directory is written under a temporary name and
    renamed, so it is complete or absent. Returns out_dir.
    """
    if dtype is not None and dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    max_shard_bytes = parse_size(max_shard_size)
    checkpoint = os.fspath(model) if isinstance(model, (str, os.PathLike)) else None
    _check_out_dir(out_dir, overwrite, [checkpoint, tokenizer_dir])
    check_output_dir(out_dir, "out_dir")
    cfg, extra, ckpt_tokenizer, spec = _describe_source(model)
    if extra.get("lora") and not merge_lora:
        raise UserError(f"{checkpoint} is a LoRA run: pass --merge_lora for a merged model, or --peft for its adapters")
    if cfg.quantize != "none" or cfg.quantize_kv != "none":
        raise UserError(
            f"export of a quantized model ({Quantization.of(cfg).describe()}) is refused: transformers would not "
            "reproduce it; export the float checkpoint it was quantized from"
        )
    tokenizer = resolve_tokenizer(tokenizer_dir, ckpt_tokenizer)
    dlm = None
    if _is_dlm(cfg, format):
        dlm = export_spec(spec, cfg, block_size=block_size, token_shift=token_shift, strategy=strategy, threshold=threshold,
                          tokens_per_step=tokens_per_step, factor=factor, entropy_bound=entropy_bound)
    dtype = dtype or cfg.param_dtype
    config_json = hf_config_out.dlm_config(cfg, dlm, dtype) if dlm else hf_config_out.ar_config(cfg, dtype)
    if checkpoint is not None:  # every argument is valid: now the weights
        model = checkpoints.load(checkpoint, step=step)  # verified; the newest step unless `step`
    plan = tensor_plan(model, dtype)

    writer = jax.process_index() == 0
    tmp = os.path.abspath(out_dir).rstrip(os.sep) + ".tmp-export"
    if writer:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    files = write_sharded(tmp, [spec for spec, _, _ in plan], _producer(model, plan), max_shard_bytes, writer)
    if not writer:
        return out_dir
    _write_json(os.path.join(tmp, "config.json"), config_json)
    source_generation = os.path.join(tokenizer, "generation_config.json")
    if dlm is None and os.path.exists(source_generation):
        shutil.copy2(source_generation, os.path.join(tmp, "generation_config.json"))
    else:
        _write_json(os.path.join(tmp, "generation_config.json"), hf_config_out.generation_config(cfg, dlm))
    copied = _copy_tokenizer(tokenizer, tmp)
    if "tokenizer.json" in copied and "tokenizer_config.json" not in copied:
        _write_json(os.path.join(tmp, "tokenizer_config.json"), _special_tokens_config(cfg, os.path.join(tmp, "tokenizer.json")))
    if dlm is not None:
        _write_modeling(tmp, cfg.model_type)
    with open(os.path.join(tmp, "README.md"), "w") as f:
        name = os.path.basename(os.path.abspath(out_dir))
        f.write(model_card.render(cfg, dlm, extra, dtype, name, recorded_metrics(checkpoint, step)))
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    log.info("exported %s (%s, %d tensor files, tokenizer: %s)", out_dir, config_json["model_type"], len(files), ", ".join(copied))
    return out_dir

