"""Memory-mapped reading of safetensors checkpoints (single file or sharded with an index).

Our own reader rather than `safetensors.safe_open` because loading must (a) hand out bfloat16
tensors as NumPy views without a copy (the library's NumPy backend rejects bfloat16) and (b) slice a
tensor lazily so each process reads only the shards its devices hold. The format is a little-endian
u64 header length, a JSON header of {name: {dtype, shape, data_offsets}}, then raw bytes; we validate
it fully (truncation, overlapping or out-of-range offsets) before touching data. Pickle `.bin`
checkpoints are refused, never opened.
"""
from __future__ import annotations

import json
import mmap
import os
import struct
from typing import Iterator

import ml_dtypes
import numpy as np

from efficient_dlm.errors import UserError

DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.bin")


class CheckpointError(UserError):
    """A checkpoint directory or file that cannot be read as asked; the message names the problem."""


class SafetensorsFile:
    """One .safetensors file: validated header plus a read-only memory map of the data section."""

    def __init__(self, path: str):
        self.path = path
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file (no header)")
            (header_len,) = struct.unpack("<Q", raw)
            if header_len > size - 8:
                raise CheckpointError(f"{path}: truncated safetensors file (header of {header_len} bytes, file of {size})")
            try:
                header = json.loads(f.read(header_len))
            except json.JSONDecodeError as err:
                raise CheckpointError(f"{path}: corrupt safetensors header ({err})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
        self.metadata = header.pop("__metadata__", None) or {}
        self.data_start = 8 + header_len
        self.entries = header
        data_len = size - self.data_start
        spans = []
        for name, entry in header.items():
            try:
                begin, end = (int(x) for x in entry["data_offsets"])
                dtype, shape = entry["dtype"], [int(n) for n in entry["shape"]]
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{path}: corrupt safetensors header entry for tensor {name}") from None
            if dtype not in DTYPES:
                raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {dtype}")
            expected = int(np.prod(shape, dtype=np.int64)) * np.dtype(DTYPES[dtype]).itemsize
            if begin < 0 or end - begin != expected:
                raise CheckpointError(f"{path}: tensor {name} occupies bytes [{begin}, {end}), its shape needs {expected}")
            if end > data_len:
                raise CheckpointError(
                    f"{path}: truncated safetensors file (tensor {name} ends at byte {end}, data section has {data_len})"
                )
            spans.append((begin, end, name))
        spans.sort()
        for (_, end, name), (begin, _, other) in zip(spans, spans[1:]):
            if begin < end:
                raise CheckpointError(f"{path}: tensors {name} and {other} overlap")
        self._map = np.memmap(path, dtype=np.uint8, mode="r", offset=self.data_start, shape=(data_len,)) if data_len else None

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def dtype(self, name: str) -> np.dtype:
        return np.dtype(DTYPES[self.entries[name]["dtype"]])

    def tensor(self, name: str) -> np.ndarray:
        """A read-only NumPy view into the memory map (no copy until a slice is materialised)."""
        entry = self.entries[name]
        begin, end = entry["data_offsets"]
        if begin == end:
            return np.zeros(entry["shape"], self.dtype(name))
        return self._map[begin:end].view(self.dtype(name)).reshape(entry["shape"])

    def release(self, name: str) -> None:
        """Drops the tensor's pages from this process's resident set once it has been copied out.

        The kernel's page cache keeps them, so a later read is still correct, merely slower. Without
        this, every byte read stays mapped and peak RSS counts the checkpoint a second time.
        """
        raw = getattr(self._map, "_mmap", None)
        if raw is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        begin, end = self.entries[name]["data_offsets"]
        base = self.data_start - self.data_start % mmap.ALLOCATIONGRANULARITY  # where numpy's mmap starts
        lo = self.data_start - base + begin
        lo -= lo % mmap.PAGESIZE
        hi = min(self.data_start - base + end, len(raw))
        if hi > lo:
            raw.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


class SafetensorsCheckpoint:
    """All tensors of a HF model directory: model.safetensors or a sharded index, memory-mapped."""

    def __init__(self, directory: str):
        self.directory = directory
        index_path = os.path.join(directory, INDEX_NAME)
        single_path = os.path.join(directory, SINGLE_NAME)
        if os.path.exists(index_path):
            try:
                with open(index_path) as f:
                    weight_map: dict[str, str] = dict(json.load(f)["weight_map"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
                raise CheckpointError(f"{index_path}: not a safetensors index (no valid weight_map: {err})") from None
            files = sorted(set(weight_map.values()))
            for name in files:
                if not os.path.exists(os.path.join(directory, name)):
                    raise CheckpointError(f"{directory}: shard {name} listed in {INDEX_NAME} is missing")
            self._files = {name: SafetensorsFile(os.path.join(directory, name)) for name in files}
            self._where = {}
            for tensor, shard in weight_map.items():
                if tensor not in self._files[shard].entries:
                    raise CheckpointError(f"{directory}: tensor {tensor} is listed in {INDEX_NAME} but not in {shard}")
                self._where[tensor] = self._files[shard]
        elif os.path.exists(single_path):
            single = SafetensorsFile(single_path)
            self._files = {SINGLE_NAME: single}
            self._where = {name: single for name in single.keys()}
        else:
            raise CheckpointError(_missing_weights_message(directory))

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        return self._where[name].shape(name)

    def dtype(self, name: str) -> np.dtype:
        return self._where[name].dtype(name)

    def tensor(self, name: str) -> np.ndarray:
        return self._where[name].tensor(name)

    def release(self, names: list[str]) -> None:
        """See SafetensorsFile.release."""
        for name in names:
            self._where[name].release(name)

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        for name in self._where:
            yield name, self.tensor(name)

    def nbytes(self) -> int:
        return sum(int(np.prod(self.shape(n))) * self.dtype(n).itemsize for n in self._where)


def _missing_weights_message(directory: str) -> str:
    present = set(os.listdir(directory)) if os.path.isdir(directory) else set()
    if not os.path.isdir(directory):
        return f"{directory}: not a directory"
    pickles = sorted(n for n in present if n in PICKLE_NAMES or n.endswith(".bin") or n.endswith(".pt"))
    if pickles:
        return (
            f"{directory}: only pickle weights ({', '.join(pickles)}) found; refusing to unpickle. "
            "Convert them to safetensors first (e.g. transformers' save_pretrained(safe_serialization=True))"
        )
    return f"{directory}: no {SINGLE_NAME} or {INDEX_NAME} found"
