"""Prompt data for on-policy distillation: JSONL prompts -> token ids -> the sampler's block layout (grain).

Each JSONL record is one prompt: {"prompt": text}, {"prompt_ids": [ids]} or {"messages": [{"role":
..., "content": ...}, ...]} (the formats `edlm sample` reads, plus chat messages). With
`chat_template`, text prompts become a one-turn user conversation and are rendered with the
tokenizer's own chat template (transformers' `apply_chat_template`, read offline from the
tokenizer directory's tokenizer_config.json / chat_template.jinja) with the generation prompt appended.

Prompts longer than `max_prompt_len` keep their last tokens (the text nearest to what is generated).
A batch is the sampler's static-shape block layout (sample/layout.py) of `batch_size` prompts, so
the jitted OPD step can hand it straight to the compiled rollout:
    prefix, prefix_positions [B, D0], first_block [B, block_size], shift, remainder [B]   (int32)
Order, sharding by process, shuffling per epoch and the checkpointable iterator state are the same
as the text pipeline's (data/pipeline.py).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import grain
import numpy as np

from efficient_dlm.data import sources as sources_lib
from efficient_dlm.errors import UserError
from efficient_dlm.extras import require
from efficient_dlm.models.token_ids import check_token_ids
from efficient_dlm.data.pipeline import _split_list
from efficient_dlm.sample.layout import block_layout
from efficient_dlm.data.tokenize import load_tokenizer

PROMPT_KEYS = ("prompt", "prompt_ids", "messages")


@dataclasses.dataclass(frozen=True)
class PromptSpec:
    batch_size: int  # per process
    block_size: int
    max_prompt_len: int
    mask_id: int
    pad_id: int
    vocab_size: int
    tokenizer: str = ""
    chat_template: bool = False
    seed: int = 0
    num_threads: int = 2
    prefetch: int = 8


class PromptRecords(sources_lib.JsonlSource):
    """JSONL prompt records by index (the text pipeline's line index); each must hold a prompt key."""

    def __getitem__(self, index: int) -> dict[str, Any]:
        line = self._buf[self._starts[index]:self._ends[index]]
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{self.path}: line {index + 1} is not valid JSON ({err.msg})") from None
        if not isinstance(record, dict) or not any(k in record for k in PROMPT_KEYS):
            raise UserError(f"{self.path}: record {index} needs one of {', '.join(PROMPT_KEYS)}")
        return record


def chat_template_tokenizer(directory: str):
    """transformers' tokenizer of `directory` (offline), refusing one without a chat template."""
    AutoTokenizer = require("transformers", "test", "opd.chat_template").AutoTokenizer
    folder = os.path.dirname(directory) if os.path.isfile(directory) else directory
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if not getattr(tok, "chat_template", None):
        raise UserError(
            f"opd.chat_template is set but the tokenizer in {folder} has no chat template "
            "(tokenizer_config.json \"chat_template\" or chat_template.jinja)"
        )
    return tok


class PromptEncoder:
    """record -> int32 prompt ids (at most max_prompt_len, the last ones), checked against the vocabulary."""

    def __init__(self, spec: PromptSpec):
        self.spec = spec
        self._tokenizer = self._chat = None
        if spec.tokenizer:

            self._tokenizer = load_tokenizer(spec.tokenizer)
            if spec.chat_template:
                self._chat = chat_template_tokenizer(spec.tokenizer)
        elif spec.chat_template:
            raise UserError("opd.chat_template needs a tokenizer (init.tokenizer or the checkpoint's)")

    def _text_ids(self, record: dict[str, Any]) -> list[int]:
        if self._tokenizer is None:
            raise UserError("text prompts need a tokenizer (set init.tokenizer); or give \"prompt_ids\"")
        if self._chat is not None:
            messages = record.get("messages") or [{"role": "user", "content": str(record["prompt"])}]
            text = self._chat.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return self._tokenizer.encode(text, add_special_tokens=False).ids
        if "messages" in record:
            raise UserError("a \"messages\" prompt needs opd.chat_template=True")
        if not isinstance(record["prompt"], str):
            raise UserError(f"\"prompt\" must be a string: {json.dumps(record)[:80]}")
        return self._tokenizer.encode(record["prompt"]).ids

    def __call__(self, record: dict[str, Any]) -> np.ndarray:
        if "prompt_ids" in record:
            ids = check_token_ids(record["prompt_ids"], None, f"prompt {json.dumps(record)[:60]}").reshape(-1).tolist()
        else:
            ids = self._text_ids(record)
        if not ids:
            raise UserError(f"empty prompt: {json.dumps(record)[:80]}")
        ids = np.asarray(ids[-self.spec.max_prompt_len:], np.int32)
        if ids.min() < 0 or ids.max() >= self.spec.vocab_size:
            size = self.spec.vocab_size
            raise UserError(f"prompt token id outside the vocabulary (size {size}): {json.dumps(record)[:80]}")
        return ids


def _padded(ids: np.ndarray, width: int) -> dict[str, np.ndarray]:
    """Fixed-width row for batching (grain batches equal shapes); `length` marks the real ids."""
    row = np.zeros(width, np.int32)
    row[: len(ids)] = ids
    return {"ids": row, "length": np.int32(len(ids))}


def layout_batch(batch: dict[str, np.ndarray], spec: PromptSpec) -> dict[str, np.ndarray]:
    """The sampler's block layout of a batch of padded prompt rows (prompt capacity max_prompt_len).

    The rollout length does not change these arrays; the OPD step checks positions against the model.
    """
    rows = [ids[:n] for ids, n in zip(batch["ids"], batch["length"])]
    layout = block_layout(
        rows, block_size=spec.block_size, max_new_tokens=1, mask_id=spec.mask_id, pad_id=spec.pad_id,
        max_positions=np.iinfo(np.int32).max, capacity=spec.max_prompt_len,
    )
    return layout.arrays()


def build_prompt_dataset(
    files: str, spec: PromptSpec, *, train: bool = True, process_index: int = 0, process_count: int = 1
) -> grain.IterDataset:
    """Batches of laid-out prompts from comma-separated JSONL patterns. train: shuffled and repeated
    forever; otherwise read once in order (evaluation)."""
    patterns = _split_list(files)
    if not patterns:
        raise UserError("no prompt files given (set opd.prompt_files)" if train else "no evaluation prompts given")
    opened = [PromptRecords(f) for p in patterns for f in sources_lib.expand(p)]
    opened = [s for s in opened if len(s)]
    if not opened:
        raise UserError(f"{files}: no prompts")
    parts = [grain.MapDataset.source(s) for s in opened]
    ds = parts[0] if len(parts) == 1 else grain.MapDataset.concatenate(parts)
    ds = ds[process_index::process_count]
    if len(ds) < spec.batch_size:
        raise UserError(
            f"{files}: {len(ds)} prompts for process {process_index}, fewer than one batch of {spec.batch_size}"
        )
    if train:
        ds = ds.seed(spec.seed).shuffle().repeat()
    encoder = PromptEncoder(spec)
    ds = ds.map(lambda record: _padded(encoder(record), spec.max_prompt_len))
    stream = ds.to_iter_dataset(grain.ReadOptions(num_threads=spec.num_threads, prefetch_buffer_size=spec.prefetch))
    return stream.batch(spec.batch_size, drop_remainder=True).map(lambda b: layout_batch(b, spec))
