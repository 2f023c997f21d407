"""Token ids checked where they enter from outside (prompt files, `Model(tokens)`, token streams).

Inside jit an id >= vocab gathers a clamped or NaN embedding row and a negative id wraps around, so
a bad id never fails there: it silently changes the result. Floats would be truncated by an int cast.
Hence one check on the host, before anything is traced.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from efficient_dlm.errors import UserError


def check_token_ids(values: Any, vocab_size: int | None, where: str) -> np.ndarray:
    """values as an int array; UserError naming `where` for non-integers or ids outside [0, vocab_size)."""
    if isinstance(values, (str, bytes)):
        raise UserError(f"{where}: token ids must be integers, got the string {str(values)[:40]!r}")
    try:
        array = np.asarray(values)
    except (ValueError, TypeError):
        raise UserError(f"{where}: token ids must be a rectangular array of integers") from None
    if array.size and (array.dtype == np.bool_ or not np.issubdtype(array.dtype, np.integer)):
        sample = array.reshape(-1)[0].item()
        raise UserError(f"{where}: token ids must be integers, got {array.dtype} (e.g. {sample!r})")
    array = array.astype(np.int64)
    if vocab_size is not None and array.size:
        bad = array[(array < 0) | (array >= vocab_size)]
        if bad.size:
            raise UserError(f"{where}: token id {int(bad[0])} is outside the vocabulary [0, {vocab_size})")
    return array
