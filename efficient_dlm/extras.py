"""Optional dependencies (setup.py extras) imported where they are needed, with one line naming the
extra when missing instead of a bare ImportError traceback."""
from __future__ import annotations

import importlib
from types import ModuleType

from efficient_dlm.errors import UserError


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """`import module`, or UserError: "<purpose> needs <module>: pip install -e '.[<extra>]'"."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"{purpose} needs {module.split('.')[0]}, which is not installed: pip install -e '.[{extra}]'") from None
