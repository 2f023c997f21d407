"""Chat SFT data: JSONL conversations -> the checkpoint's chat template -> token ids + an assistant mask.

A record is {"messages": [{"role": "system" | "user" | "assistant", "content": text}, ...]} (multi-turn)
or {"prompt": text, "response": text} (one user turn and its answer; an optional "system" text). It is
rendered with the tokenizer's own chat template by transformers' `apply_chat_template`, read offline
from the tokenizer directory (tokenizer_config.json's "chat_template" or chat_template.jinja), or with
`data.chat_template`: "builtin" (BUILTIN_TEMPLATE below, for tokenizers that ship none, such as the
byte tokenizer and the demo's BPE), "plain" (contents concatenated, EOS after each reply: a base
model's raw prompt/answer format, supervised on the answer only) or a .jinja file. The trainer writes the template it used into the
run's tokenizer/ directory, so `edlm sample --chat`, `edlm serve` and lm-eval render prompts with it.

Which tokens are supervised (docs/METHOD.md section 11): assistant turn i covers exactly what the
sampler would have to generate after the prompt `render(messages[:i], add_generation_prompt=True)`:
the rendered text from the end of that prompt to the end of the turn's content, plus the end-of-turn
token (the first token the template writes after the content, e.g. <|im_end|>, <|eot_id|>, or EOS for
the builtin template). Everything else (system and user turns, role headers, separators) stays clean.
The text is tokenized piece by piece at these boundaries, so the prompt part of every turn has exactly
the ids that `edlm sample --chat` feeds the model for that history.

Why our own code: transformers' `return_assistant_tokens_mask` needs templates with {% generation %}
markers, which the common checkpoints (Qwen3, Llama 3) do not have; the prefix rule above works with
any template whose rendering of a history is a prefix of the rendering of the longer conversation,
and refuses (UserError naming the record) a template that is not.
"""
from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from efficient_dlm.data.sources import JsonlSource
from efficient_dlm.data.tokenize import load_tokenizer
from efficient_dlm.errors import UserError, UserFileNotFoundError
from efficient_dlm.extras import require

ROLES = ("system", "user", "assistant")
BUILTIN = "builtin"
# Each turn is "<|role|>" + content + EOS; the generation prompt is "<|assistant|>". EOS ends every
# turn, so the sampler's default stop token (model.eos_token_id) ends a reply.
BUILTIN_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + eos_token }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>' }}{%- endif -%}"
)
# "plain": the turns' contents concatenated, EOS after each reply and nothing else: a prompt/response
# record renders exactly as the raw document prompt + response + EOS, so a base model's own task
# format trains prompt-clean (the demo's conversion) and decodes from the raw prompt.
PLAIN = "plain"
PLAIN_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ message['content'] }}{%- if message['role'] == 'assistant' -%}{{ eos_token }}{%- endif -%}"
    "{%- endfor -%}"
)
TEMPLATE_FILE = "chat_template.jinja"
Conversation = tuple[str, list[dict[str, str]]]  # (where: "file: line n", messages)


class ChatRecords(JsonlSource):
    """JSONL conversations by index: (where, messages), each record checked with one line naming file:line."""

    def __getitem__(self, index: int) -> Conversation:
        record, where = self.record(index)
        return where, messages_of(record, where)


def messages_of(record: Any, where: str) -> list[dict[str, str]]:
    """The validated messages of one record ({"messages": [...]} or {"prompt", "response"[, "system"]})."""
    if not isinstance(record, dict):
        raise UserError(f"{where}: a chat record must be a JSON object with \"messages\" or \"prompt\" and \"response\"")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise UserError(f"{where}: \"messages\" must be a non-empty list of {{\"role\", \"content\"}} objects")
    elif "prompt" in record and "response" in record:
        messages = [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["response"]}]
        if "system" in record:
            messages.insert(0, {"role": "system", "content": record["system"]})
    else:
        raise UserError(f"{where}: needs \"messages\" or both \"prompt\" and \"response\" (data.format=chat)")
    out = []
    for k, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            role = message.get("role") if isinstance(message, dict) else message
            raise UserError(f"{where}: message {k} has role {role!r}; use one of {', '.join(ROLES)}")
        if not isinstance(message.get("content"), str):
            raise UserError(f"{where}: message {k} ({message['role']}) needs a string \"content\"")
        out.append({"role": message["role"], "content": message["content"]})
    if not any(m["role"] == "assistant" for m in out):
        raise UserError(f"{where}: no assistant message, so nothing to supervise")
    return out


def hf_tokenizer(directory: str, eos_id: int | None):
    """transformers' tokenizer of `directory` (offline): AutoTokenizer when it has a tokenizer_config.json,
    else the bare tokenizer.json with EOS named from `eos_id` (what templates call eos_token)."""
    transformers = require("transformers", "test", "data.format=chat")
    folder = os.path.dirname(directory) if os.path.isfile(directory) else directory
    if os.path.exists(os.path.join(folder, "tokenizer_config.json")):
        tok = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    else:
        tok = transformers.PreTrainedTokenizerFast(tokenizer_file=os.path.join(folder, "tokenizer.json"))
    if tok.eos_token is None and eos_id is not None:
        tok.eos_token = tok.convert_ids_to_tokens(int(eos_id))
    return tok


