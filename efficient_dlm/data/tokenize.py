"""Tokenization with a checkpoint's Hugging Face `tokenizer.json` (the `tokenizers` library)."""
from __future__ import annotations

import os

import numpy as np

from efficient_dlm.errors import UserFileNotFoundError


def tokenizer_file(path: str) -> str:
    """`path` itself if it is a tokenizer.json, else `path/tokenizer.json`; FileNotFoundError if absent."""
    candidate = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    if not path or not os.path.isfile(candidate):
        raise UserFileNotFoundError(f"tokenizer not found: {path or '(none)'} (set init.tokenizer to a tokenizer.json or its directory)")
    return candidate


def load_tokenizer(path: str):
    import tokenizers

    return tokenizers.Tokenizer.from_file(tokenizer_file(path))


class Encoder:
    """text -> int32 ids [bos] + ids + [eos]: documents are separated by EOS once concatenated."""

    def __init__(self, tokenizer, eos_id: int, bos_id: int | None = None):
        self.tokenizer, self.eos_id, self.bos_id = tokenizer, eos_id, bos_id

    def __call__(self, text: str) -> np.ndarray:
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        head = [] if self.bos_id is None else [self.bos_id]
        return np.asarray(head + ids + [self.eos_id], dtype=np.int32)
