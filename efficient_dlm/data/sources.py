"""Random-access document sources for grain: JSONL, Parquet, ArrayRecord text, pre-tokenized .npy.

Each source is a grain `RandomAccessDataSource` (len + getitem), so grain can shard, shuffle per epoch
and checkpoint by index. Text sources return `str`; the token source returns int32 arrays that already
end in EOS. Paths are opened through etils.epath, so local paths and object stores (gs://, s3:// where
installed) work; a pattern with *, ? or [ expands to every matching file.

Why our own code: grain ships ArrayRecord and Parquet *iterators* but no random-access JSONL, Parquet
or token-stream sources; random access is what makes the shuffle and the resumable state exact.
"""
from __future__ import annotations

import json
import mmap
import os
from typing import Any

import numpy as np
from etils import epath

from efficient_dlm.errors import UserError, UserFileNotFoundError

TEXT_EXTENSIONS = (".jsonl", ".json", ".parquet", ".arrayrecord", ".array_record")
TOKEN_EXTENSIONS = (".npy",)


def expand(pattern: str) -> list[str]:
    """Files matching `pattern` (sorted); raises FileNotFoundError naming the pattern if none."""
    if any(c in pattern for c in "*?["):
        path = epath.Path(pattern)
        parent = path.parent
        while any(c in str(parent) for c in "*?["):
            parent = parent.parent
        relative = os.path.relpath(pattern, str(parent)) if "://" not in pattern else pattern[len(str(parent)) + 1:]
        files = sorted(str(p) for p in parent.glob(relative)) if parent.exists() else []
    else:
        files = [pattern] if epath.Path(pattern).exists() else []
    if not files:
        raise UserFileNotFoundError(f"data file not found: {pattern}")
    for f in files:
        check_regular_file(f, "data file")
    return files


def check_regular_file(path: str, what: str) -> None:
    """A local path must be a regular file: a directory named x.jsonl, a FIFO (which would block the
    reader forever) or a device is refused by name."""
    if "://" in path or not os.path.exists(path):
        return
    if os.path.isdir(path):
        raise UserError(f"{what} {path} is a directory, not a file")
    if not os.path.isfile(path):
        raise UserError(f"{what} {path} is not a regular file (a FIFO, socket or device)")


def _read_bytes(path: str):
    """A local file memory-mapped (no copy), any other epath read whole."""
    if os.path.exists(path):
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                return b""
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    return epath.Path(path).read_bytes()


def _text_of(record: Any, text_key: str, where: str) -> str:
    if not isinstance(record, dict) or text_key not in record:
        raise UserError(f"{where}: no {text_key!r} field (set data.text_key)")
    text = record[text_key]
    if not isinstance(text, str):
        raise UserError(f"{where}: field {text_key!r} is {type(text).__name__} {json.dumps(text)[:40]}, not a string")
    return text


class JsonlSource:
    """One JSON object per line; the document is its `text_key` field. Blank lines are skipped."""

    def __init__(self, path: str, text_key: str = "text"):
        self.path, self.text_key = path, text_key
        self._buf = _read_bytes(path)
        data = np.frombuffer(self._buf, np.uint8) if len(self._buf) else np.zeros(0, np.uint8)
        ends = np.flatnonzero(data == ord("\n"))
        if len(data) and data[-1] != ord("\n"):
            ends = np.append(ends, len(data))
        starts = np.concatenate([[0], ends[:-1] + 1]).astype(np.int64)
        visible = np.flatnonzero(~np.isin(data, np.frombuffer(b" \t\r\n", np.uint8)))
        nonblank = np.searchsorted(visible, ends) > np.searchsorted(visible, starts)
        self._starts, self._ends = starts[nonblank], ends[nonblank]
        self._line_numbers = np.flatnonzero(nonblank) + 1  # 1-based line of each record (blank lines counted)

    def __len__(self) -> int:
        return len(self._starts)

    def record(self, index: int) -> tuple[Any, str]:
        """(the parsed JSON value of record `index`, "path: line n" for error messages)."""
        line = self._buf[self._starts[index]:self._ends[index]]
        where = f"{self.path}: line {self._line_numbers[index]}"
        try:
            return json.loads(bytes(line).decode("utf-8")), where
        except UnicodeDecodeError as err:
            raise UserError(f"{where} is not valid UTF-8 (byte {err.start})") from None
        except json.JSONDecodeError as err:
            raise UserError(f"{where} is not valid JSON ({err.msg})") from None

    def __getitem__(self, index: int) -> str:
        record, where = self.record(index)
        return _text_of(record, self.text_key, where)


