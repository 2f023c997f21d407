"""Logical axis names -> mesh axes: the single rules table every sharding decision goes through.

Parameters carry logical names in their `out_sharding` metadata (e.g. ("embed", "mlp")); activations
are constrained at layer boundaries with `constrain(x, ("batch", "length", "act_embed"))`. Nothing
else in the code base names a mesh axis. Outside a mesh context `constrain` is the identity, so the
same model code runs on one CPU device and on a pod.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import jax
from jax.sharding import PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor", "expert")

# Logical name -> mesh axis (or tuple of axes, or None for replicated). Order within a tuple matters.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp", "expert")),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("layers", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("norm", None),
    ("experts", "expert"),
    ("cache_batch", ("data", "fsdp", "expert")),
    ("cache_length", None),
)

_active_rules: list[tuple[tuple[str, object], ...]] = [DEFAULT_RULES]


@contextlib.contextmanager
def axis_rules(rules: Sequence[tuple[str, object]]) -> Iterator[None]:
    """Temporarily replaces the logical-axis rules (e.g. from config.mesh.rules)."""
    _active_rules.append(tuple((name, tuple(a) if isinstance(a, list) else a) for name, a in rules))
    try:
        yield
    finally:
        _active_rules.pop()


def current_rules() -> tuple[tuple[str, object], ...]:
    return _active_rules[-1]


def logical_to_spec(names: Sequence[str | None], rules=None, mesh_axes: Sequence[str] | None = None) -> PartitionSpec:
    """PartitionSpec for logical `names`; a mesh axis is used at most once (first claim wins).

    Mesh axes absent from `mesh_axes` (when given) or of size 1 are dropped, so one rules table fits
    every mesh shape.
    """
    table = dict(current_rules() if rules is None else rules)
    used: set[str] = set()
    spec = []
    for name in names:
        target = table.get(name) if name is not None else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(a for a in axes if a not in used and (mesh_axes is None or a in mesh_axes))
        used.update(axes)
        spec.append(axes[0] if len(axes) == 1 else (axes or None))
    return PartitionSpec(*spec)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Sharding constraint by logical names inside a mesh context; identity otherwise."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return x
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    spec = logical_to_spec(names, mesh_axes=[a for a, n in sizes.items() if n > 1])
    return jax.lax.with_sharding_constraint(x, spec)
