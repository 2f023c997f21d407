"""grain pipelines: sources -> tokens -> packed (or padded) sequences -> per-process batches.

A batch is a dict of int32 numpy arrays [per_process_batch, seq_len]:
    tokens        token ids; documents end with EOS
    segment_ids   1, 2, ... per document inside a row, 0 on padding (attention never crosses them)
    positions     restart at 0 for every document (RoPE positions)
    loss_weights  float32, 1 on real tokens and 0 on padding (callers may reweight, e.g. prompts)
With format "chat" (data/chat.py) each row holds whole conversations, loss_weights is 1 only on the
assistant tokens and a bool `maskable` marks the same tokens (the only ones an objective may mask); every
conversation starts at a multiple of `align` (the block size) so its blocks are the sampler's
(docs/METHOD.md section 11), packed first-fit (grain's `FirstFitPackIterDataset`, never split across rows).
Order is a pure function of the seed: each source is sliced by process (`jax.process_index()`),
shuffled per epoch and repeated; sources are mixed by weight (`MapDataset.mix`); packing uses grain's
`ConcatThenSplitIterDataset` (long documents continue in the next row). The returned grain iterator
has `get_state()` / `set_state()`, checkpointed with the train state so a resumed run sees exactly
the batches it would have seen.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterator

import grain
import numpy as np

from efficient_dlm.data import chat as chat_lib
from efficient_dlm.data import sources as sources_lib
from efficient_dlm.data.tokenize import Encoder, load_tokenizer
from efficient_dlm.errors import UserError


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """What the pipeline needs, independent of the config layout."""

    seq_len: int
    batch_size: int  # per process
    eos_id: int | None
    vocab_size: int
    tokenizer: str = ""
    text_key: str = "text"
    packing: bool = True
    bos_id: int | None = None
    pad_id: int = 0
    seed: int = 0
    num_threads: int = 2
    prefetch: int = 8
    format: str = "text"  # text | chat (FORMATS)
    chat_template: str = ""  # chat: "" the tokenizer's, "builtin", or a .jinja file (data/chat.py)
    align: int = 1  # chat: conversations start at multiples of this (the block size)


FORMATS = ("text", "chat")


def _split_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def parse_weights(files: list[str], weights: str) -> list[float]:
    if not weights:
        return [1.0] * len(files)
    values = [float(w) for w in _split_list(weights)]
    if len(values) != len(files) or any(w < 0 for w in values) or not sum(values) > 0:
        raise UserError(f"data weights {weights!r} must be {len(files)} non-negative numbers, not all zero")
    return values


def _open_pattern(pattern: str, spec: DataSpec) -> tuple[grain.MapDataset, bool]:
    """All files of one pattern concatenated; (dataset, is_text). Rejects empty or mixed kinds."""
    opened = [_open_file(f, spec) for f in sources_lib.expand(pattern)]
    kinds = {isinstance(s, sources_lib.TokenArraySource) for s in opened}
    if len(kinds) > 1:
        raise UserError(f"{pattern}: mixes pre-tokenized and text files; give them as separate sources")
    if sum(len(s) for s in opened) == 0:
        raise UserError(f"{pattern}: empty dataset (no documents)")
    for s in opened:
        if isinstance(s, sources_lib.TokenArraySource):
            s.check_ids(spec.vocab_size)
    datasets = [grain.MapDataset.source(s) for s in opened if len(s)]
    ds = datasets[0] if len(datasets) == 1 else grain.MapDataset.concatenate(datasets)
    return ds, not kinds.pop()


def _open_file(path: str, spec: DataSpec):
    if spec.format != "chat":
        return sources_lib.open_file(path, text_key=spec.text_key, eos_id=spec.eos_id)
    if not path.lower().endswith((".jsonl", ".json")):
        raise UserError(f"{path}: data.format=chat reads JSONL conversations (.jsonl), not this file type")
    return chat_lib.ChatRecords(path)


def _encoder(spec: DataSpec) -> Encoder | chat_lib.ChatEncoder:
    if spec.eos_id is None:
        raise UserError("model.eos_token_id is not set; it separates documents in text data")
    tokenizer = load_tokenizer(spec.tokenizer)
    if tokenizer.get_vocab_size() > spec.vocab_size:
        raise UserError(
            f"tokenizer {spec.tokenizer} has {tokenizer.get_vocab_size()} tokens, more than model.vocab_size {spec.vocab_size}"
        )
    if spec.format == "chat":
        return chat_lib.ChatEncoder(spec.tokenizer, eos_id=spec.eos_id, chat_template=spec.chat_template,
                                    max_len=spec.seq_len)
    return Encoder(tokenizer, spec.eos_id, spec.bos_id)


def _pad_row(spec: DataSpec, tokens: np.ndarray) -> dict[str, np.ndarray]:
    n = min(len(tokens), spec.seq_len)
    out = np.full(spec.seq_len, spec.pad_id, np.int32)
    out[:n] = tokens[:n]
    segment_ids = (np.arange(spec.seq_len) < n).astype(np.int32)
    return _with_weights({"tokens": out, "segment_ids": segment_ids, "positions": np.arange(spec.seq_len, dtype=np.int32)})


def _with_weights(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {**batch, "loss_weights": (batch["segment_ids"] > 0).astype(np.float32)}


def _chat_weights(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Assistant tokens only: the loss weight and the maskable set (padding never)."""
    assistant = (batch.pop("assistant") > 0) & (batch["segment_ids"] > 0)
    return {**batch, "loss_weights": assistant.astype(np.float32), "maskable": assistant}


