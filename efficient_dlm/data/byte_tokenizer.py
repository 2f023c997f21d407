"""A byte-level tokenizer (ByT5-style: one token per UTF-8 byte) for models trained from scratch.

Ids: 0 <pad>, 1 <eos>, 2 <bos>, then the 256 bytes (3..258). It is a real `tokenizer.json` (byte-level
pre-tokenizer and decoder, BPE model without merges), loaded like any checkpoint's tokenizer; the
tiny recipes use the copy shipped in efficient_dlm/assets/byte_tokenizer/, which `build()` recreates.
"""
from __future__ import annotations

import os

SPECIALS = ("<pad>", "<eos>", "<bos>")
ASSET_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "byte_tokenizer")


def build():
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), key=lambda ch: _byte_of(ch))
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    vocab.update({ch: len(SPECIALS) + i for i, ch in enumerate(alphabet)})
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True) for t in SPECIALS])
    return tokenizer


def _byte_of(ch: str) -> int:
    """The byte a ByteLevel alphabet character stands for (GPT-2's bytes_to_unicode inverse)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    if ord(ch) in printable:
        return ord(ch)
    others = [b for b in range(256) if b not in printable]
    return others[ord(ch) - 256]


if __name__ == "__main__":
    os.makedirs(ASSET_DIR, exist_ok=True)
    build().save(os.path.join(ASSET_DIR, "tokenizer.json"))
    print(f"wrote {ASSET_DIR}/tokenizer.json")
