"""Text around the engine: the checkpoint's tokenizer, its chat template, and incremental detokenisation.

Streaming must never send text that a later token changes: a byte-level tokenizer can end a prefix
inside a UTF-8 character (decoded as U+FFFD until the rest arrives), and a stop string can start at
the end of one block and finish in the next. `TextStream` therefore sends only the decoded text that
is final: it holds back a trailing replacement character and the last len(longest stop) - 1
characters until the next tokens (or the end) settle them, so the chunks concatenate to exactly the
text of the non-streamed response (decode of all tokens, cut before the first stop string).

Chat messages are rendered with the tokenizer's own chat template by transformers'
`apply_chat_template`, read offline from the checkpoint's tokenizer directory.
"""
from __future__ import annotations

import os

from tokenizers import Tokenizer
from transformers import AutoTokenizer

from efficient_dlm.serve.engine import RequestError


class Texts:
    """The tokenizer of a checkpoint (tokenizer/tokenizer.json) and, if it has one, its chat template."""

    def __init__(self, directory: str | None):
        self.tokenizer = None
        self.chat = None
        if directory and os.path.exists(os.path.join(directory, "tokenizer.json")):
            self.tokenizer = Tokenizer.from_file(os.path.join(directory, "tokenizer.json"))
            if os.path.exists(os.path.join(directory, "tokenizer_config.json")):
                hf = AutoTokenizer.from_pretrained(directory, local_files_only=True)
                self.chat = hf if getattr(hf, "chat_template", None) else None

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise RequestError("this model has no tokenizer: send the prompt as a list of token ids", "prompt")
        return self.tokenizer.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        if self.tokenizer is None:
            return "".join(f"<{i}>" for i in ids)  # token ids as text: a tokenizer-less model is still usable
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def render_chat(self, messages: list[dict]) -> list[int]:
        if self.chat is None:
            raise RequestError("this model's tokenizer has no chat template (tokenizer_config.json \"chat_template\"); "
                               "use /v1/completions", "messages")
        text = self.chat.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.encode(text)


class TextStream:
    """Tokens in, final text out: `add(new_tokens, finished)` -> (text delta, stop string hit)."""

    def __init__(self, texts: Texts, stops: list[str]):
        self.texts, self.stops = texts, [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.ids: list[int] = []
        self.sent = 0  # characters of the text already sent
        self.text = ""

    def add(self, tokens: list[int], finished: bool) -> tuple[str, bool]:
        self.ids += tokens
        text = self.texts.decode(self.ids)
        cut = min((i for i in (text.find(s, self.sent) for s in self.stops) if i >= 0), default=-1)  # held back: never before sent
        if cut >= 0:
            self.text = text[:cut]
            return self._delta(cut), True
        self.text = text
        if finished:
            return self._delta(len(text)), False
        end = len(text) - self.hold
        while end > self.sent and text[end - 1] == "\ufffd":
            end -= 1
        return self._delta(end), False

    def _delta(self, end: int) -> str:
        if end <= self.sent:
            return ""
        out = self.text[self.sent:end]
        self.sent = end
        return out
