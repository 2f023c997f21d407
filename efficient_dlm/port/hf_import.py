"""Import a local Hugging Face model directory into our Flax model, memory-mapped and shard-aware.

Every parameter is built with `jax.make_array_from_callback`: the callback reads, from the
memory-mapped safetensors, only the slice of the HF tensor(s) that the requested device shard needs,
applies the layout view of the key map, and casts. On one device that is the whole tensor; on a mesh
each process touches only its own shards, so a 100B model is never gathered on one host.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from efficient_dlm.diffusion.spec import with_spec
from efficient_dlm.errors import UserError
from efficient_dlm.models.config import DTYPES, ModelConfig
from efficient_dlm.models.decoder import abstract_model
from efficient_dlm.port import keymaps
from efficient_dlm.port.hf_config import model_config_from_hf, read_config_json, spec_from_hf
from efficient_dlm.port.safetensors_io import CheckpointError, SafetensorsCheckpoint
from efficient_dlm.parallel.sharding import state_shardings

log = logging.getLogger("efficient_dlm")


def _param_paths(state) -> dict[tuple[str, ...], Any]:
    return {tuple(str(p) for p in path): leaf for path, leaf in nnx.to_flat_state(state)}


def _empty_in_layout(view: np.ndarray, leading: tuple[int, ...], dtype) -> np.ndarray:
    """Uninitialised [*leading, *view.shape] whose trailing axes lie in memory in the order view's do.

    The key maps' layouts are transposed views of the files; copying one into a C-ordered array is a
    strided gather that NumPy runs ~40x slower than a copy in matching order. So we copy in the file's
    order (a cast at memory speed) and let the device transfer change the layout.
    """
    order = sorted(range(view.ndim), key=lambda k: -abs(view.strides[k]))  # outermost axis first
    lead = len(leading)
    base = np.empty((*leading, *(view.shape[k] for k in order)), dtype)
    return base.transpose(*range(lead), *(lead + order.index(k) for k in range(view.ndim)))


def _slice_reader(ckpt: SafetensorsCheckpoint, rule: keymaps.Rule, cfg: ModelConfig, dtype) -> Callable:
    """callback(index) -> np.ndarray for make_array_from_callback, reading only the requested slice.

    A stacked parameter's leading axes (layers, and experts for per-expert tensors) select HF tensors,
    the rest of the index slices them. The slice is filled tensor by tensor into one preallocated
    array (cast on assignment), so the host holds one converted copy, never a list plus a stack.
    """
    lead = keymaps.stack_shape(rule, cfg)
    views = {at: rule.layout.to_ours(ckpt.tensor(name), cfg) for name, at in keymaps.named_slices(rule, cfg)}

    def read(index: tuple[slice, ...]) -> np.ndarray:
        if not lead:
            return np.asarray(views[()][index], dtype=dtype)  # a cast keeps the view's memory order
        picks = [range(n)[sl] for n, sl in zip(lead, index)]
        rest = index[len(lead):]
        first = views[tuple(p[0] if len(p) else 0 for p in picks)][rest]
        out = _empty_in_layout(first, tuple(len(p) for p in picks), dtype)
        for at in np.ndindex(*out.shape[: len(lead)]):
            out[at] = views[tuple(p[i] for p, i in zip(picks, at))][rest]
        return out

    return read


def check_tensors(ckpt: SafetensorsCheckpoint, cfg: ModelConfig, abstract: dict) -> None:
    """Missing, unexpected and mis-shaped tensors, each reported by name in one line."""
    expected: dict[str, keymaps.Rule] = {}
    for rule in keymaps.rules_for(cfg):
        for name in keymaps.hf_names(rule, cfg):
            expected[name] = rule
    missing = [n for n in expected if n not in ckpt]
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise CheckpointError(f"{ckpt.directory}: missing tensor(s) {', '.join(missing[:3])}{more}")
    tied_head = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    unexpected = [
        n for n in ckpt.keys() if n not in expected and n not in tied_head and not n.endswith(keymaps.IGNORED_SUFFIXES)
    ]
    if unexpected:
        more = f" (and {len(unexpected) - 3} more)" if len(unexpected) > 3 else ""
        raise CheckpointError(f"{ckpt.directory}: unexpected tensor(s) {', '.join(unexpected[:3])}{more}")
    shapes: dict[keymaps.Rule, tuple[int, ...]] = {}
    for name, rule in expected.items():
        if rule not in shapes:
            target = abstract[rule.path].shape
            shapes[rule] = _hf_shape(rule, cfg, target[len(keymaps.stack_shape(rule, cfg)):])
        want = shapes[rule]
        if tuple(ckpt.shape(name)) != want:
            raise CheckpointError(f"{ckpt.directory}: tensor {name} has shape {ckpt.shape(name)}, config expects {want}")
        if not jnp.issubdtype(ckpt.dtype(name), jnp.floating):  # jnp knows bfloat16
            raise CheckpointError(f"{ckpt.directory}: tensor {name} has dtype {ckpt.dtype(name)}, expected a float type")


def _hf_shape(rule: keymaps.Rule, cfg: ModelConfig, target) -> tuple[int, ...]:
    """The HF shape of one (per-layer) parameter of shape `target`, traced abstractly (no allocation)."""
    return tuple(jax.eval_shape(lambda w: rule.layout.to_hf(w, cfg), jax.ShapeDtypeStruct(target, np.float32)).shape)


def load_hf_params(directory: str, cfg: ModelConfig, model_abstract, shardings=None, progress: bool = False):
    """Returns the model's nnx.State filled from the safetensors in `directory`.

    shardings: a state-shaped tree of jax.sharding.Sharding (sharded loading) or None (one device).
    Parameters are materialised one at a time, so host memory beyond the model itself is bounded by
    about one parameter (docs/BENCHMARKS.md "HF import" measures it).
    """
    ckpt = SafetensorsCheckpoint(directory)
    state = nnx.state(model_abstract)
    abstract = _param_paths(state)
    check_tensors(ckpt, cfg, abstract)
    flat_shardings = _param_paths(shardings) if shardings is not None else {}
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    rules = keymaps.rules_for(cfg)
    covered = {rule.path for rule in rules}
    uncovered = sorted(set(abstract) - covered)
    if uncovered:
        raise CheckpointError(f"no HF tensor maps to parameter(s) {', '.join('/'.join(p) for p in uncovered)}")
    values: dict[tuple[str, ...], jax.Array] = {}
    for rule in tqdm(rules, desc="import", unit="tensor", disable=not progress):
        leaf = abstract[rule.path]
        sharding = flat_shardings.get(rule.path, default)
        sharding = getattr(sharding, "value", sharding)
        reader = _slice_reader(ckpt, rule, cfg, leaf.dtype)
        # Waiting here bounds host memory to the model plus one parameter in conversion.
        values[rule.path] = jax.make_array_from_callback(leaf.shape, sharding, reader).block_until_ready()
        ckpt.release(keymaps.hf_names(rule, cfg))  # its pages leave our resident set (page cache keeps them)
    flat = [(path, leaf.replace(values[tuple(str(p) for p in path)])) for path, leaf in nnx.to_flat_state(state)]
    return nnx.from_flat_state(flat)


def from_hf(path: str, *, dtype: str = "float32", mesh=None, progress: bool = False, **overrides: Any):
    """Loads a local HF directory (config.json + safetensors) as a `Decoder`.

    dtype: parameter and compute dtype (float32, bfloat16 or float16), whatever the files store.
    mesh: a jax.sharding.Mesh; parameters are created sharded by the logical-axis rules.
    overrides: ModelConfig fields to change after reading config.json (e.g. attention_backend).
    A dLM exported by `to_hf` comes back with its DiffusionSpec as `model.spec`.
    """
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if mesh is not None and not isinstance(mesh, jax.sharding.Mesh):
        raise UserError(f"mesh must be a jax.sharding.Mesh or None, got {type(mesh).__name__}")
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: not a directory (from_hf takes a local Hugging Face model directory)")
    start = time.perf_counter()
    hf = read_config_json(path)
    cfg = model_config_from_hf(hf, dtype=dtype)
    if overrides:
        cfg = ModelConfig.from_dict({**cfg.to_dict(), **overrides})
    model = abstract_model(cfg)
    shardings = None
    if mesh is not None:

        shardings = state_shardings(model, mesh)
    state = load_hf_params(path, cfg, model, shardings, progress)
    nnx.update(model, state)
    log.info("imported %s (%s) in %.1fs", path, cfg.model_type, time.perf_counter() - start)
    return with_spec(model, spec_from_hf(hf))  # a dLM export records how it decodes
