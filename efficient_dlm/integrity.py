"""Checksums of what a checkpoint wrote, recorded after the write and verified before a restore.

Orbax and tensorstore do not verify what they read back: flipped bytes inside a chunk load silently
(a NaN appears later) and a truncated chunk fails deep inside tensorstore naming no step. So every
saved checkpoint item directory (a model checkpoint's `params/`, a training step `<run_dir>/<step>/`)
gets a `checksums.json` listing each file's size and CRC-32, written atomically once the files are
final; `verify` re-reads them and raises one `CheckpointError` line naming the checkpoint and the
file that is missing, truncated or corrupted. CRC-32 (zlib) is a corruption check, not a
cryptographic one, and costs one sequential read of the checkpoint.
"""
from __future__ import annotations

import concurrent.futures
import json
import os
import zlib

from etils import epath

from efficient_dlm.errors import UserError

MANIFEST = "checksums.json"
_CHUNK = 8 << 20


class CheckpointError(UserError):
    """A checkpoint whose files do not match what was written (or that cannot be found)."""


def _crc32(path: epath.Path) -> tuple[int, int]:
    size, crc = 0, 0
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            size += len(chunk)
            crc = zlib.crc32(chunk, crc)
    return size, crc


def _files(root: epath.Path, prefix: str = "") -> list[str]:
    """Relative paths of the files under root (iterdir: epath's remote paths have no recursive glob)."""
    out = []
    for path in root.iterdir():
        rel = prefix + path.name
        if path.is_dir():
            out += _files(path, rel + "/")
        elif rel != MANIFEST:
            out.append(rel)
    return sorted(out)


def _digests(root: epath.Path, names: list[str]) -> dict[str, tuple[int, int]]:
    """(size, crc32) per file, read in parallel (zlib releases the GIL; the reads are I/O bound)."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        return dict(zip(names, pool.map(lambda n: _crc32(root / n), names)))


def has_manifest(root: str | os.PathLike) -> bool:
    return (epath.Path(root) / MANIFEST).exists()


def record(root: str | os.PathLike) -> None:
    """Writes root/checksums.json for every file under root (atomically: temporary name, then rename)."""
    root = epath.Path(root)
    files = {name: {"size": size, "crc32": crc} for name, (size, crc) in _digests(root, _files(root)).items()}
    tmp = root / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps({"algorithm": "crc32", "files": files}, indent=1, sort_keys=True))
    tmp.rename(root / MANIFEST)


def verify(root: str | os.PathLike, label: str) -> None:
    """Raises CheckpointError naming `label` (e.g. "run/ step 8") and the first bad file."""
    root = epath.Path(root)
    manifest = root / MANIFEST
    if not root.exists():
        raise CheckpointError(f"{label}: {root} is missing")
    if not manifest.exists():
        raise CheckpointError(
            f"{label}: no {MANIFEST} in {root} (written by an older efficient_dlm, or the run stopped before "
            f"recording it; resuming the run records it, or efficient_dlm.integrity.record({str(root)!r}) trusts "
            "the files as they are)"
        )
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        raise CheckpointError(f"{label}: {manifest} is corrupted") from None
    missing = [name for name in files if not (root / name).is_file()]
    if missing:
        raise CheckpointError(f"{label}: file {root / missing[0]} is missing")
    actual = _digests(root, list(files))
    for name, expected in files.items():
        size, crc = actual[name]
        if size != expected["size"]:
            raise CheckpointError(f"{label}: file {root / name} is truncated ({size} of {expected['size']} bytes)")
        if crc != expected["crc32"]:
            raise CheckpointError(f"{label}: file {root / name} is corrupted (checksum mismatch)")
