"""The `data` config section: sources, tokenization and packing (grain pipelines in data/pipeline.py).

Its fields and defaults are the section's schema (`--config.data.key=value`); `validate()` checks what
the section alone decides (file existence is checked when a run opens them).
"""
from __future__ import annotations

import dataclasses

from efficient_dlm.data.pipeline import FORMATS
from efficient_dlm.errors import UserError
from efficient_dlm.section import Section, choice


@dataclasses.dataclass(frozen=True)
class DataConfig(Section):
    SECTION = "data"

    train_files: str = ""  # comma-separated paths / globs: .jsonl .parquet .arrayrecord .npy
    train_weights: str = ""  # comma-separated mixture weights, one per train_files item
    eval_files: str = ""
    text_key: str = "text"  # JSON field / Parquet column holding the document
    seq_len: int = 256
    packing: bool = True  # pack documents (segment ids) or pad one document per row
    add_bos: bool = False  # prepend model.bos_token_id to every document (text; a chat template writes its own)
    format: str = "text"  # text: documents | chat: JSONL conversations, only assistant tokens supervised (README, Chat SFT)
    chat_template: str = ""  # chat: "" the tokenizer's own | "builtin" | "plain" (data/chat.py) | a .jinja file
    num_threads: int = 2
    prefetch: int = 8

    def validate(self) -> None:
        if self.seq_len <= 1:
            raise UserError(f"data.seq_len must be at least 2, got {self.seq_len}")
        if self.num_threads < 1 or self.prefetch < 0:
            raise UserError(f"data.num_threads must be >= 1 and data.prefetch >= 0, got {self.num_threads}, {self.prefetch}")
        choice(self.format, FORMATS, "data.format")
        if self.chat_template and self.format != "chat":
            raise UserError(
                f"data.chat_template is set ({self.chat_template!r}) but data.format is {self.format!r}; set data.format=chat"
            )
