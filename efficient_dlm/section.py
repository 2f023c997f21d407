"""The base of every package's typed config section: a frozen dataclass that checks its own fields.

Each package owns one section: its fields and defaults are the section's schema and `validate()` its
rules (diffusion/config.py, data/config.py, train/config.py, sample/config.py, parallel/config.py,
demo/config.py; models/config.py's ModelConfig predates this base and checks itself the same way).
efficient_dlm/config.py turns the CLI's ml_collections ConfigDict into these in one place
(`Section.from_mapping` names an unknown or mistyped key) and composes them, so library code, and
the jitted steps in particular, receive frozen, hashable values rather than a mutable ConfigDict.

Why a base of our own rather than a config library: the schema must stay ml_collections at the CLI
edge (recipes and `--config.section.key=value` overrides), and the checks need only the standard
library's dataclasses; the base adds the two things dataclasses lack, type checks with a
`section.key` message and canonical (hashable) tuples for what JSON and the CLI give as lists.
"""
from __future__ import annotations

import dataclasses
import functools
import numbers
import typing
from typing import Any, ClassVar, Mapping

from efficient_dlm.errors import UserError

_SCALARS: dict[type, tuple[type, ...]] = {int: (numbers.Integral,), float: (numbers.Real,), bool: (bool,), str: (str,)}


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """{field name: resolved type hint} of a dataclass (annotations are strings under __future__)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def optional_kind(hint: Any) -> tuple[Any, bool]:
    """(the type without None, whether None is allowed) of `X | None`."""
    args = typing.get_args(hint)
    if type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return hint, False


def _kind_name(kind: Any) -> str:
    name = getattr(kind, "__name__", str(kind))
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def _is(value: Any, kind: type) -> bool:
    if kind is not bool and isinstance(value, bool):  # True is an Integral, but not an int setting
        return False
    return isinstance(value, _SCALARS[kind])


def _canonical(value: Any, hint: Any, key: str) -> Any:
    """`value` checked against `hint` (int, float, bool, str, X | None, tuple[X, ...], tuple[tuple[str, str], ...]),
    lists made tuples and ints made floats where a float is declared; a mismatch names `key`."""
    kind, optional = optional_kind(hint)
    if value is None and optional:
        return None
    if typing.get_origin(kind) is tuple:
        inner = typing.get_args(kind)[0]
        if isinstance(value, Mapping) and typing.get_origin(inner) is tuple:  # {name: value} pairs (mesh.rules)
            value = tuple(value.items())
        if not isinstance(value, (tuple, list)):
            raise UserError(f"{key} must be a tuple, got {value!r}")
        return tuple(_canonical(v, inner, f"{key}[{i}]") for i, v in enumerate(value))
    if kind in _SCALARS:
        if not _is(value, kind):
            raise UserError(f"{key} must be {_kind_name(kind)}, got {value!r}")
        return float(value) if kind is float else value
    return value


@dataclasses.dataclass(frozen=True)
class Section:
    """A typed config section; subclasses set SECTION (its key in the config) and override validate()."""

    SECTION: ClassVar[str] = ""

    def __post_init__(self):
        for name, hint in field_types(type(self)).items():
            value = _canonical(getattr(self, name), hint, f"{self.SECTION}.{name}")
            object.__setattr__(self, name, value)
        self.validate()

    def validate(self) -> None:
        """Raises UserError with one line naming the first bad key of this section."""

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "Section":
        """The section from a mapping (a ConfigDict section's to_dict(), or JSON); an unknown key is named."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserError(
                f"unknown config key '{cls.SECTION}.{unknown[0]}' (not in the {cls.SECTION} section's schema; "
                f"see {cls.__module__.replace('.', '/')}.py)"
            )
        return cls(**dict(values))

    def replace(self, **changes: Any):
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def choice(value: Any, choices: tuple, key: str) -> None:
    """One line naming `key` when `value` is not one of `choices`."""
    if value not in choices:
        raise UserError(f"unknown {key} {value!r}; choose one of {', '.join(map(str, choices))}")
