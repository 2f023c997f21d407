"""`DiffusionSpec`: what makes a trained dLM what it is, saved with every checkpoint that holds one.

A block-diffusion model's weights alone do not say how to decode it: which id is [MASK], which ids
are vocabulary padding (an appended [MASK] row pads the vocabulary), the block size and attention
pattern it was trained with, whether token i was predicted from the hidden state at i - 1 (token
shift), how its MoE layers route at inference, and its default decoding. Decoding with any of these
wrong gives fluent-looking garbage and no error, so they travel with the checkpoint
(`diffusion_spec.json`, written by the trainer, `save` and `import-hf --mask_token_id`) and every
reader (`load`, `generate`, `edlm sample`/`bench`, OPD rollouts, `to_hf`) takes them from here.

`resolve_decoding` is the one place where explicit decoding arguments meet the spec: an argument
given wins, else the spec's value; a contradiction that cannot work is a UserError, one that may
work but was not trained for is a stated warning.
"""
from __future__ import annotations

import dataclasses
import json
import warnings
from typing import Any, Mapping

from efficient_dlm.errors import UserError

SPEC_NAME = "diffusion_spec.json"
# The training attention pattern (METHOD.md section 1). Decoding is block-causal with the exact prefix
# cache for all three; "block_diffusion" (clean context) and "block" were trained at block_size.
ATTENTION_PATTERNS = ("block_diffusion", "block", "bidirectional")
# self_speculative: the dLM drafts, its own causal mode verifies (lossless w.r.t. that mode; docs/METHOD.md
# section 6) -- the one speculative decoding a model can default to, as it needs no other model.
DECODING_STRATEGIES = ("threshold", "topk", "factor", "entropy", "self_speculative")
DECODING_FIELDS = ("strategy", "threshold", "tokens_per_step", "factor", "entropy_bound")


@dataclasses.dataclass(frozen=True)
class DiffusionSpec:
    """A dLM's identity at inference. Defaults are the project's decoding defaults (METHOD.md section 6)."""

    mask_token_id: int
    valid_vocab_size: int | None = None  # ids at or above it are vocabulary padding: never generated
    block_size: int = 32  # the final training block size (the last of a block-size schedule)
    attention: str = "block_diffusion"  # the training attention pattern (ATTENTION_PATTERNS)
    token_shift: bool = False  # token i was predicted from the hidden state at i - 1 (Dream, Fast-dLLM v2)
    moe_capacity_factor: float | None = None  # MoE routing at inference: None = dropless (the only one: capacity is training-only)
    # Default decoding (the knobs of `generate`).
    strategy: str = "threshold"
    threshold: float = 0.9
    tokens_per_step: int = 1
    factor: float = 1.0
    entropy_bound: float = 0.3

    def __post_init__(self):
        self.validate()

    def validate(self, where: str = "diffusion spec") -> None:
        """One UserError line, prefixed with `where`, naming the first bad field."""
        problem = self._problem()
        if problem:
            raise UserError(f"{where}: {problem}")

    def _problem(self) -> str | None:
        if isinstance(self.mask_token_id, bool) or not isinstance(self.mask_token_id, int) or self.mask_token_id < 0:
            return f"mask_token_id must be a token id >= 0, got {self.mask_token_id!r}"
        if self.valid_vocab_size is not None and (isinstance(self.valid_vocab_size, bool) or self.valid_vocab_size <= 0):
            return f"valid_vocab_size must be a positive integer or null, got {self.valid_vocab_size!r}"
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size <= 0:
            return f"block_size must be a positive integer, got {self.block_size!r}"
        if self.attention not in ATTENTION_PATTERNS:
            return f"attention must be one of {', '.join(ATTENTION_PATTERNS)}, got {self.attention!r}"
        if self.moe_capacity_factor is not None:  # docs/METHOD.md section 7: capacity routes training's x_t only
            return f"moe_capacity_factor must be null: MoE layers decode dropless, got {self.moe_capacity_factor}"
        if self.strategy not in DECODING_STRATEGIES:
            return f"strategy must be one of {', '.join(DECODING_STRATEGIES)}, got {self.strategy!r}"
        if not 0.0 <= self.threshold <= 1.0:
            return f"threshold must be in [0, 1], got {self.threshold}"
        if self.tokens_per_step < 1:
            return f"tokens_per_step must be >= 1, got {self.tokens_per_step}"
        if self.factor <= 0 or self.entropy_bound < 0:
            return f"factor must be > 0 and entropy_bound >= 0, got {self.factor} and {self.entropy_bound}"
        return None

    def replace(self, **changes: Any) -> "DiffusionSpec":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], where: str = "diffusion spec") -> "DiffusionSpec":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise UserError(f"{where}: unknown field(s) {', '.join(unknown)}")
        if "mask_token_id" not in values:
            raise UserError(f"{where}: no mask_token_id")
        try:
            return cls(**dict(values))
        except UserError as err:
            raise UserError(f"{where}: {str(err).removeprefix('diffusion spec: ')}") from None

    def decoding(self) -> dict[str, Any]:
        """The default decoding knobs, as `generate` keyword arguments."""
        return {name: getattr(self, name) for name in DECODING_FIELDS}


