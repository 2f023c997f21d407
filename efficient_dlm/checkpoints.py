"""Model checkpoints: orbax for the parameters, JSON for the architecture, copied tokenizer files.

Layout of a model checkpoint directory:
    model_config.json   ModelConfig fields (plus "extra": free-form metadata such as the recipe); a
                        quantized checkpoint (`edlm quantize`) records its quantization there and its
                        params/ hold the int8 / fp8 values and float32 scales (qwix QArrays)
    diffusion_spec.json a dLM's DiffusionSpec (diffusion/spec.py): [MASK], padding, block size, token shift, decoding
    params/             orbax StandardCheckpointer output (atomic: written to a temp dir, renamed),
                        with params/checksums.json (efficient_dlm.integrity) verified on every load
    tokenizer/          tokenizer.json and friends, when known
Training checkpoints (train/) reuse `model_config.json` and the tokenizer directory around an orbax
CheckpointManager; `load` reads either kind (for a training run the newest step, or `step=`; it never
falls back to an older step when the newest is missing or damaged: that is a CheckpointError).
A LoRA run's steps hold adapters only; its model_config.json extra["lora"] names the base checkpoint
(path, step, SHA-256 of its checksum manifest: `base_reference`), which `load` restores, checks and
returns with the adapters merged in (or attached, merge_lora=False).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx
from qwix import QArray

from efficient_dlm import integrity
from efficient_dlm.errors import UserError, UserFileExistsError, UserFileNotFoundError
from efficient_dlm.integrity import CheckpointError
from efficient_dlm.diffusion import spec as spec_lib
from efficient_dlm.diffusion.spec import DiffusionSpec
from efficient_dlm.models.adapters import add_adapters, merge_adapters, split_adapted
from efficient_dlm.models.config import ModelConfig
from efficient_dlm.models.lora import LoraConfig
from efficient_dlm.models.decoder import MODEL_STATE, abstract_model
from efficient_dlm.models.quantize import abstract_quantized_state
from efficient_dlm.models.routers import ExpertBias
from efficient_dlm.outputs import check_output_dir
from efficient_dlm.parallel.sharding import state_shardings

CONFIG_NAME = "model_config.json"
PARAMS_DIR = "params"
TOKENIZER_DIR = "tokenizer"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "generation_config.json",
    "chat_template.jinja",
)


def write_model_config(directory: str, cfg: ModelConfig, extra: dict[str, Any] | None = None) -> None:
    epath.Path(directory).mkdir(parents=True, exist_ok=True)
    payload = {**cfg.to_dict(), "extra": extra or {}}
    tmp = os.path.join(directory, CONFIG_NAME + ".tmp")
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True)
    os.replace(tmp, os.path.join(directory, CONFIG_NAME))


def read_model_config(directory: str) -> tuple[ModelConfig, dict[str, Any]]:
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.exists(path):
        raise UserFileNotFoundError(f"{directory}: not an efficient_dlm checkpoint (no {CONFIG_NAME})")
    try:
        with open(path) as f:
            payload = json.load(f)
        extra = payload.pop("extra", {})
        return ModelConfig.from_dict(payload), extra
    except (ValueError, TypeError, AttributeError) as err:  # bad JSON, a wrong field value, not an object
        raise CheckpointError(f"{path}: {' '.join(str(err).split())}") from None


def write_diffusion_spec(directory: str, spec: DiffusionSpec) -> None:
    """Atomic: written to a temporary file, then renamed."""
    epath.Path(directory).mkdir(parents=True, exist_ok=True)
    tmp = os.path.join(directory, spec_lib.SPEC_NAME + ".tmp")
    spec_lib.write_spec(tmp, spec)
    os.replace(tmp, os.path.join(directory, spec_lib.SPEC_NAME))


def read_diffusion_spec(directory: str, cfg: ModelConfig | None = None, extra: dict[str, Any] | None = None) -> DiffusionSpec | None:
    """The checkpoint's DiffusionSpec; for a checkpoint written before specs existed, the one its
    recorded training recipe implies; None for a plain AR model."""
    if cfg is None:
        cfg, extra = read_model_config(directory)
    path = os.path.join(directory, spec_lib.SPEC_NAME)
    spec = spec_lib.read_spec(path) if os.path.exists(path) else spec_lib.legacy_spec(cfg, extra or {})
    if spec is not None:
        spec_lib.check_model_matches(spec, cfg, path)
    return spec


def copy_tokenizer(src_dir: str | None, directory: str) -> str | None:
    """Copies known tokenizer files from src_dir into directory/tokenizer; returns that path or None."""
    if not src_dir:
        return None
    names = [n for n in TOKENIZER_FILES if os.path.exists(os.path.join(src_dir, n))]
    if not names:
        return None
    out = os.path.join(directory, TOKENIZER_DIR)
    os.makedirs(out, exist_ok=True)
    for name in names:
        shutil.copy2(os.path.join(src_dir, name), os.path.join(out, name))
    return out


def tokenizer_dir(directory: str) -> str | None:
    path = os.path.join(directory, TOKENIZER_DIR)
    return path if os.path.exists(os.path.join(path, "tokenizer.json")) else None


def save(model, directory: str, *, tokenizer_dir: str | None = None, extra: dict[str, Any] | None = None,
         force: bool = False, spec: DiffusionSpec | None = None) -> str:
    """Writes the model's parameters (orbax), config and, for a dLM, its DiffusionSpec (`spec`, else
    `model.spec`, else what a training recipe in extra["train_config"] implies, else the defaults for
    its [MASK] id); refuses to overwrite unless force.

    The parameters are written completely (orbax writes to a temporary directory and renames) before
    the config and an existing checkpoint are replaced, so a crash mid-write leaves the old checkpoint.
    """
    check_output_dir(directory, "save directory")
    directory = os.path.abspath(directory)
    params_path = epath.Path(directory) / PARAMS_DIR
    if params_path.exists() and not force:
        raise UserFileExistsError(f"{directory}: a checkpoint already exists (pass force=True / --overwrite)")
    epath.Path(directory).mkdir(parents=True, exist_ok=True)
    staged = epath.Path(directory) / f"{PARAMS_DIR}.new-{os.getpid()}"
    if staged.exists():
        staged.rmtree()
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(staged, nnx.state(model, MODEL_STATE))
    integrity.record(staged)
    if params_path.exists():
        params_path.rmtree()
    staged.rename(params_path)
    write_model_config(directory, model.config, extra)
    spec = spec or getattr(model, "spec", None) or spec_lib.legacy_spec(model.config, extra or {})
    if spec is not None:
        spec_lib.check_model_matches(spec, model.config)
        write_diffusion_spec(directory, spec)
    elif os.path.exists(os.path.join(directory, spec_lib.SPEC_NAME)):
        os.remove(os.path.join(directory, spec_lib.SPEC_NAME))  # an AR model replaced a dLM (force)
    copy_tokenizer(tokenizer_dir, directory)
    return directory


def run_steps(directory: str) -> list[int]:
    """The step numbers of a training run directory (finalized orbax step directories), ascending."""
    root = epath.Path(os.path.abspath(directory))
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit() and p.is_dir()) if root.is_dir() else []


def params_location(directory: str, step: int | None = None) -> tuple[epath.Path, str]:
    """(params directory, label) of a model checkpoint, or of `step` (default: the newest step) of a
    training run directory, verified against its checksums. Absolute: orbax refuses relative paths."""
    root = epath.Path(os.path.abspath(directory))
    if (root / PARAMS_DIR).exists():
        if step is not None:
            raise CheckpointError(f"{directory}: a model checkpoint (no training steps); drop step={step} / --step")
        integrity.verify(root / PARAMS_DIR, directory)
        return root / PARAMS_DIR, directory
    steps = run_steps(directory)
    if not steps:
        raise CheckpointError(f"{directory}: no parameters found (expected {PARAMS_DIR}/ or <step>/params/)")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise CheckpointError(f"{directory}: no step {step} (steps: {', '.join(map(str, steps))})")
    label = f"{directory} step {step}"
    integrity.verify(root / str(step), label)
    return root / str(step) / PARAMS_DIR, label


def base_reference(directory: str, step: int | None = None) -> dict[str, Any]:
    """{path, step, manifest_sha256} of a model checkpoint or a training run's step (default: the newest),
    verified now: what a LoRA run records about its base."""
    location, _ = params_location(directory, step)
    root = epath.Path(os.path.abspath(directory))
    model_checkpoint = location.parent == root
    manifest = (location if model_checkpoint else location.parent) / integrity.MANIFEST
    return {"path": os.fspath(root), "step": None if model_checkpoint else int(location.parent.name),
            "manifest_sha256": hashlib.sha256(manifest.read_bytes()).hexdigest()}


def lora_base(reference: dict[str, Any], mesh, directory: str, **overrides: Any):
    """The base model of a LoRA run (reference: base_reference's record), refused when its files
    changed since the run started."""
    now = base_reference(reference["path"], reference["step"])
    if now["manifest_sha256"] != reference["manifest_sha256"]:
        raise CheckpointError(f"{directory}: its LoRA base {reference['path']} changed since the run started "
                              "(checksum manifest differs); restore that base or retrain the adapters")
    return load(reference["path"], mesh=mesh, step=reference["step"], **overrides)


def _load_lora_run(directory: str, record: dict[str, Any], mesh, step: int | None, merge: bool):
    """The base of a LoRA run with the run's adapters (from `step`, default the newest) attached or merged."""
    lora = LoraConfig(record["rank"], record["alpha"], record["dropout"], tuple(record["targets"]), record["base_dtype"])
    model = add_adapters(lora_base(record["base"], mesh, directory), lora)
    target = split_adapted(model)[1]
    if mesh is not None:
        shardings = state_shardings(target, mesh)
        target = jax.tree.map(lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s), target, shardings)
    location, _ = params_location(directory, step)
    with ocp.StandardCheckpointer() as ckptr:
        nnx.update(model, ckptr.restore(location, target))
    return merge_adapters(model) if merge else model


