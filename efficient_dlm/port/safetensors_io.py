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
import os
import struct
from typing import Iterator

import ml_dtypes
import numpy as np

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


class CheckpointError(ValueError):
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
        self.metadata = header.pop("__metadata__", None) or {}
        self.data_start = 8 + header_len
        self.entries = header
        data_len = size - self.data_start
        for name, entry in header.items():
            begin, end = entry["data_offsets"]
            if entry["dtype"] not in DTYPES:
                raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {entry['dtype']}")
            expected = int(np.prod(entry["shape"], dtype=np.int64)) * np.dtype(DTYPES[entry["dtype"]]).itemsize
            if end - begin != expected:
                raise CheckpointError(f"{path}: tensor {name} occupies {end - begin} bytes, its shape needs {expected}")
            if end > data_len:
                raise CheckpointError(
                    f"{path}: truncated safetensors file (tensor {name} ends at byte {end}, data section has {data_len})"
                )
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


class SafetensorsCheckpoint:
    """All tensors of a HF model directory: model.safetensors or a sharded index, memory-mapped."""

    def __init__(self, directory: str):
        self.directory = directory
        index_path = os.path.join(directory, INDEX_NAME)
        single_path = os.path.join(directory, SINGLE_NAME)
        if os.path.exists(index_path):
            with open(index_path) as f:
                weight_map: dict[str, str] = json.load(f)["weight_map"]
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