def default_spec(cfg) -> DiffusionSpec | None:
    """The spec of a model that records none: its config's [MASK] id (and MoE routing) and the
    project's defaults; None for a plain AR model (no [MASK] token)."""
    if cfg.mask_token_id is None:
        return None
    return DiffusionSpec(mask_token_id=cfg.mask_token_id)


def spec_of(model) -> DiffusionSpec | None:
    """The spec attached to a model (`load`, `from_hf` of a dLM export), else its config's defaults."""
    spec = getattr(model, "spec", None)
    return spec if spec is not None else default_spec(model.config)


def with_spec(model, spec: DiffusionSpec | None):
    """Attaches `spec` as `model.spec` (static: part of the NNX graph, not of the state); returns model."""
    if spec is not None:
        check_model_matches(spec, model.config)
    model.spec = spec
    return model


def final_block_size(schedule: str) -> int | None:
    """The last block size of a "step:size,..." schedule (LLaDA2.0 warm-up/stable/decay), if any."""
    pairs = [item.split(":") for item in str(schedule or "").split(",") if item.strip()]
    return int(max(pairs, key=lambda p: int(p[0]))[1]) if pairs else None


def spec_from_recipe(recipe: Mapping[str, Any], cfg, valid_vocab_size: int | None = None) -> DiffusionSpec | None:
    """The spec a training recipe (a config as a plain dict: diffusion, opd, sample sections) gives the
    model `cfg` it trains; None when the recipe trains a plain AR model or the model has no [MASK]."""
    diffusion = recipe.get("diffusion") or {}
    objective = diffusion.get("objective", "block_diffusion")
    if objective == "ar" or cfg.mask_token_id is None:
        return None
    if objective == "opd":  # OPD alone: the student learns at the rollouts' block size, clean context
        attention, block_size = "block_diffusion", (recipe.get("opd") or {}).get("block_size")
    else:
        attention = objective
        block_size = final_block_size(diffusion.get("block_size_schedule")) or diffusion.get("block_size")
    sample = recipe.get("sample") or {}
    decoding = {name: sample.get(name) for name in DECODING_FIELDS if sample.get(name) not in (None, "")}
    if decoding.get("strategy") in ("ar", "speculative"):  # the AR baseline, or a verifier's decoding: no dLM default
        decoding.pop("strategy")
    valid = valid_vocab_size if valid_vocab_size is not None else diffusion.get("valid_vocab_size")
    return DiffusionSpec(
        mask_token_id=cfg.mask_token_id, valid_vocab_size=valid, block_size=int(block_size or 32),
        attention=attention, token_shift=bool(diffusion.get("token_shift", False)),
        **decoding,
    )


