"""Small synthetic corpora written on the fly for data and training tests (no downloads)."""
from __future__ import annotations

import json
import random

from efficient_dlm.data.byte_tokenizer import ASSET_DIR as BYTE_TOKENIZER  # noqa: F401  (re-exported)

WORDS = "the cat sat on a mat and dog ran far away from home while birds sang songs".split()


def documents(count: int, seed: int = 0, prefix: str = "") -> list[str]:
    rng = random.Random(seed)
    return [prefix + " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 12))) for _ in range(count)]


def write_jsonl(path, docs: list[str], key: str = "text") -> str:
    with open(path, "w") as f:
        for doc in docs:
            f.write(json.dumps({key: doc}) + "\n")
    return str(path)
