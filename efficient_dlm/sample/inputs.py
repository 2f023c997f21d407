"""What `edlm sample` and `edlm bench` read: the model (checkpoint, HF directory or random init), its
tokenizer (the `tokenizers` library, from the checkpoint's tokenizer/ directory) and prompt files.

How the model decodes is not read here: it is the model's DiffusionSpec (`model.spec`, from the
checkpoint; for an HF directory or a random init, from the recipe), which `generate` reads itself.
"""
from __future__ import annotations

import dataclasses
import json
import os

from tokenizers import Tokenizer

from efficient_dlm import checkpoints
from efficient_dlm.config import Config, to_plain
from efficient_dlm.data.chat import ChatEncoder
from efficient_dlm.data.sources import check_regular_file
from efficient_dlm.diffusion.spec import spec_from_recipe, with_spec
from efficient_dlm.errors import UserError, UserFileNotFoundError
from efficient_dlm.models.decoder import init_model
from efficient_dlm.models.quantize import Quantization, quantize_model
from efficient_dlm.models.token_ids import check_token_ids
from efficient_dlm.port.hf_import import from_hf
from efficient_dlm.sample.config import quantization_kwargs


@dataclasses.dataclass
class Prompt:
    ids: list[int]
    text: str | None = None
    reference: str | None = None
    where: str | None = None  # "file:line" of a prompt read from a file (error messages)


def _tokenizer(directory: str | None):
    if not directory:
        return None
    path = os.path.join(directory, "tokenizer.json")
    if not os.path.exists(path):
        raise UserFileNotFoundError(f"{directory}: no tokenizer.json")
    return Tokenizer.from_file(path)


@dataclasses.dataclass
class Source:
    model: object  # with its DiffusionSpec attached (model.spec)
    tokenizer: object | None  # tokenizers.Tokenizer
    description: str
    tokenizer_dir: str | None = None  # where the tokenizer (and its chat template) lives


def load_source(ckpt: str | None, config: Config, step: int | None = None) -> Source:
    """--ckpt, else config.init.checkpoint, else config.init.hf_dir, else random weights from config.model,
    quantized as the sample section asks (sample.quantize, ...; unset: as stored).
    step: the step of a training run directory (default: the newest).

    A checkpoint brings its own spec; a model from an HF directory (unless a dLM export, which records
    one) or a random init gets the spec the recipe would train it with.
    """
    source = _load_source(ckpt, config, step)
    quantized = quantize_model(source.model, **quantization_kwargs(config.sample))
    if quantized is not source.model:
        source.model = quantized
        source.description += f" ({Quantization.of(quantized.config).describe()})"
    return source


def _load_source(ckpt: str | None, config: Config, step: int | None = None) -> Source:
    ckpt = ckpt or config.init.checkpoint
    if step is not None and not ckpt:
        raise UserError("--step needs --ckpt (a training run directory)")
    tokenizer_dir = config.init.tokenizer or None
    if ckpt:
        if not os.path.isdir(ckpt):
            raise UserFileNotFoundError(f"checkpoint directory {ckpt!r} does not exist")
        model = checkpoints.load(ckpt, step=step)
        tokenizer_dir = tokenizer_dir or checkpoints.tokenizer_dir(ckpt)
        where = os.path.abspath(ckpt) + ("" if step is None else f" step {step}")
        return Source(model, _tokenizer(tokenizer_dir), where, tokenizer_dir)
    if config.init.hf_dir:
        model = from_hf(config.init.hf_dir, dtype=config.model.param_dtype)
        if getattr(model, "spec", None) is None:
            with_spec(model, spec_from_recipe(to_plain(config), model.config))
        if tokenizer_dir is None and os.path.exists(os.path.join(config.init.hf_dir, "tokenizer.json")):
            tokenizer_dir = config.init.hf_dir
        return Source(model, _tokenizer(tokenizer_dir), os.path.abspath(config.init.hf_dir), tokenizer_dir)
    model = init_model(config.model, seed=config.init.seed)
    with_spec(model, spec_from_recipe(to_plain(config), model.config))
    return Source(model, _tokenizer(tokenizer_dir), f"random weights (config.model, seed {config.init.seed})", tokenizer_dir)


