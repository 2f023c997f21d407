"""TPU slice names (v5p-256, v5e-64, v4-128, v6e-256, or explicit v5p:4x4x8) -> what libtpu and the
launch scripts need: the topology string for `jax.experimental.topologies.get_topology_desc`, chips,
hosts, HBM per chip.

Naming (Cloud TPU docs): for v4 and v5p the suffix counts TensorCores (2 per chip, used as one
"megacore" device), so v5p-256 is 128 chips = 32 hosts of 4 chips; for v5e and v6e it counts chips.
Single-host slices of v5e/v6e (up to 8 chips) have all chips on one VM. Default torus shapes for
power-of-two sizes grow like Google's tables (v5p: 2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4, 4x4x8, ...);
other shapes are given explicitly as `v5p:4x4x12`.

Pure Python (no JAX import) so the launch scripts can use it on a laptop.
"""
from __future__ import annotations

import dataclasses
import math
import re

from efficient_dlm.errors import UserError

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class Generation:
    name: str  # canonical: v4, v5e, v5p, v6e
    libtpu_prefix: str  # prefix of the topology string libtpu accepts
    cores_per_chip_in_name: int  # what the suffix of "v5p-256" counts per chip
    dims: int  # 3-D torus (v4, v5p) or 2-D (v5e, v6e)
    chip_config: str  # get_topology_desc chip_config_name
    hbm_bytes: int
    chips_per_host: int  # on multi-host slices
    max_single_host_chips: int
    gcloud_type: str  # accelerator-type prefix gcloud expects


GENERATIONS = {
    g.name: g
    for g in (
        Generation("v4", "v4", 2, 3, "megacore", 32 * GIB, 4, 4, "v4"),
        Generation("v5e", "v5e", 1, 2, "default", 16 * GIB, 4, 8, "v5litepod"),
        Generation("v5p", "v5p", 2, 3, "megacore", 95 * GIB, 4, 4, "v5p"),
        Generation("v6e", "v6e", 1, 2, "default", 32 * GIB, 4, 8, "v6e"),
    )
}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v5": "v5p", "v6": "v6e", "v6lite": "v6e"}


@dataclasses.dataclass(frozen=True)
class TpuSlice:
    """One TPU slice type (times num_slices for multi-slice)."""

    generation: Generation
    shape: tuple[int, ...]  # chips along each torus axis
    num_slices: int = 1

    @property
    def chips(self) -> int:
        return math.prod(self.shape)

    @property
    def total_chips(self) -> int:
        return self.chips * self.num_slices

    @property
    def hosts(self) -> int:
        """VMs (workers) per slice."""
        g = self.generation
        return 1 if self.chips <= g.max_single_host_chips else self.chips // g.chips_per_host

    @property
    def topology(self) -> str:
        """The libtpu topology string, e.g. 'v5p:4x4x8'."""
        return f"{self.generation.libtpu_prefix}:{'x'.join(map(str, self.shape))}"

    @property
    def accelerator_type(self) -> str:
        """The gcloud --accelerator-type, e.g. 'v5p-256'."""
        g = self.generation
        return f"{g.gcloud_type}-{self.chips * g.cores_per_chip_in_name}"

    @property
    def hbm_bytes(self) -> int:
        return self.generation.hbm_bytes

    def describe(self) -> str:
        slices = f" x {self.num_slices} slices" if self.num_slices > 1 else ""
        return (
            f"{self.accelerator_type}{slices} ({self.topology}: {self.total_chips} chips, "
            f"{self.hosts * self.num_slices} hosts, {self.hbm_bytes / GIB:.0f} GiB HBM per chip)"
        )


def default_shape(generation: Generation, chips: int) -> tuple[int, ...]:
    """Torus shape for a power-of-two chip count: repeatedly double the smallest axis (the last one
    among equals), starting from 2x2x1 (3-D) or 1x1 (2-D)."""
    if chips & (chips - 1) or chips < 1:
        raise UserError(
            f"no default topology for {chips} {generation.name} chips; give the shape explicitly, "
            f"e.g. {generation.libtpu_prefix}:{'x'.join(['4'] * (generation.dims - 1) + ['12'])}"
        )
    shape = [2, 2, 1] if generation.dims == 3 else [1, 1]
    if generation.dims == 3 and chips < 4:
        raise UserError(f"{generation.name} slices have at least 4 chips ({generation.name}-{4 * generation.cores_per_chip_in_name})")
    while math.prod(shape) < chips:
        smallest = min(shape)
        i = max(j for j, n in enumerate(shape) if n == smallest)
        shape[i] *= 2
    return tuple(shape)


def _generation(name: str, full: str) -> Generation:
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in GENERATIONS:
        raise UserError(f"unknown TPU type {full!r}; known: {', '.join(GENERATIONS)} (e.g. v5p-256, v5e-64, v4:2x2x2)")
    return GENERATIONS[key]


def parse(name: str, num_slices: int = 1) -> TpuSlice:
    """'v5p-256' | 'v5litepod-16' | 'v5p:4x4x12' | 'v6e:16x16' -> TpuSlice."""
    if num_slices < 1:
        raise UserError(f"num_slices must be >= 1, got {num_slices}")
    text = name.strip()
    explicit = re.fullmatch(r"([a-z0-9]+):(\d+(?:x\d+)+)", text.lower())
    if explicit:
        gen = _generation(explicit.group(1), name)
        shape = tuple(int(n) for n in explicit.group(2).split("x"))
        if len(shape) != gen.dims or min(shape) < 1:
            raise UserError(f"{name!r}: {gen.name} topologies have {gen.dims} positive dimensions")
        return TpuSlice(gen, shape, num_slices)
    named = re.fullmatch(r"([a-z0-9]+)-(\d+)", text.lower())
    if not named:
        raise UserError(f"cannot parse TPU topology {name!r}; use a type like v5p-256 or an explicit shape like v5p:4x4x8")
    gen = _generation(named.group(1), name)
    count = int(named.group(2))
    if count % gen.cores_per_chip_in_name:
        raise UserError(f"{name!r}: the {gen.name} suffix counts TensorCores and must be even")
    return TpuSlice(gen, default_shape(gen, count // gen.cores_per_chip_in_name), num_slices)
