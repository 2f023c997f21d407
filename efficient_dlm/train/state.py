"""The train state (a pytree) and how it is built: concrete, abstract (for restore / AOT), sharded.

TrainState holds everything a resumed run needs besides the data iterator: step, parameters (an
`nnx.State` of the model's Params, fp32 master weights), optimizer state and the run's PRNG key.
The model's graph definition is static and rebuilt from the ModelConfig, so the state is a plain
pytree that jit, orbax and AOT compilation handle directly.
"""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from efficient_dlm.models.config import ModelConfig
from efficient_dlm.models.decoder import MODEL_STATE, abstract_model
from efficient_dlm.parallel.sharding import state_shardings as param_shardings


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken (= batches consumed)
    params: nnx.State
    opt_state: Any
    rng: jax.Array  # uint32[2]: the run's key; step t uses fold_in(rng, t)


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


def abstract_params(cfg: ModelConfig) -> tuple[nnx.GraphDef, nnx.State]:
    with outside_mesh():
        return split_model(abstract_model(cfg))


def graphdef_for(cfg: ModelConfig) -> nnx.GraphDef:
    return abstract_params(cfg)[0]


def init_state(params: nnx.State, tx: optax.GradientTransformation, seed: int) -> TrainState:
    return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), jax.random.PRNGKey(seed))


def abstract_state(cfg: ModelConfig, tx: optax.GradientTransformation, seed: int = 0) -> TrainState:
    """ShapeDtypeStruct tree of the state (no allocation): restore target and AOT input."""
    params = abstract_params(cfg)[1]
    with outside_mesh():
        return jax.eval_shape(lambda p: init_state(p, tx, seed), params)


def state_shardings(cfg: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh) -> TrainState:
    """NamedShardings for every leaf: params by the logical-axis rules, optimizer moments like their
    parameters, scalars and the key replicated."""

    replicated = NamedSharding(mesh, PartitionSpec())
    params = param_shardings(abstract_params(cfg)[1], mesh)
    abstract = abstract_state(cfg, tx)
    opt = optax.tree_map_params(
        tx,
        lambda _, sharding: sharding,
        abstract.opt_state,
        params,
        transform_non_params=lambda _: replicated,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )
    return TrainState(replicated, params, opt, replicated)


def create_state(model: nnx.Module, tx: optax.GradientTransformation, seed: int, mesh: Mesh | None = None) -> TrainState:
    """The initial train state from a model; built directly into its shardings when a mesh is given."""
    _, params = split_model(model)
    if mesh is None:  # committed to the default device, like a restored state (same compiled step)
        return jax.device_put(init_state(params, tx, seed), jax.devices()[0])
    shardings = state_shardings(model.config, tx, mesh)
    return jax.jit(lambda p: init_state(p, tx, seed), out_shardings=shardings)(params)


def params_finite(state: TrainState) -> bool:
    """True when every parameter is finite (checked before any checkpoint is written)."""
    leaves = jax.tree.leaves(state.params)
    return bool(jax.jit(lambda xs: jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in xs])))(leaves))