def legacy_spec(cfg, extra: Mapping[str, Any]) -> DiffusionSpec | None:
    """The spec of a checkpoint written before specs existed: from the training recipe it recorded
    (model_config.json "extra"), else the defaults for its [MASK] id."""
    recipe = extra.get("train_config")
    if isinstance(recipe, Mapping):
        return spec_from_recipe(recipe, cfg, extra.get("valid_vocab_size"))
    spec = default_spec(cfg)
    if spec is not None and extra.get("valid_vocab_size") is not None:
        spec = spec.replace(valid_vocab_size=extra["valid_vocab_size"])
    return spec


def write_spec(path: str, spec: DiffusionSpec) -> None:
    with open(path, "w") as f:
        json.dump(spec.to_dict(), f, indent=2, sort_keys=True)
        f.write("\n")


def read_spec(path: str) -> DiffusionSpec:
    try:
        with open(path) as f:
            values = json.load(f)
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(values, dict):
        raise UserError(f"{path}: expected a JSON object")
    return DiffusionSpec.from_dict(values, where=path)


def check_model_matches(spec: DiffusionSpec, cfg, where: str = "diffusion spec") -> None:
    """The spec belongs to this architecture: its [MASK] id and padding lie inside the vocabulary."""
    if cfg.mask_token_id is not None and cfg.mask_token_id != spec.mask_token_id:
        raise UserError(f"{where}: mask_token_id {spec.mask_token_id} differs from the model's {cfg.mask_token_id}")
    if spec.mask_token_id >= cfg.vocab_size:
        raise UserError(f"{where}: mask_token_id {spec.mask_token_id} is outside the vocabulary (size {cfg.vocab_size})")
    if spec.valid_vocab_size is not None and spec.valid_vocab_size > cfg.vocab_size:
        raise UserError(f"{where}: valid_vocab_size {spec.valid_vocab_size} exceeds the vocabulary size {cfg.vocab_size}")


def resolve_decoding(spec: DiffusionSpec | None, **given: Any) -> dict[str, Any]:
    """Decoding settings for one `generate` call: each argument given (not None) wins, else the spec's.

    given: block_size, token_shift, valid_vocab_size and the DECODING_FIELDS. Without a spec (a model
    that records none: nothing to contradict) the project's defaults fill in. Refused (UserError): token shift other than the
    model was trained with, and vocabulary padding ids re-allowed. Warned: a block size that does not
    divide the trained one, for models trained block-wise (their block boundaries then fall inside
    decoded blocks, which training never showed).
    """
    base = spec or DiffusionSpec(mask_token_id=0)
    out = {name: given.get(name) if given.get(name) is not None else getattr(base, name)
           for name in ("block_size", "token_shift", *DECODING_FIELDS)}
    out["valid_vocab_size"] = given.get("valid_vocab_size") if given.get("valid_vocab_size") is not None else (
        spec.valid_vocab_size if spec else None)
    if spec is None:
        return out
    if bool(out["token_shift"]) != spec.token_shift:
        raise UserError(
            f"token_shift={out['token_shift']} contradicts the model, trained with token_shift={spec.token_shift} "
            "(recorded in its diffusion spec); leave token_shift unset"
        )
    if spec.valid_vocab_size is not None and (out["valid_vocab_size"] or 0) > spec.valid_vocab_size:
        raise UserError(
            f"valid_vocab_size={out['valid_vocab_size']} would generate vocabulary padding: the model's ids >= "
            f"{spec.valid_vocab_size} were never trained"
        )
    trained = spec.block_size
    if spec.attention != "bidirectional" and isinstance(out["block_size"], int) and out["block_size"] > 0 \
            and trained % out["block_size"]:
        warnings.warn(
            f"block_size={out['block_size']} does not divide the trained block size {trained}: decoded blocks "
            f"straddle the block boundaries the model was trained with", UserWarning, stacklevel=3,
        )
    return out