def load_verifier(ckpt: str, config: Config):
    """The verifier of speculative decoding: 'self' (the dLM's own weights in causal mode) or an AR checkpoint."""
    if ckpt == "self":
        return "self"
    return load_source(ckpt, config).model


def read_prompts(path: str) -> list[Prompt]:
    """JSONL: {"prompt": text} or {"prompt_ids": [ids]}, optionally "reference" (or "answer")."""
    if not os.path.exists(path):
        raise UserFileNotFoundError(f"prompt file {path!r} does not exist")
    check_regular_file(path, "prompt file")
    prompts = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise UserError(f"{path}:{number}: not valid UTF-8 (byte {err.start})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise UserError(f"{path}:{number}: not a JSON object") from None
            if not isinstance(record, dict) or ("prompt" not in record and "prompt_ids" not in record):
                raise UserError(f"{path}:{number}: needs a \"prompt\" (text) or \"prompt_ids\" (token ids) field")
            reference = record.get("reference", record.get("answer"))
            text = record.get("prompt")
            if "prompt_ids" not in record and not isinstance(text, str):
                raise UserError(f"{path}:{number}: \"prompt\" must be a string, got {type(text).__name__} {json.dumps(text)[:40]}")
            ids = check_token_ids(record.get("prompt_ids", []), None, f"{path}:{number}: \"prompt_ids\"").reshape(-1).tolist()
            if "prompt_ids" in record and not ids:
                raise UserError(f"{path}:{number}: \"prompt_ids\" is empty")
            prompts.append(Prompt(ids, text if isinstance(text, str) else None, None if reference is None else str(reference),
                                  f"{path}:{number}"))
    if not prompts:
        raise UserError(f"{path}: no prompts")
    return prompts


def encode(prompts: list[Prompt], tokenizer) -> list[Prompt]:
    """Fills token ids of text prompts with the tokenizer (special tokens as its post-processor adds them)."""
    for prompt in prompts:
        if prompt.ids:
            continue
        if tokenizer is None:
            raise UserError(
                "text prompts need a tokenizer, and the model has none (no tokenizer/tokenizer.json in the "
                "checkpoint); give \"prompt_ids\" or set --config.init.tokenizer=DIR"
            )
        prompt.ids = tokenizer.encode(prompt.text).ids
    return prompts


def encode_chat(prompts: list[Prompt], source: Source, chat_template: str = "") -> int | None:
    """Renders each text prompt as one user turn plus the generation prompt with the tokenizer's chat
    template, or `chat_template` (the recipe's data.chat_template) when set: the ids a chat-SFT run
    trained the reply to follow (data/chat.py). Returns the template's end-of-turn token (a stop
    token). Prompts given as ids are used as they are."""
    if not source.tokenizer_dir:
        raise UserError("--chat needs the model's tokenizer (a checkpoint's tokenizer/ or --config.init.tokenizer=DIR)")
    renderer = ChatEncoder(source.tokenizer_dir, eos_id=source.model.config.eos_token_id, chat_template=chat_template)
    for prompt in prompts:
        if not prompt.ids:
            prompt.ids = renderer.prompt_ids([{"role": "user", "content": prompt.text}])
    return renderer.end_of_turn_id()


def check_ids(prompts: list[Prompt], vocab_size: int) -> None:
    """Every prompt's ids inside the model's vocabulary, naming the prompt's file and line."""
    for i, prompt in enumerate(prompts):
        check_token_ids(prompt.ids, vocab_size, prompt.where or f"prompt {i}")


def decode(tokenizer, ids: list[int]) -> str | None:
    return None if tokenizer is None else tokenizer.decode(ids, skip_special_tokens=True)