def resolve_template(setting: str, hf_tok, folder: str) -> str:
    """The template text for data.chat_template: "" the tokenizer's own, "builtin", or a .jinja file."""
    if setting == BUILTIN:
        return BUILTIN_TEMPLATE
    if setting == PLAIN:
        return PLAIN_TEMPLATE
    if setting:
        if not os.path.isfile(setting):
            raise UserFileNotFoundError(f"data.chat_template {setting!r}: no such file (or use \"builtin\" or \"\")")
        with open(setting, encoding="utf-8") as f:
            return f.read()
    template = getattr(hf_tok, "chat_template", None)
    if not isinstance(template, str) or not template:
        raise UserError(
            f"the tokenizer in {folder} has no chat template (tokenizer_config.json \"chat_template\" or "
            f"{TEMPLATE_FILE}); to train on chat data set data.chat_template=builtin (README, Chat SFT) or a .jinja file"
        )
    return template


class ChatEncoder:
    """(where, messages) -> {"tokens", "assistant"} int32 [n <= max_len]: the rendered conversation's ids
    and 1 on the supervised tokens of every assistant turn (module docstring)."""

    def __init__(self, tokenizer_dir: str, *, eos_id: int | None, chat_template: str = "", max_len: int | None = None):
        self.tokenizer = load_tokenizer(tokenizer_dir)
        self.hf = hf_tokenizer(tokenizer_dir, eos_id)
        folder = os.path.dirname(tokenizer_dir) if os.path.isfile(tokenizer_dir) else tokenizer_dir
        self.template = resolve_template(chat_template, self.hf, folder)
        self.max_len = max_len

    def render(self, messages: list[dict[str, str]], generation_prompt: bool, where: str = "chat") -> str:
        try:
            return self.hf.apply_chat_template(messages, chat_template=self.template, tokenize=False,
                                               add_generation_prompt=generation_prompt)
        except Exception as err:  # jinja2 TemplateError / the template's raise_exception: one line, the record
            raise UserError(f"{where}: the chat template cannot render this conversation ({' '.join(str(err).split())})") from None

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """The sampler's prompt for a history: render(messages, generation prompt), ids without added specials."""
        return self._ids(self.render(messages, True))

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids if text else []

    def pieces(self, where: str, messages: list[dict[str, str]]) -> list[tuple[str, bool]]:
        """The rendered conversation cut into (text, supervised) pieces at the assistant turns' boundaries."""
        full = self.render(messages, False, where)
        pieces, done = [], 0
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            head = self.render(messages[:i], True, where)
            if not full.startswith(head) or len(head) < done:
                raise UserError(f"{where}: the chat template renders the history before assistant message {i} "
                                "differently from the whole conversation; its turns cannot be supervised as the sampler sees them")
            content = message["content"].strip()
            at = full.find(content, len(head))
            if at < 0:
                raise UserError(f"{where}: assistant message {i}'s content does not appear in the rendered conversation "
                                "(the chat template rewrites it)")
            pieces += [(full[done:len(head)], False), (full[len(head):at + len(content)], True)]
            done = at + len(content)
        return pieces + [(full[done:], False)]

    def __call__(self, conversation: Conversation) -> dict[str, np.ndarray]:
        where, messages = conversation
        tokens: list[int] = []
        assistant: list[int] = []
        end_of_turn = False  # the first token after a supervised piece is its turn's end-of-turn token
        for text, supervised in self.pieces(where, messages):
            ids = self._ids(text)
            flags = [int(supervised)] * len(ids)
            if end_of_turn and ids:
                flags[0] = 1
            end_of_turn = supervised
            tokens += ids
            assistant += flags
        n = len(tokens) if self.max_len is None else min(len(tokens), self.max_len)
        return {"tokens": np.asarray(tokens[:n], np.int32), "assistant": np.asarray(assistant[:n], np.int32)}

    def end_of_turn_id(self) -> int | None:
        """The token the template writes after an assistant reply (the sampler's stop), None if it writes none."""
        messages = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
        pieces = self.pieces("end-of-turn probe", messages)
        after = next(i for i, (_, supervised) in enumerate(pieces) if supervised) + 1
        ids = self._ids(pieces[after][0])
        return ids[0] if ids else None


def install_template(tokenizer_dir: str, template: str, eos_token: str | None) -> None:
    """Makes `template` the chat template of a run's tokenizer directory (chat_template.jinja, which
    transformers prefers, and tokenizer_config.json's key), writing a minimal tokenizer_config.json for a
    bare tokenizer.json so AutoTokenizer, `edlm serve` and lm-eval load it with the template."""
    with open(os.path.join(tokenizer_dir, TEMPLATE_FILE), "w", encoding="utf-8") as f:
        f.write(template)
    path = os.path.join(tokenizer_dir, "tokenizer_config.json")
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos_token}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
        if "chat_template" not in config:
            return
    config["chat_template"] = template
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    os.replace(path + ".tmp", path)
