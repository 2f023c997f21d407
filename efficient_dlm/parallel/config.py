"""The `mesh` config section: device mesh sizes and the logical-axis rules (parallel/mesh.py, parallel/rules.py).

data/fsdp/tensor/expert: axis sizes inside one slice (ICI); dcn_*: sizes across slices (multi-slice);
-1 = the rest (at most one per group). rules: {logical axis name: "mesh_axis,mesh_axis"} ("" =
replicated), e.g. --config.mesh.rules.embed=fsdp,tensor; held here as (name, axes) pairs so the
section stays frozen. `validate()` checks what needs no devices; the sizes meet the device count in
mesh.make_mesh.
"""
from __future__ import annotations

import dataclasses

from efficient_dlm.errors import UserError
from efficient_dlm.parallel.rules import DEFAULT_RULES, MESH_AXES, Rules, _normalise, rules_to_strings
from efficient_dlm.section import Section

DCN_PREFIX = "dcn_"


@dataclasses.dataclass(frozen=True)
class MeshConfig(Section):
    SECTION = "mesh"

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    expert: int = 1
    dcn_data: int = -1
    dcn_fsdp: int = 1
    dcn_tensor: int = 1
    dcn_expert: int = 1
    rules: tuple[tuple[str, str], ...] = tuple(rules_to_strings(DEFAULT_RULES).items())

    def __post_init__(self):
        # one spelling per table: rules are keyed by name (a ConfigDict holds them sorted), so sort them too
        object.__setattr__(self, "rules", tuple(sorted(dict(self.rules).items())))
        super().__post_init__()

    def validate(self) -> None:
        for prefix in ("", DCN_PREFIX):
            values = {prefix + a: getattr(self, prefix + a) for a in MESH_AXES}
            for key, value in values.items():
                if value == 0 or value < -1:
                    raise UserError(f"mesh.{key} must be a positive integer or -1, got {value!r}")
            free = [key for key, v in values.items() if v == -1]
            if len(free) > 1:
                raise UserError(f"at most one of mesh.{', mesh.'.join(free)} may be -1")
        self.axis_rules()

    def axis_rules(self) -> Rules:
        """The rules table (parallel/rules.py's form) from mesh.rules."""
        return _normalise(dict(self.rules))
