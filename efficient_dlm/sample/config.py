"""The `sample` and `bench` config sections: validation (composed by efficient_dlm.config.validate) and the
mapping from the `sample` section to `generate` keyword arguments.

The dLM decoding keys of `sample` (strategy, threshold, tokens_per_step, factor, entropy_bound,
block_size) are unset by default: then the model's DiffusionSpec decides, exactly as for
`generate(load(d), prompts, max_new_tokens=n)`. A key set on the command line overrides the spec.
"""
from __future__ import annotations

import math

from ml_collections import ConfigDict

from efficient_dlm.diffusion.spec import DiffusionSpec
from efficient_dlm.errors import UserError
from efficient_dlm.sample.api import ALL_STRATEGIES, check_settings

_SPEC_DEFAULTS = DiffusionSpec(mask_token_id=0)  # what an unset key means when the model records no spec


def generate_kwargs(sample: ConfigDict) -> dict:
    """`generate` keyword arguments from the sample section; unset dLM keys are left to the model's spec."""
    return dict(
        max_new_tokens=sample.max_new_tokens, block_size=sample.block_size or None, strategy=sample.strategy or None,
        threshold=sample.threshold, tokens_per_step=sample.tokens_per_step, factor=sample.factor,
        entropy_bound=sample.entropy_bound, temperature=sample.temperature, top_p=sample.top_p, top_k=sample.top_k,
        seed=sample.seed, stop_tokens=tuple(sample.stop_tokens) or None, prompt_bucket=sample.prompt_bucket or None,
        draft_steps=sample.draft_steps,
    )


def validate_sample(config: ConfigDict) -> None:
    if "sample" not in config:
        return
    s = config.sample
    if s.block_size < 0:
        raise UserError(f"sample.block_size must be >= 0 (0 = the checkpoint's training block size), got {s.block_size}")
    d = {k: s[k] if s[k] not in (None, "") else getattr(_SPEC_DEFAULTS, k) for k in ("strategy", "threshold", "tokens_per_step")}
    try:
        check_settings(d["strategy"], s.max_new_tokens, s.block_size or _SPEC_DEFAULTS.block_size, d["threshold"],
                       d["tokens_per_step"], s.temperature, s.top_p, s.top_k)
    except ValueError as err:
        raise UserError(f"sample.{err}") from None
    for key in ("factor", "entropy_bound"):
        if s[key] is not None and not (math.isfinite(s[key]) and s[key] > 0):
            raise UserError(f"sample.{key} must be a finite number > 0, got {s[key]}")
    if s.draft_steps < 1:
        raise UserError(f"sample.draft_steps must be >= 1, got {s.draft_steps}")
    if s.prompt_bucket < 0:
        raise UserError(f"sample.prompt_bucket must be >= 0 (0 = automatic), got {s.prompt_bucket}")


def validate_bench(config: ConfigDict) -> None:
    if "bench" not in config:
        return
    b = config.bench
    known = (*ALL_STRATEGIES, "self_speculative")
    unknown = [s for s in b.strategies if s not in known]
    if unknown or not b.strategies:
        raise UserError(f"bench.strategies must name some of {', '.join(known)}, got {tuple(b.strategies)}")
    if any(not 0.0 <= t <= 1.0 for t in b.thresholds):
        raise UserError(f"bench.thresholds must lie in [0, 1], got {tuple(b.thresholds)}")
    if not b.batch_sizes or any(n < 1 for n in b.batch_sizes):
        raise UserError(f"bench.batch_sizes must be positive integers, got {tuple(b.batch_sizes)}")
    for key in ("repeats", "num_prompts", "prompt_len", "overhead_forwards"):
        if b[key] < 1:
            raise UserError(f"bench.{key} must be >= 1, got {b[key]}")
    if b.warmup < 0:
        raise UserError(f"bench.warmup must be >= 0, got {b.warmup}")
