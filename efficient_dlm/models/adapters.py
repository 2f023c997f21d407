"""Adding LoRA adapters to a built `Decoder`, splitting them from the frozen base, merging them back.

`add_adapters(model, lora, seed)` walks the model's modules; every projection a module declares
(`LORA_PROJECTIONS` of Attention and MLP, `LORA_EXPERT_WEIGHTS` of MoEBlock) that `lora.targets`
names gets A and B as `nnx.LoRAParam` beside its weight (`q_proj_lora_a`, `q_proj_lora_b`), with the
weight's leading stack axes ("layers", and "experts" for routed experts) and its logical axis names,
so adapters are stacked and scanned with their layer and sharded by the same rules table as the
base (the rank axis "lora_rank" is replicated). The math is models/lora.py.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from efficient_dlm.errors import UserError
from efficient_dlm.models.decoder import MODEL_STATE, Decoder, abstract_model
from efficient_dlm.models.lora import (
    EXPERTS, KEY, RANK_AXIS, SUFFIX_A, SUFFIX_B, LoraConfig, LoraDropoutKey, merged, split_equation,
)


def _targets(module: nnx.Module, lora: LoraConfig) -> dict[str, tuple[int, int]]:
    """{weight name: (contracted dims, remaining dims)} of the module's projections that lora targets."""
    kind = type(module)
    out = {}
    for name, equation in getattr(kind, "LORA_PROJECTIONS", {}).items():
        if name in lora.targets:
            _, contracted, remaining, _ = split_equation(equation)
            out[name] = (len(contracted), len(remaining))
    if EXPERTS in lora.targets:
        out.update({name: (1, 1) for name in getattr(kind, "LORA_EXPERT_WEIGHTS", ())})
    return out


def _lora_param(value: jax.Array, names: tuple) -> nnx.LoRAParam:
    return nnx.LoRAParam(value, out_sharding=names, eager_sharding=False)


def add_adapters(model: nnx.Module, lora: LoraConfig, seed: int = 0, *, train: bool = False) -> nnx.Module:
    """Adds the adapters of `lora` to `model` in place and returns it. A: uniform(+-1 / sqrt(fan_in))
    (PEFT's kaiming-uniform with a = sqrt(5)), B: zeros, in the model's parameter dtype. train: also a
    dropout key per adapted module (lora.dropout > 0), which only the train step's graph carries."""
    dtype = model.config.weight_dtype
    key = jax.random.PRNGKey(seed)
    count = 0
    for _, module in nnx.iter_modules(model):
        targets = _targets(module, lora)
        lead_shape = None
        for name, (n_con, n_rem) in sorted(targets.items()):
            weight = getattr(module, name)
            shape, names = weight.shape, weight.get_metadata()["out_sharding"]
            lead = len(shape) - n_con - n_rem
            con, rem = shape[lead : lead + n_con], shape[lead + n_con :]
            bound = 1.0 / math.sqrt(math.prod(con))
            a = jax.random.uniform(jax.random.fold_in(key, count), (*shape[:lead], *con, lora.rank), dtype, -bound, bound)
            setattr(module, name + SUFFIX_A, _lora_param(a, (*names[: lead + n_con], RANK_AXIS)))
            b = jnp.zeros((*shape[:lead], lora.rank, *rem), dtype)
            setattr(module, name + SUFFIX_B, _lora_param(b, (*names[:lead], RANK_AXIS, *names[lead + n_con :])))
            count += 1
            if name in getattr(type(module), "LORA_PROJECTIONS", {}):
                lead_shape = (shape[:lead], names[:lead])
        if targets:
            module.lora = lora
        if train and lora.dropout > 0 and lead_shape is not None:
            shape, names = lead_shape
            setattr(module, KEY, LoraDropoutKey(jnp.zeros((*shape, 2), jnp.uint32), out_sharding=(*names, None),
                                                eager_sharding=False))
    if not count:
        raise UserError(f"lora.targets {','.join(lora.targets)} match no projection of this model "
                        "(experts: a MoE model's routed experts)")
    return model


def abstract_adapted(cfg, lora: LoraConfig, train: bool = False) -> nnx.Module:
    """The adapted model's structure with ShapeDtypeStruct leaves (nothing allocated)."""
    return nnx.eval_shape(lambda: add_adapters(Decoder(cfg, rngs=nnx.Rngs(params=0)), lora, train=train))


def split_adapted(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State, nnx.State]:
    """(graphdef, adapters, frozen base (Params and the MoE selection bias), dropout keys)."""
    graphdef, adapters, base, keys, rest = nnx.split(model, nnx.LoRAParam, MODEL_STATE, LoraDropoutKey, ...)
    if jax.tree.leaves(rest):
        raise ValueError("an adapted model holds only LoRAParam, Param, ExpertBias and dropout keys")
    return graphdef, adapters, base, keys


def fill_dropout_keys(keys: nnx.State, key: jax.Array) -> nnx.State:
    """The dropout keys for one forward: a fresh key per module and per stacked layer."""
    flat = nnx.to_flat_state(keys)
    out = []
    for i, (path, var) in enumerate(flat):
        lead = var.shape[:-1]
        value = jax.random.split(jax.random.fold_in(key, i), math.prod(lead)).reshape(*lead, 2)
        out.append((path, var.replace(value)))
    return nnx.from_flat_state(out)


def merged_state(base: nnx.State, adapters: nnx.State, lora: LoraConfig, dtype) -> nnx.State:
    """The base state with every adapted weight replaced by W + (alpha / r) A B (computed in float32,
    stored in `dtype`): the plain model the adapters amount to."""
    flat = dict(nnx.to_flat_state(adapters))
    out = []
    for path, var in nnx.to_flat_state(base):
        a = flat.get((*path[:-1], path[-1] + SUFFIX_A))
        if a is not None:
            b = flat[(*path[:-1], path[-1] + SUFFIX_B)]
            var = var.replace(merged(var[...], a[...], b[...], lora.scale).astype(dtype))
        elif isinstance(var, nnx.Param):
            var = var.replace(var[...].astype(dtype))
        out.append((path, var))
    return nnx.from_flat_state(out)


def merge_adapters(model: nnx.Module) -> nnx.Module:
    """A plain `Decoder` (no adapters) computing what the adapted `model` computes, in its param dtype."""
    cfg = model.config
    lora = next(m.lora for _, m in nnx.iter_modules(model) if getattr(m, "lora", None) is not None)
    _, adapters, base, _ = split_adapted(model)
    plain = abstract_model(cfg)
    nnx.update(plain, merged_state(base, adapters, lora, cfg.weight_dtype))
    return plain
