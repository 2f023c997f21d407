"""The demo teacher's byte-level BPE tokenizer, trained with the `tokenizers` library.

Byte-level (GPT-2 / Qwen style) so any text round-trips; digits are split one per token (as Llama
and Qwen do) so arithmetic sees place values, each keeping the space before it (" 7" is one token,
as " k" is), so that every space-separated task symbol is exactly one token. (The first demo
tokenizer split " 7" into " " and "7": digit symbols took two positions and letters one, and the
teacher reached only 63% on reverse over such irregular spacing, 100% after this change.)

Special tokens: `<|endoftext|>` (id 0, end of document and padding) and `<|mask|>` (id 1, the token
a dLM learns to fill). The result is saved as
`tokenizer.json` + `tokenizer_config.json`, the Hugging Face format that `AutoTokenizer` /
`PreTrainedTokenizerFast` and our data pipeline read.
"""
from __future__ import annotations

import json
import os
from typing import Iterable

from efficient_dlm.errors import UserError, UserFileNotFoundError

EOS = "<|endoftext|>"
MASK = "<|mask|>"
SPECIAL_TOKENS = (EOS, MASK)
EOS_ID, MASK_ID = 0, 1


def build_tokenizer():
    """An untrained byte-level BPE: one digit per pre-token, with its leading space if any."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.BPE())
    digit = pre_tokenizers.Split(Regex(r" ?\p{N}"), behavior="isolated")
    tok.pre_tokenizer = pre_tokenizers.Sequence([digit, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer(texts: Iterable[str], vocab_size: int = 3072):
    """Trains the BPE on `texts`; special tokens get ids 0 and 1."""
    from tokenizers import pre_tokenizers, trainers

    if vocab_size < 512:
        raise UserError(f"tokenizer vocab_size must be at least 512 (256 bytes + merges), got {vocab_size}")
    tok = build_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    for token, want in zip(SPECIAL_TOKENS, (EOS_ID, MASK_ID)):
        if tok.token_to_id(token) != want:
            raise RuntimeError(f"special token {token} got id {tok.token_to_id(token)}, expected {want}")
    return tok


def save_hf(tok, out_dir: str, model_max_length: int = 2048) -> str:
    """Writes tokenizer.json and tokenizer_config.json (PreTrainedTokenizerFast) into out_dir."""
    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": model_max_length,
        "eos_token": EOS,
        "pad_token": EOS,
        "mask_token": MASK,
        "unk_token": None,
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "add_bos_token": False,
        "add_eos_token": False,
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w") as f:
        json.dump({"eos_token": EOS, "pad_token": EOS, "mask_token": MASK}, f, indent=2)
    return out_dir


def load(directory: str):
    """The `tokenizers.Tokenizer` stored in directory/tokenizer.json."""
    from tokenizers import Tokenizer

    path = os.path.join(directory, "tokenizer.json")
    if not os.path.exists(path):
        raise UserFileNotFoundError(f"{directory}: no tokenizer.json")
    return Tokenizer.from_file(path)
