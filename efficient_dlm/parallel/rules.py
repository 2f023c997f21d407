"""Logical axis names -> mesh axes: the single rules table every sharding decision goes through.

Parameters carry logical names in their `out_sharding` metadata (e.g. ("embed", "mlp")); activations
are constrained at layer boundaries with `constrain(x, ("batch", "length", "act_embed"))`. Nothing
else in the code base names a mesh axis. Outside a mesh context (`jax.set_mesh` / `parallel.mesh.use`)
`constrain` is the identity, so the same model code runs on one CPU device and on a pod.

Why our own table rather than flax's `nnx.logical_to_mesh` rules: we need two behaviours it lacks.
(1) A mesh axis that does not divide a dimension is dropped for that dimension (GQA models have fewer
KV heads than a large tensor axis; such tensors are then replicated over it instead of failing), and
(2) an unknown logical name is an error, not silent replication.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Mapping, Sequence

import jax
from jax.sharding import PartitionSpec

from efficient_dlm.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor", "expert")

Target = str | tuple[str, ...] | None
Rules = tuple[tuple[str, Target], ...]

# Logical name -> mesh axis (or tuple of axes, or None for replicated). Order within a tuple matters.
DEFAULT_RULES: Rules = (
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
    ("lora_rank", None),  # LoRA adapters' rank axis (models/lora.py): small, replicated
    ("cache_batch", ("data", "fsdp", "expert")),
    ("cache_length", None),
)

# The KV cache's logical layout ([layers, batch, slots, kv_heads, head_dim]); models/cache.py uses it.
CACHE_AXES = ("layers", "cache_batch", "cache_length", "act_kv_heads", "head_dim")

_active_rules: list[Rules] = [DEFAULT_RULES]


def _normalise(rules: Sequence[tuple[str, object]] | Mapping[str, object]) -> Rules:
    items = rules.items() if isinstance(rules, Mapping) else rules
    out = []
    for name, target in items:
        if isinstance(target, str):
            parts = tuple(p.strip() for p in target.split(",") if p.strip())
            target = None if not parts else parts[0] if len(parts) == 1 else parts
        elif target is not None:
            target = tuple(target)
        for axis in (target,) if isinstance(target, str) else target or ():
            if axis not in MESH_AXES:
                raise UserError(f"mesh.rules.{name}: unknown mesh axis {axis!r}; mesh axes are {', '.join(MESH_AXES)}")
        out.append((name, target))
    return tuple(out)


def rules_to_strings(rules: Rules = DEFAULT_RULES) -> dict[str, str]:
    """The table as {name: "axis,axis"} ("" = replicated): the form of the config's `mesh.rules`."""
    return {name: target if isinstance(target, str) else ",".join(target or ()) for name, target in rules}


@contextlib.contextmanager
def axis_rules(rules: Sequence[tuple[str, object]] | Mapping[str, object]) -> Iterator[None]:
    """Temporarily replaces the logical-axis rules (e.g. from config.mesh.rules: {name: "fsdp,tensor"})."""
    _active_rules.append(_normalise(rules))
    try:
        yield
    finally:
        _active_rules.pop()


def current_rules() -> Rules:
    return _active_rules[-1]


def logical_to_spec(
    names: Sequence[str | None],
    rules: Rules | None = None,
    mesh_axes: Mapping[str, int] | Sequence[str] | None = None,
    shape: Sequence[int] | None = None,
) -> PartitionSpec:
    """PartitionSpec for logical `names`; a mesh axis is used at most once (first claim wins).

    mesh_axes: the mesh's {axis: size} (or just names). Axes absent from it or of size 1 are dropped,
    so one rules table fits every mesh shape. With sizes and `shape`, an axis is also dropped for a
    dimension it would not divide evenly (that dimension is then replicated over the axis).
    """
    table = dict(current_rules() if rules is None else rules)
    sizes = dict(mesh_axes) if isinstance(mesh_axes, Mapping) else None
    allowed = None if mesh_axes is None else {a for a in mesh_axes if sizes is None or sizes[a] > 1}
    used: set[str] = set()
    spec = []
    for dim, name in enumerate(names):
        if name is not None and name not in table:
            raise UserError(f"logical axis {name!r} has no sharding rule (add it to parallel/rules.py or mesh.rules)")
        target = table.get(name) if name is not None else None
        axes = []
        extent = 1
        for axis in (target,) if isinstance(target, str) else target or ():
            if axis in used or (allowed is not None and axis not in allowed):
                continue
            if sizes is not None and shape is not None and shape[dim] % (extent * sizes[axis]):
                continue
            axes.append(axis)
            extent *= sizes[axis] if sizes is not None else 1
        used.update(axes)
        spec.append(axes[0] if len(axes) == 1 else (tuple(axes) or None))
    return PartitionSpec(*spec)


def mesh_axis_sizes(mesh) -> dict[str, int]:
    """{axis name: size} of a concrete or abstract mesh."""
    return dict(zip(mesh.axis_names, mesh.axis_sizes))


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Sharding constraint by logical names inside a mesh context; identity otherwise."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return x
    spec = logical_to_spec(names, mesh_axes=mesh_axis_sizes(mesh), shape=x.shape)
    if any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):
        return jax.sharding.reshard(x, spec)
    return jax.lax.with_sharding_constraint(x, spec)
