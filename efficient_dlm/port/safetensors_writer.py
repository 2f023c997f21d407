"""Streaming safetensors writer: sharded files plus the Hugging Face index, one tensor in memory at a time.

Our own writer rather than `safetensors.numpy.save_file` because export must hold at most one tensor
on the host (a 100B model is gathered parameter by parameter, never shard by shard) and must write
bfloat16, which the library's NumPy backend rejects. Shapes and dtypes are planned up front, so each
file's header is written first and every tensor's bytes are streamed after it. Files are written
under a temporary name and renamed, so a crash never leaves a file that looks complete.
"""
from __future__ import annotations

import dataclasses
import json
import os
import struct
import sys
from typing import Callable, Iterable

import numpy as np

from efficient_dlm.errors import UserError
from efficient_dlm.port.safetensors_io import DTYPES, INDEX_NAME, SINGLE_NAME

_CODES = {np.dtype(dtype): code for code, dtype in DTYPES.items()}
_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as "5GB" / "500MB" / "2GiB" (transformers' max_shard_size)."""
    if isinstance(size, int):
        value = size
    else:
        text = str(size).strip().upper().replace(" ", "")
        unit = next((u for u in sorted(_UNITS, key=len, reverse=True) if text.endswith(u)), None)
        try:
            value = int(float(text[: -len(unit)]) * _UNITS[unit]) if unit else int(text)
        except ValueError:
            raise UserError(f"invalid max_shard_size {size!r}; use bytes or a size such as '5GB' or '500MB'") from None
    if value <= 0:
        raise UserError(f"max_shard_size must be positive, got {size!r}")
    return value


def plan_shards(specs: Iterable[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Groups tensors in order into shards of at most max_shard_bytes (a larger tensor gets its own)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def shard_names(count: int) -> list[str]:
    if count == 1:
        return [SINGLE_NAME]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def _header(specs: list[TensorSpec]) -> bytes:
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for spec in specs:
        if spec.dtype not in _CODES:
            raise UserError(f"tensor {spec.name}: dtype {spec.dtype} cannot be written to safetensors")
        header[spec.name] = {"dtype": _CODES[spec.dtype], "shape": list(spec.shape), "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)  # 8-byte aligned data section, as the reference writer does


def write_file(path: str, specs: list[TensorSpec], produce: Callable[[TensorSpec], np.ndarray], write: bool = True) -> None:
    """Writes one safetensors file; produce(spec) returns the tensor (called once per spec, in order).

    write=False still calls `produce` for every tensor (multi-host gathers need every process) but
    touches no file.
    """
    if sys.byteorder != "little":
        raise RuntimeError("safetensors export needs a little-endian host")
    header = _header(specs)
    tmp = path + ".tmp"
    f = open(tmp, "wb") if write else None
    try:
        if f:
            f.write(struct.pack("<Q", len(header)))
            f.write(header)
        for spec in specs:
            array = np.ascontiguousarray(produce(spec))
            if tuple(array.shape) != spec.shape or array.dtype != spec.dtype:
                raise RuntimeError(f"tensor {spec.name}: produced {array.dtype}{list(array.shape)}, planned {spec.dtype}{list(spec.shape)}")
            if f:
                f.write(array.reshape(-1).view(np.uint8).data)
    finally:
        if f:
            f.close()
    if write:
        os.replace(tmp, path)


def write_sharded(
    directory: str,
    specs: list[TensorSpec],
    produce: Callable[[TensorSpec], np.ndarray],
    max_shard_bytes: int,
    write: bool = True,
) -> list[str]:
    """Writes model.safetensors, or numbered shards plus model.safetensors.index.json; returns file names."""
    shards = plan_shards(specs, max_shard_bytes)
    names = shard_names(len(shards))
    for name, shard in zip(names, shards):
        write_file(os.path.join(directory, name), shard, produce, write)
    if len(shards) > 1 and write:
        index = {
            "metadata": {"total_size": sum(s.nbytes for s in specs)},
            "weight_map": {spec.name: name for name, shard in zip(names, shards) for spec in shard},
        }
        with open(os.path.join(directory, INDEX_NAME), "w") as f:
            json.dump(index, f, indent=2)
    return names
