"""The demo's text corpus: the running interpreter's own standard library (source and docs).

Why this corpus: it is on every machine that runs Python, needs no network, and its licence (PSF)
allows redistributing what is trained on it. It mixes code (the top-level `Lib/*.py` modules) with
English prose (the reference documentation that `pydoc` ships as `pydoc_data.topics`).

Selection and order are deterministic for a given Python version: files sorted by name, each cut at
blank lines into documents of at most `max_chars` characters. The held-out split is decided by a
hash of the file (or topic) *name*, so it never depends on file contents or on a seed, and a file is
entirely in one split (no near-duplicate leakage between train and held-out text).
"""
from __future__ import annotations

import ast
import hashlib
import os
import sysconfig
from typing import Iterator

from efficient_dlm.errors import UserError, UserFileNotFoundError

HELD_OUT_ONE_IN = 20  # one source in 20 is held out
MAX_CHARS = 1200
# Machine-specific generated modules: their text differs between installations.
_EXCLUDED_PREFIXES = ("_sysconfigdata",)


def stdlib_dir() -> str:
    """The directory of the running interpreter's pure-Python standard library."""
    path = sysconfig.get_paths()["stdlib"]
    if not os.path.isdir(path):
        raise UserFileNotFoundError(f"{path}: the Python standard library source directory is missing")
    return path


def is_held_out(name: str) -> bool:
    """Held-out membership by a stable hash of a source's name (sha256, not Python's salted hash)."""
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") % HELD_OUT_ONE_IN == 0


def chunk_text(text: str, max_chars: int = MAX_CHARS) -> list[str]:
    """Greedy merge of blank-line separated paragraphs into pieces of at most max_chars.

    A single paragraph longer than max_chars is cut at line boundaries (and a single overlong line
    at max_chars), so every piece respects the bound.
    """
    pieces: list[str] = []
    current = ""
    for para in _paragraphs(text, max_chars):
        candidate = f"{current}\n\n{para}" if current else para
        if len(candidate) <= max_chars:
            current = candidate
            continue
        if current:
            pieces.append(current)
        current = para
    if current:
        pieces.append(current)
    return pieces


def _paragraphs(text: str, max_chars: int) -> Iterator[str]:
    for para in text.split("\n\n"):
        para = para.strip("\n")
        if not para.strip():
            continue
        if len(para) <= max_chars:
            yield para
            continue
        line_buf = ""
        for line in para.split("\n"):
            while len(line) > max_chars:
                yield line[:max_chars]
                line = line[max_chars:]
            if line_buf and len(line_buf) + 1 + len(line) > max_chars:
                yield line_buf
                line_buf = line
            else:
                line_buf = f"{line_buf}\n{line}" if line_buf else line
        if line_buf.strip():
            yield line_buf


def sources(directory: str | None = None) -> list[tuple[str, str]]:
    """(name, text) for every corpus source, in a fixed order: Lib/*.py, then the doc topics."""
    directory = directory or stdlib_dir()
    out = []
    for name in sorted(os.listdir(directory)):
        if not name.endswith(".py") or name.startswith(_EXCLUDED_PREFIXES):
            continue
        with open(os.path.join(directory, name), encoding="utf-8", errors="replace") as f:
            out.append((f"Lib/{name}", f.read()))
    out.extend(_doc_topics(directory))
    if not out:
        raise UserFileNotFoundError(f"{directory}: no standard-library sources found for the demo corpus")
    return out


def _doc_topics(directory: str) -> list[tuple[str, str]]:
    """pydoc's reference-manual topics (plain text), read as data, never imported."""
    path = os.path.join(directory, "pydoc_data", "topics.py")
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "topics" for t in node.targets):
            topics = ast.literal_eval(node.value)
            return [(f"docs/{key}", topics[key]) for key in sorted(topics)]
    return []


def documents(split: str, directory: str | None = None, max_chars: int = MAX_CHARS) -> list[str]:
    """The corpus documents of one split ("train" or "eval"), in deterministic order."""
    if split not in ("train", "eval"):
        raise UserError(f"unknown corpus split {split!r}; choose train or eval")
    want_held_out = split == "eval"
    docs = []
    for name, text in sources(directory):
        if is_held_out(name) == want_held_out:
            docs.extend(chunk_text(text, max_chars))
    return docs
