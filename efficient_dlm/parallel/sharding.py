"""Shardings of model state from the parameters' logical axis names and the rules table."""
from __future__ import annotations

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from efficient_dlm.parallel.rules import logical_to_spec


def _active_axes(mesh: Mesh) -> list[str]:
    return [name for name, size in mesh.shape.items() if size > 1]


def param_spec(variable, mesh: Mesh) -> PartitionSpec:
    names = variable.get_metadata().get("out_sharding")
    if not names:
        return PartitionSpec()
    return logical_to_spec(names, mesh_axes=_active_axes(mesh))


def state_shardings(model_or_state, mesh: Mesh):
    """A tree like nnx.state(model) whose leaves are NamedShardings for each parameter."""
    state = model_or_state if isinstance(model_or_state, nnx.State) else nnx.state(model_or_state)
    return jax.tree.map(
        lambda v: v.replace(NamedSharding(mesh, param_spec(v, mesh))),
        state,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )
