"""The device mesh from the config's `mesh` section, and the context that makes the model use it.

Axes are (data, fsdp, tensor, expert). `data`, `fsdp`, `tensor`, `expert` are sizes inside one slice
(ICI); `dcn_*` are sizes across slices (multi-slice over the data-centre network); -1 means "whatever
is left" (at most one per group). The physical layout comes from JAX's own
`mesh_utils.create_device_mesh` / `create_hybrid_device_mesh`, which know the TPU torus.

`use(mesh, rules)` is the one context every sharded computation runs in: it sets the mesh
(`jax.set_mesh`, which is what `parallel.rules.constrain` reads while tracing) and the logical-axis
rules from `mesh.rules`.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator, Mapping, Sequence

import jax
import numpy as np
from flax.core import spmd as flax_spmd
from jax.experimental import mesh_utils
from jax.sharding import Mesh
from efficient_dlm.errors import UserError
from efficient_dlm.parallel.config import DCN_PREFIX, MeshConfig
from efficient_dlm.parallel.rules import MESH_AXES, _normalise, axis_rules, current_rules


def _resolve(sizes: Mapping[str, int], total: int, what: str) -> tuple[int, ...]:
    """Fills the single -1 so the product is `total`; names the problem when it cannot."""
    values = [int(sizes[a]) for a in MESH_AXES]
    free = [a for a, v in zip(MESH_AXES, values) if v == -1]
    if len(free) > 1:
        raise UserError(f"{what}: at most one axis may be -1, got {', '.join(free)}")
    if any(v == 0 or v < -1 for v in values):
        raise UserError(f"{what}: axis sizes must be positive or -1, got {dict(zip(MESH_AXES, values))}")
    fixed = math.prod(v for v in values if v != -1)
    if free:
        if total % fixed:
            raise UserError(f"{what}: {total} devices cannot be split with fixed axes of product {fixed} {_fmt(sizes)}")
        values[MESH_AXES.index(free[0])] = total // fixed
    elif fixed != total:
        raise UserError(f"{what}: axis sizes {_fmt(sizes)} multiply to {fixed}, but there are {total} devices")
    return tuple(values)


def _fmt(sizes: Mapping[str, int]) -> str:
    return "(" + ", ".join(f"{a}={sizes[a]}" for a in MESH_AXES) + ")"


def num_slices(devices: Sequence[jax.Device]) -> int:
    """How many TPU slices (DCN-connected groups) the devices span; 1 off TPU multi-slice."""
    return len({getattr(d, "slice_index", 0) for d in devices})


def mesh_shapes(mesh_cfg: MeshConfig, num_devices: int, slices: int = 1) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(ici_shape, dcn_shape) over MESH_AXES for `num_devices` split into `slices` slices."""
    if num_devices % slices:
        raise UserError(f"{num_devices} devices cannot form {slices} equal slices")
    dcn = _resolve({a: getattr(mesh_cfg, DCN_PREFIX + a) for a in MESH_AXES}, slices, f"mesh dcn_* over {slices} slice(s)")
    ici = _resolve({a: getattr(mesh_cfg, a) for a in MESH_AXES}, num_devices // slices, f"mesh over {num_devices // slices} devices per slice")
    return ici, dcn


def make_mesh(mesh_cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The Mesh over `devices` (default: all) with axes MESH_AXES, sized by the config's mesh section."""
    devices = list(jax.devices() if devices is None else devices)
    slices = num_slices(devices)
    ici, dcn = mesh_shapes(mesh_cfg, len(devices), slices)
    if slices > 1:
        array = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, allow_split_physical_axes=True)
    elif devices[0].platform == "tpu":
        array = mesh_utils.create_device_mesh(ici, devices, allow_split_physical_axes=True)
    else:  # CPU / fake devices: no physical topology to respect
        array = np.asarray(devices).reshape(ici)
    return Mesh(array, MESH_AXES)


def run_mesh(mesh_cfg: MeshConfig) -> Mesh | None:
    """The mesh a run uses: None on a single device (plain jit, no constraints), else the config's."""
    return make_mesh(mesh_cfg) if jax.device_count() > 1 else None


def config_rules(mesh_cfg: MeshConfig):
    """The rules table from `mesh.rules` ({logical name: "axis,axis"}; "" = replicated)."""
    return _normalise(dict(mesh_cfg.rules))


@contextlib.contextmanager
def use(mesh: Mesh, rules=None) -> Iterator[Mesh]:
    """Runs the body with `mesh` set (jax.set_mesh) and the logical-axis `rules` active.

    The rules are also handed to flax: with a mesh set, `nnx.eval_shape` resolves parameters'
    `out_sharding` names through flax's rules and would otherwise take them for mesh axis names.
    """
    with contextlib.ExitStack() as stack:
        stack.enter_context(jax.set_mesh(mesh))
        if rules is not None:
            stack.enter_context(axis_rules(rules))
        stack.enter_context(flax_spmd.logical_axis_rules(current_rules()))
        yield mesh


def describe(mesh: Mesh) -> str:
    """'data=1 fsdp=8 tensor=1 expert=1' for logs and reports."""
    return " ".join(f"{a}={n}" for a, n in mesh.shape.items())