def load(directory: str, *, mesh=None, dtype: str | None = None, step: int | None = None, merge_lora: bool = True,
         **overrides: Any):
    """Restores a `Decoder` from a checkpoint directory, sharded over `mesh` when given.

    A dLM comes back with its DiffusionSpec as `model.spec` (None for an AR model), so
    `generate(load(d), prompts, max_new_tokens=n)` decodes it as it was trained. overrides: ModelConfig
    fields (dtype, attention backend, ...).
    step: for a training run directory, the step to read (default: the newest; never an older one in
    its place). The files are checked against the checksums recorded at save time first
    (CheckpointError naming the step and the file).
    A LoRA run comes back as its base with the adapters merged into the weights (a plain Decoder), or
    with merge_lora=False as the base carrying the adapters (overrides then do not apply).
    """
    cfg, extra = read_model_config(directory)
    spec = read_diffusion_spec(directory, cfg, extra)
    if dtype is not None:
        overrides = {"dtype": dtype, "param_dtype": dtype, **overrides}
    stored_cfg = cfg
    cfg = cfg.replace(**overrides) if overrides else cfg
    if extra.get("lora"):
        model = _load_lora_run(directory, extra["lora"], mesh, step, merge_lora)
        if merge_lora and cfg != model.config:
            model = _with_config(model, cfg)
        return spec_lib.with_spec(model, spec)
    check_quantization_kept(stored_cfg, cfg, directory)
    if stored_cfg.quantize != "none":  # restored straight into the quantized structure: no float copy exists
        model, target = abstract_quantized_state(stored_cfg)
    else:
        model = abstract_model(stored_cfg)
        target = nnx.state(model, MODEL_STATE)
    if mesh is not None:

        shardings = state_shardings(target, mesh)
        target = jax.tree.map(
            lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s), target, shardings
        )
    location, _ = params_location(directory, step)
    with ocp.StandardCheckpointer() as ckptr:
        state = ckptr.restore(location, target)
    nnx.update(model, state)
    if cfg != stored_cfg:
        model = _with_config(model, cfg)
    return spec_lib.with_spec(model, spec)


def check_quantization_kept(stored: ModelConfig, cfg: ModelConfig, directory: str) -> None:
    """A quantized checkpoint's weights are what they are: an override cannot change how they are stored."""
    changed = [f for f in ("quantize", "quantize_lm_head", "quantize_embed") if getattr(stored, f) != getattr(cfg, f)]
    if stored.quantize != "none" and changed:
        raise UserError(f"{directory}: a {stored.quantize}-quantized checkpoint; model.{changed[0]} cannot be overridden")


def _with_config(model, cfg: ModelConfig):
    """The same parameters (cast to cfg.param_dtype; quantized weights as they are) under a changed config
    (dtype, backend, ...)."""
    fresh = abstract_model(cfg)
    params = jax.tree.map(lambda x: x if isinstance(x, QArray) else x.astype(cfg.weight_dtype),
                          nnx.state(model, nnx.Param), is_leaf=lambda x: isinstance(x, QArray))
    nnx.update(fresh, params, nnx.state(model, ExpertBias))
    return fresh
