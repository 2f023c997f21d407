"""Output paths checked before any work starts, so a long generation or export is never lost to a
path that cannot be written (an existing directory where a file is meant, a parent that is a regular
file, a read-only location). Writability is probed by creating and removing a file, which also
answers correctly for root and for read-only mounts, where os.access does not."""
from __future__ import annotations

import os
import tempfile

from efficient_dlm.errors import UserError


def _existing_ancestor(path: str) -> str:
    current = os.path.abspath(path)
    while not os.path.exists(current):
        parent = os.path.dirname(current)
        if parent == current:
            break
        current = parent
    return current


def _check_parent(path: str, flag: str) -> None:
    if "://" in path:  # object stores (gs://, s3://) are checked by their writers
        return
    ancestor = _existing_ancestor(os.path.dirname(os.path.abspath(path)))
    if not os.path.isdir(ancestor):
        raise UserError(f"{flag} {path}: {ancestor} is a file, not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".edlm-write-check-", dir=ancestor)
    except OSError as err:
        raise UserError(f"{flag} {path}: cannot write in {ancestor} ({err.strerror})") from None
    os.close(fd)
    os.remove(probe)


def check_output_file(path: str, flag: str = "--out") -> None:
    """`path` can be written as a file: not a directory, under a writable directory (made later)."""
    if "://" in path:
        return
    if os.path.isdir(path):
        raise UserError(f"{flag} {path} is a directory; give a file path")
    if os.path.exists(path) and not os.path.isfile(path):
        raise UserError(f"{flag} {path} exists and is not a regular file")
    _check_parent(path, flag)


def check_output_dir(path: str, flag: str = "--out") -> None:
    """`path` can be created (or filled) as a directory: not a file, under a writable directory."""
    if "://" in path:
        return
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{flag} {path} exists and is not a directory")
    _check_parent(path, flag)  # exports are staged beside `path` and renamed
    if os.path.isdir(path):
        _check_parent(os.path.join(path, "x"), flag)
