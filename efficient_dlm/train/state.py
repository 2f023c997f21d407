"""The train state (a pytree) and how it is built: concrete, abstract (for restore / AOT), sharded.

TrainState holds everything a resumed run needs besides the data iterator: step, parameters (an
`nnx.State` of the model's Params, fp32 master weights), optimizer state and the run's PRNG key.
The model's graph definition is static and rebuilt from the ModelConfig, so the state is a plain
pytree that jit, orbax and AOT compilation handle directly.

With LoRA (`lora`, a models.lora.LoraConfig) `params` are the adapters only (nnx.LoRAParam), so
the optimizer state holds moments for the adapters only, and `frozen` holds the base model's state
(optionally cast to lora.base_dtype): an input of the step that it returns untouched, never
checkpointed with the run (the run records where the base is; train/lora.py).
"""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from efficient_dlm.models.adapters import abstract_adapted, split_adapted
from efficient_dlm.models.config import ModelConfig
from efficient_dlm.models.decoder import MODEL_STATE, abstract_model
from efficient_dlm.models.lora import LoraConfig
from efficient_dlm.parallel.sharding import state_shardings as param_shardings


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken (= batches consumed)
    params: nnx.State
    opt_state: Any
    rng: jax.Array  # uint32[2]: the run's key; step t uses fold_in(rng, t)
    frozen: Any = None  # LoRA: the frozen base state (not checkpointed); None for full fine-tuning


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, params): the model's persistent state, nnx.Param plus the MoE selection bias
    (ExpertBias: zero gradient; the step sets it, see models/moe.py with_updated_expert_bias)."""
    graphdef, params, rest = nnx.split(model, MODEL_STATE, ...)
    if jax.tree.leaves(rest):
        raise ValueError("the trainer expects a model whose variables are all nnx.Param or ExpertBias")
    return graphdef, params


def outside_mesh():
    """A context without an active mesh. NNX would turn the parameters' *logical* axis names into mesh
    shardings while building a model under `jax.set_mesh`; the trainer builds structure (graphdef,
    abstract state) here and derives shardings itself from the rules table."""
    return jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), ()))


def cast_base(base: nnx.State, lora: LoraConfig) -> nnx.State:
    """The frozen base with its Params in lora.base_dtype (when set; the MoE selection bias keeps its
    dtype). Works on abstract states (ShapeDtypeStruct leaves) too."""
    if not lora.base_dtype:
        return base
    dtype = jnp.dtype(lora.base_dtype)

    def cast(v):
        if not isinstance(v, nnx.Param):
            return v
        x = v.get_value()
        if isinstance(x, jax.ShapeDtypeStruct):
            return v.replace(jax.ShapeDtypeStruct(x.shape, dtype, sharding=x.sharding))
        return v.replace(x.astype(dtype))

    return jax.tree.map(cast, base, is_leaf=lambda x: isinstance(x, nnx.Variable))


def trainable_split(model: nnx.Module, lora: LoraConfig | None) -> tuple[nnx.GraphDef, nnx.State, nnx.State | None]:
    """(graphdef, trained params, frozen base or None): the adapters and the (cast) base of an adapted
    model under LoRA, else the whole model state and None."""
    if lora is None:
        return (*split_model(model), None)
    graphdef, adapters, base, _ = split_adapted(model)
    return graphdef, adapters, cast_base(base, lora)


def abstract_split(cfg: ModelConfig, lora: LoraConfig | None = None, train: bool = False):
    """trainable_split of the model's structure (nothing allocated); train: the graph with the LoRA
    dropout keys (the train step's)."""
    with outside_mesh():
        if lora is None:
            return (*split_model(abstract_model(cfg)), None)
        graphdef, adapters, base, _ = split_adapted(abstract_adapted(cfg, lora, train))
        return graphdef, adapters, cast_base(base, lora)


def dropout_key_template(cfg: ModelConfig, lora: LoraConfig) -> nnx.State:
    """The structure of the train graph's LoRA dropout keys (models/adapters.py fill_dropout_keys)."""
    with outside_mesh():
        return split_adapted(abstract_adapted(cfg, lora, train=True))[3]


def graphdef_for(cfg: ModelConfig, lora: LoraConfig | None = None, train: bool = False) -> nnx.GraphDef:
    return abstract_split(cfg, lora, train)[0]


def init_state(params: nnx.State, tx: optax.GradientTransformation, seed: int, frozen: nnx.State | None = None) -> TrainState:
    return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), jax.random.PRNGKey(seed), frozen)


def abstract_state(cfg: ModelConfig, tx: optax.GradientTransformation, seed: int = 0, lora: LoraConfig | None = None) -> TrainState:
    """ShapeDtypeStruct tree of the state (no allocation): restore target and AOT input."""
    _, params, frozen = abstract_split(cfg, lora)
    with outside_mesh():
        return jax.eval_shape(lambda p, f: init_state(p, tx, seed, f), params, frozen)


def state_shardings(cfg: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh, lora: LoraConfig | None = None) -> TrainState:
    """NamedShardings for every leaf: params (and the frozen base) by the logical-axis rules, optimizer
    moments like their parameters, scalars and the key replicated."""

    replicated = NamedSharding(mesh, PartitionSpec())
    _, abstract_params_, abstract_frozen = abstract_split(cfg, lora)
    params = param_shardings(abstract_params_, mesh)
    frozen = None if abstract_frozen is None else param_shardings(abstract_frozen, mesh)
    abstract = abstract_state(cfg, tx, lora=lora)
    opt = optax.tree_map_params(
        tx,
        lambda _, sharding: sharding,
        abstract.opt_state,
        params,
        transform_non_params=lambda _: replicated,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )
    return TrainState(replicated, params, opt, replicated, frozen)


def create_state(model: nnx.Module, tx: optax.GradientTransformation, seed: int, mesh: Mesh | None = None,
                 lora: LoraConfig | None = None) -> TrainState:
    """The initial train state from a model (an adapted one under LoRA); built directly into its
    shardings when a mesh is given."""
    _, params, frozen = trainable_split(model, lora)
    if mesh is None:  # committed to the default device, like a restored state (same compiled step)
        return jax.device_put(init_state(params, tx, seed, frozen), jax.devices()[0])
    shardings = state_shardings(model.config, tx, mesh, lora)
    return jax.jit(lambda p, f: init_state(p, tx, seed, f), out_shardings=shardings)(params, frozen)


def params_finite(state: TrainState) -> bool:
    """True when every parameter is finite (checked before any checkpoint is written)."""
    leaves = jax.tree.leaves(state.params)
    return bool(jax.jit(lambda xs: jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in xs])))(leaves))