def _pad_chat_row(spec: DataSpec, row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    padded = _pad_row(spec, row["tokens"])
    assistant = np.zeros(spec.seq_len, np.int32)
    assistant[: len(row["assistant"])] = row["assistant"][: spec.seq_len]
    return _chat_weights({**padded, "assistant": assistant})


def _rename_chat(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return _chat_weights({
        "tokens": batch["tokens"].astype(np.int32),
        "segment_ids": batch["tokens_segment_ids"].astype(np.int32),
        "positions": batch["tokens_positions"].astype(np.int32),
        "assistant": batch["assistant"],
    })


def _chat_rows(stream: grain.IterDataset, spec: DataSpec) -> grain.IterDataset:
    """Batches of whole conversations: first-fit packed, each starting at a multiple of spec.align
    (the cells skipped to get there are padding, segment 0), or one per row."""
    if not spec.packing:
        return stream.map(lambda row: _pad_chat_row(spec, row)).batch(spec.batch_size, drop_remainder=True)
    if spec.seq_len % spec.align:
        raise UserError(f"data.seq_len {spec.seq_len} is not a multiple of the block size {spec.align}")
    lengths = {"tokens": spec.seq_len, "assistant": spec.seq_len}
    packed = grain.experimental.FirstFitPackIterDataset(
        stream, length_struct=lengths, num_packing_bins=spec.batch_size, shuffle_bins=False,
        pack_alignment_struct={"tokens": spec.align, "assistant": spec.align},
        padding_struct={"tokens": spec.pad_id, "assistant": 0},
    )
    return packed.batch(spec.batch_size, drop_remainder=True).map(_rename_chat)


def _rename_packed(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return _with_weights({
        "tokens": batch["tokens"].astype(np.int32),
        "segment_ids": batch["tokens_segment_ids"].astype(np.int32),
        "positions": batch["tokens_positions"].astype(np.int32),
    })


def build_dataset(
    files: str,
    spec: DataSpec,
    *,
    weights: str = "",
    train: bool = True,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.IterDataset:
    """Batches from comma-separated file patterns. train: shuffled, repeated forever and mixed by
    weight; otherwise read once in order (evaluation)."""
    patterns = _split_list(files)
    if not patterns:
        raise UserError("no data files given (set data.train_files)" if train else "no evaluation files given")
    mix_weights = parse_weights(patterns, weights)
    encoder = None
    parts = []
    for i, pattern in enumerate(patterns):
        ds, is_text = _open_pattern(pattern, spec)
        ds = ds[process_index::process_count]
        if len(ds) == 0:
            raise UserError(f"{pattern}: empty dataset for process {process_index} of {process_count}")
        if train:
            ds = ds.seed(spec.seed + i).shuffle().repeat()
        if is_text:
            encoder = encoder or _encoder(spec)
            ds = ds.map(encoder)
        parts.append(ds)
    if len(parts) == 1:
        mixed = parts[0]
    elif train:
        mixed = grain.MapDataset.mix(parts, mix_weights)
    else:
        mixed = grain.MapDataset.concatenate(parts)
    options = grain.ReadOptions(num_threads=spec.num_threads, prefetch_buffer_size=spec.prefetch)
    stream = mixed.to_iter_dataset(options)
    if spec.format == "chat":
        return _chat_rows(stream, spec)
    if spec.packing:
        stream = grain.experimental.ConcatThenSplitIterDataset(
            stream.map(lambda t: {"tokens": t}), length_struct={"tokens": spec.seq_len}
        )
        return stream.batch(spec.batch_size, drop_remainder=True).map(_rename_packed)
    return stream.map(lambda t: _pad_row(spec, t)).batch(spec.batch_size, drop_remainder=True)


def take(dataset: grain.IterDataset, count: int) -> list[dict[str, Any]]:
    """The first `count` batches (fewer if the dataset ends); ValueError if there is none."""
    batches: list[dict[str, Any]] = []
    iterator: Iterator = iter(dataset)
    for batch in iterator:
        batches.append(batch)
        if len(batches) == count:
            break
    if not batches:
        raise UserError("evaluation data holds fewer documents than one batch (data.eval_files)")
    return batches