class ParquetSource:
    """The `text_key` column of a Parquet file (read once, memory-mapped for local files)."""

    def __init__(self, path: str, text_key: str = "text"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.path, self.text_key = path, text_key
        source = path if os.path.exists(path) else epath.Path(path).open("rb")
        schema = pq.read_schema(source)
        if text_key not in schema.names:
            raise UserError(f"{path}: no {text_key!r} column (columns: {', '.join(schema.names)}; set data.text_key)")
        kind = schema.field(text_key).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise UserError(f"{path}: column {text_key!r} holds {kind}, not strings")
        self._column = pq.read_table(source, columns=[text_key], memory_map=os.path.exists(path)).column(0)

    def __len__(self) -> int:
        return len(self._column)

    def __getitem__(self, index: int) -> str:
        text = self._column[index].as_py()
        if text is None:
            raise UserError(f"{self.path}: row {index}: column {self.text_key!r} is null, not a string")
        return text


class ArrayRecordSource:
    """ArrayRecord records holding UTF-8 text, or JSON objects with a `text_key` field."""

    def __init__(self, path: str, text_key: str = "text"):
        import grain

        self.path, self.text_key = path, text_key
        self._records = grain.sources.ArrayRecordDataSource([path])

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> str:
        raw = self._records[index]
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise UserError(f"{self.path}: record {index} is not valid UTF-8 (byte {err.start})") from None
        if text.lstrip().startswith("{"):
            return _text_of(json.loads(text), self.text_key, f"{self.path}: record {index}")
        return text


class TokenArraySource:
    """A 1-D integer .npy token stream; documents end at each EOS (the EOS stays with its document)."""

    def __init__(self, path: str, eos_id: int | None):
        if eos_id is None:
            raise UserError(f"{path}: pre-tokenized data needs model.eos_token_id to split documents")
        self.path = path
        local = path if os.path.exists(path) else epath.Path(path).open("rb")
        tokens = np.load(local, mmap_mode="r" if isinstance(local, str) else None, allow_pickle=False)
        if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
            raise UserError(f"{path}: expected a 1-D integer token array, got {tokens.dtype} {tokens.shape}")
        self._tokens = tokens
        ends = np.flatnonzero(tokens == eos_id) + 1
        if len(tokens) and (not len(ends) or ends[-1] != len(tokens)):
            ends = np.append(ends, len(tokens))
        self._starts = np.concatenate([[0], ends[:-1]]).astype(np.int64)
        self._ends = ends.astype(np.int64)

    def check_ids(self, vocab_size: int) -> None:
        """Every id in [0, vocab_size), or one line naming the first offending position."""
        if not len(self._tokens):
            return
        low, high = int(self._tokens.min()), int(self._tokens.max())
        if low < 0 or high >= vocab_size:
            bad = low if low < 0 else high
            at = int(np.flatnonzero(np.asarray(self._tokens) == bad)[0])
            raise UserError(f"{self.path}: token id {bad} at position {at} is outside the vocabulary [0, {vocab_size})")

    def __len__(self) -> int:
        return len(self._starts)

    def __getitem__(self, index: int) -> np.ndarray:
        return np.asarray(self._tokens[self._starts[index]:self._ends[index]], dtype=np.int32)


def open_file(path: str, *, text_key: str, eos_id: int | None):
    """The source for one file, chosen by extension."""
    lower = path.lower()
    if lower.endswith((".jsonl", ".json")):
        return JsonlSource(path, text_key)
    if lower.endswith(".parquet"):
        return ParquetSource(path, text_key)
    if lower.endswith((".arrayrecord", ".array_record")):
        return ArrayRecordSource(path, text_key)
    if lower.endswith(".npy"):
        return TokenArraySource(path, eos_id)
    raise UserError(
        f"{path}: unknown data file type; use one of {', '.join(TEXT_EXTENSIONS + TOKEN_EXTENSIONS)}"
    )
