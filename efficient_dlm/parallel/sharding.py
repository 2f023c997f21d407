"""Shardings of everything that lives on the mesh, all derived from logical names and the rules table.

- model state: from each parameter's `out_sharding` metadata (`state_shardings`);
- optimizer state: each moment follows its parameter (efficient_dlm.train.state.state_shardings);
- batches and the KV cache: fixed logical layouts (`batch_sharding`, `cache_sharding`);
- sharded initialisation (`create_sharded`): the init function is jitted with those output shardings,
  so every device materialises only its shard and a big model never exists on one host.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from qwix import QArray

from efficient_dlm.parallel.rules import CACHE_AXES, logical_to_spec, mesh_axis_sizes
from efficient_dlm.parallel.mesh import use


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def named(mesh: Mesh, names: Sequence[str | None], shape: Sequence[int] | None = None) -> NamedSharding:
    """NamedSharding of an array with logical axis `names` (and `shape`, to drop non-dividing axes)."""
    return NamedSharding(mesh, logical_to_spec(names, mesh_axes=mesh_axis_sizes(mesh), shape=shape))


def param_spec(variable: nnx.Variable, mesh: Mesh, shape: Sequence[int] | None = None) -> PartitionSpec:
    names = variable.get_metadata().get("out_sharding")
    if not names:
        return PartitionSpec()
    shape = jax.numpy.shape(variable.get_value()) if shape is None else shape
    return logical_to_spec(names, mesh_axes=mesh_axis_sizes(mesh), shape=shape)


def _variable_sharding(variable: nnx.Variable, mesh: Mesh):
    """The NamedSharding of a parameter; for a quantized weight (a qwix QArray) one for its int8 / fp8 values
    and one for its scales, both by the weight's logical names (a scale's size-1 contracted axes stay whole)."""
    value = variable.get_value()
    if isinstance(value, QArray):
        return QArray(*(NamedSharding(mesh, param_spec(variable, mesh, part.shape)) for part in (value.qvalue, value.scale)),
                      qtype=value.qtype)
    return NamedSharding(mesh, param_spec(variable, mesh))


def state_shardings(model_or_state, mesh: Mesh):
    """A tree like nnx.state(model) whose leaves are NamedShardings for each parameter."""
    state = model_or_state if isinstance(model_or_state, nnx.State) else nnx.state(model_or_state)
    return jax.tree.map(lambda v: v.replace(_variable_sharding(v, mesh)), state, is_leaf=_is_variable)


def abstract_arrays(tree, shardings):
    """ShapeDtypeStructs carrying shardings (AOT inputs, orbax restore targets): nothing is allocated."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def create_sharded(make: Callable[[], nnx.Module], mesh: Mesh, rules=None) -> nnx.Module:
    """Builds `make()` with every parameter created directly in its shard (jit with out_shardings).

    `make` is traced once abstractly to learn shapes and logical names; the real initialisation then
    runs as one jitted program whose outputs are laid out by the rules, so no device or host ever
    holds a whole weight.
    """

    graphdef, abstract_state = nnx.split(nnx.eval_shape(make))
    shardings = state_shardings(abstract_state, mesh)
    with use(mesh, rules):
        state = jax.jit(lambda: nnx.split(make())[1], out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def batch_sharding(mesh: Mesh, ndim: int = 2, shape: Sequence[int] | None = None) -> NamedSharding:
    """Sharding of a [batch, length, ...] input: rows over the data-parallel axes, the rest replicated."""
    return named(mesh, ("batch", "length") + (None,) * (ndim - 2), shape)


def cache_sharding(mesh: Mesh, shape: Sequence[int] | None = None) -> NamedSharding:
    """Sharding of a KV cache tensor [layers, batch, slots, kv_heads, head_dim]."""
    return named(mesh, CACHE_AXES, shape)


def describe_tree(tree, top: int = 8) -> list[dict[str, Any]]:
    """The `top` largest arrays of a tree of sharded arrays / ShapeDtypeStructs: path, global shape,
    dtype, PartitionSpec and bytes per device."""
    rows = []
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        rows.append(
            dict(
                path=jax.tree_util.keystr(path, simple=True, separator="/"),
                shape=tuple(x.shape),
                dtype=str(x.dtype),
                spec=str(getattr(x.sharding, "spec", x.sharding)),
                global_bytes=x.dtype.itemsize * math.prod(x.shape),
                device_bytes=x.dtype.itemsize * math.prod(x.sharding.shard_shape(x.shape)),
            )
        )
    return sorted(rows, key=lambda r: -r["global_bytes"])[:top]
