"""What an evaluation reads from `ckpt=DIR`: the model, its tokenizer, and how it was trained.

DIR is an efficient_dlm checkpoint (a training run directory or `edlm.save` output, model_config.json)
or a Hugging Face directory (config.json + safetensors: an AR model such as the demo teacher, or a
`to_hf` dLM export). A model that comes back with a DiffusionSpec (`model.spec`) is a dLM: its block
size, attention pattern, token shift and vocabulary padding come from there; everything else is
scored as an AR model. For masking=train the corruption comes from the training config the
checkpoint records.
"""
from __future__ import annotations

import dataclasses
import os

from efficient_dlm import checkpoints
from efficient_dlm.errors import UserError
from efficient_dlm.port.hf_import import from_hf

HF_CONFIG = "config.json"


@dataclasses.dataclass(frozen=True)
class Diffusion:
    """The corruption a dLM was trained with (METHOD.md section 2) and what decoding must match."""

    block_size: int
    token_shift: bool = False
    masking: str = "position"
    half_life: float = 0.25
    rate_min: float = 1e-3
    rate_max: float = 1.0
    objective: str = "block_diffusion"


@dataclasses.dataclass
class Loaded:
    model: object
    tokenizer: object  # tokenizers.Tokenizer
    tokenizer_dir: str
    diffusion: Diffusion | None  # None: an AR model
    valid_vocab_size: int | None = None
    description: str = ""


def _tokenizer(directory: str | None, ckpt: str):
    from tokenizers import Tokenizer

    if not directory or not os.path.exists(os.path.join(directory, "tokenizer.json")):
        raise UserError(f"{ckpt}: no tokenizer.json (expected in the checkpoint's tokenizer/ or the HF directory); "
                        "pass tokenizer=DIR in model_args")
    return Tokenizer.from_file(os.path.join(directory, "tokenizer.json"))


def _diffusion(spec, extra: dict) -> Diffusion | None:
    """What the ELBO needs from the model's DiffusionSpec (None: an AR model) and, for masking=train, the
    corruption of the training recipe the checkpoint records (defaults when it records none)."""
    if spec is None:
        return None
    section = (extra.get("train_config") or {}).get("diffusion") or {}
    return Diffusion(
        block_size=spec.block_size, token_shift=spec.token_shift, objective=spec.attention,
        masking=section.get("masking", "position"), half_life=float(section.get("half_life", 0.25)),
        rate_min=float(section.get("rate_min", 1e-3)), rate_max=float(section.get("rate_max", 1.0)),
    )


def load(ckpt: str, *, tokenizer: str | None = None, dtype: str | None = None, kind: str = "auto") -> Loaded:
    """The model at `ckpt` with its tokenizer; kind "ar" scores a dLM checkpoint as an AR model."""
    if kind not in ("auto", "ar", "dlm"):
        raise UserError(f"kind must be auto, ar or dlm, got {kind!r}")
    if not ckpt or not os.path.isdir(ckpt):
        raise UserError(f"ckpt: checkpoint directory {ckpt!r} does not exist")
    if os.path.exists(os.path.join(ckpt, checkpoints.CONFIG_NAME)):
        _, extra = checkpoints.read_model_config(ckpt)
        model = checkpoints.load(ckpt, dtype=dtype)
        tok_dir = tokenizer or checkpoints.tokenizer_dir(ckpt)
    elif os.path.exists(os.path.join(ckpt, HF_CONFIG)):
        model, extra = from_hf(ckpt, dtype=dtype or "float32"), {}  # a to_hf dLM export carries its spec
        tok_dir = tokenizer or ckpt
    else:
        raise UserError(f"ckpt: {ckpt} holds neither {checkpoints.CONFIG_NAME} (efficient_dlm) nor {HF_CONFIG} (Hugging Face)")
    spec = getattr(model, "spec", None)  # the checkpoint's DiffusionSpec (None: an AR model)
    diffusion = _diffusion(spec, extra)
    valid = spec.valid_vocab_size if spec is not None else None
    if kind == "ar":
        diffusion = None
    elif kind == "dlm" and diffusion is None:
        raise UserError(f"ckpt: {ckpt} records no diffusion training (kind=dlm needs a checkpoint trained as a dLM)")
    if diffusion is not None and model.config.mask_token_id is None:
        raise UserError(f"ckpt: {ckpt} was trained as a dLM but its model config has no mask_token_id")
    return Loaded(model, _tokenizer(tok_dir, ckpt), tok_dir, diffusion, valid, os.path.abspath(ckpt))
