"""The `sample` and `bench` config sections, and the mapping from `sample` to `generate` keyword arguments.

The dLM decoding keys of `sample` (strategy, threshold, tokens_per_step, factor, entropy_bound,
block_size) are unset by default: then the model's DiffusionSpec decides, exactly as for
`generate(load(d), prompts, max_new_tokens=n)`. A key set on the command line overrides the spec.
"""
from __future__ import annotations

import dataclasses
import math

from efficient_dlm.diffusion.spec import DiffusionSpec
from efficient_dlm.errors import UserError
from efficient_dlm.models.config import WEIGHT_QUANTIZATIONS
from efficient_dlm.models.quantize import Quantization, check_quantization
from efficient_dlm.sample.api import ALL_STRATEGIES, check_settings
from efficient_dlm.section import Section

_SPEC_DEFAULTS = DiffusionSpec(mask_token_id=0)  # what an unset key means when the model records no spec
BENCH_STRATEGIES = ALL_STRATEGIES


@dataclasses.dataclass(frozen=True)
class SampleConfig(Section):
    """Decoding defaults for `edlm sample` / `generate` (and the sampler programs `edlm aot` compiles)."""

    SECTION = "sample"

    strategy: str = ""  # threshold | topk | factor | entropy (block diffusion) | ar (causal baseline) | speculative
    # (--verifier) | self_speculative (the dLM verifies itself: a model default the DiffusionSpec records)
    threshold: float | None = None  # threshold: commit every masked position with confidence >= this
    tokens_per_step: int | None = None  # topk: positions committed per step
    factor: float | None = None  # factor (Fast-dLLM): commit n while the n-th confidence >= 1 - f / (n + 1)
    entropy_bound: float | None = None  # entropy: commit while the summed entropy (nats) stays <= this
    block_size: int = 0  # 0 = the model's (its spec's training block size)
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int = 0
    stop_tokens: tuple[int, ...] = ()  # token ids that end a row; () = model.eos_token_id
    prompt_bucket: int = 0  # prompt capacity of the cache in tokens; 0 = next power of two
    draft_steps: int = 1  # speculative (--verifier): dLM denoising steps per draft, the last commits the rest
    fuse_draft: bool = True  # --verifier self with draft_steps 1: the next draft rides in the verifier's forward
    chat: bool = False  # edlm sample: text prompts as a user turn in the checkpoint's chat template (chat SFT)
    # Quantized inference (models/quantize.py, qwix): applied to every model the verb loads (the dLM, the AR
    # teacher, the verifier). "" = the model as stored (float, or a quantized checkpoint's own).
    quantize: str = ""  # none | int8 | fp8: per-channel weights
    quantize_activations: bool = False  # also the matmul inputs, per token, to the weights' type
    quantize_lm_head: bool = True  # the LM head (tied embeddings: the shared table with quantize_embed)
    quantize_embed: bool = True  # the input embedding table
    quantize_kv: str = ""  # none | int8: keys / values and the KV cache, a scale per token and head

    def validate(self) -> None:
        if self.block_size < 0:
            raise UserError(f"sample.block_size must be >= 0 (0 = the checkpoint's training block size), got {self.block_size}")
        unset = {k: getattr(self, k) in (None, "") for k in ("strategy", "threshold", "tokens_per_step")}
        d = {k: getattr(_SPEC_DEFAULTS if unset[k] else self, k) for k in unset}
        try:
            check_settings(d["strategy"], self.max_new_tokens, self.block_size or _SPEC_DEFAULTS.block_size,
                           d["threshold"], d["tokens_per_step"], self.temperature, self.top_p, self.top_k)
        except ValueError as err:
            raise UserError(f"sample.{err}") from None
        for key in ("factor", "entropy_bound"):
            value = getattr(self, key)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise UserError(f"sample.{key} must be a finite number > 0, got {value}")
        if self.draft_steps < 1:
            raise UserError(f"sample.draft_steps must be >= 1, got {self.draft_steps}")
        if self.prompt_bucket < 0:
            raise UserError(f"sample.prompt_bucket must be >= 0 (0 = automatic), got {self.prompt_bucket}")
        check_sample_quantization(self)

    def generate_kwargs(self) -> dict:
        """`generate` keyword arguments; unset dLM keys are left to the model's spec."""
        return dict(
            max_new_tokens=self.max_new_tokens, block_size=self.block_size or None, strategy=self.strategy or None,
            threshold=self.threshold, tokens_per_step=self.tokens_per_step, factor=self.factor,
            entropy_bound=self.entropy_bound, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
            seed=self.seed, stop_tokens=self.stop_tokens or None, prompt_bucket=self.prompt_bucket or None,
            draft_steps=self.draft_steps, fuse_draft=self.fuse_draft,
        )


def quantization_kwargs(sample) -> dict:
    """`quantize_model` / `generate` quantization keyword arguments from the sample section (a SampleConfig or
    the CLI's ConfigDict section; "" = as stored)."""
    return dict(quantize=sample.quantize or None, quantize_activations=sample.quantize_activations,
                quantize_lm_head=sample.quantize_lm_head, quantize_embed=sample.quantize_embed,
                quantize_kv=sample.quantize_kv or None)


def check_sample_quantization(sample) -> None:
    """The sample section's quantization keys, one line naming the bad `sample.<key>`."""
    q = quantization_kwargs(sample)
    check_quantization(Quantization(q["quantize"] or "none", q["quantize_activations"], q["quantize_lm_head"],
                                    q["quantize_embed"], q["quantize_kv"] or "none"), "sample")


def set_quantize_flag(config, value: str | None) -> None:
    """A verb's --quantize flag: sets sample.quantize of the CLI config (checked like the config key)."""
    if value is None:
        return
    if value not in WEIGHT_QUANTIZATIONS:
        raise UserError(f"--quantize must be one of {', '.join(WEIGHT_QUANTIZATIONS)}, got {value!r}")
    config.sample.quantize = value
    check_sample_quantization(config.sample)


@dataclasses.dataclass(frozen=True)
class BenchConfig(Section):
    """`edlm bench` settings: the AR baseline and the dLM strategies over one prompt set."""

    SECTION = "bench"

    # each non-threshold strategy runs once with the sample section's value; "speculative" verifies with
    # --verifier (default the --ar_ckpt teacher), "self_speculative" with the dLM's own causal mode
    strategies: tuple[str, ...] = ("ar", "threshold")
    thresholds: tuple[float, ...] = (0.7, 0.8, 0.9, 0.95)
    batch_sizes: tuple[int, ...] = (1, 8)
    repeats: int = 3  # timed repeats; the median is reported
    warmup: int = 1  # untimed runs first (compilation)
    num_prompts: int = 8  # random prompts when no --prompts_jsonl is given
    prompt_len: int = 32
    overhead_forwards: int = 64  # forward passes timed for the bare-forward reference

    def validate(self) -> None:
        unknown = [s for s in self.strategies if s not in BENCH_STRATEGIES]
        if unknown or not self.strategies:
            raise UserError(f"bench.strategies must name some of {', '.join(BENCH_STRATEGIES)}, got {self.strategies}")
        if any(not 0.0 <= t <= 1.0 for t in self.thresholds):
            raise UserError(f"bench.thresholds must lie in [0, 1], got {self.thresholds}")
        if not self.batch_sizes or any(n < 1 for n in self.batch_sizes):
            raise UserError(f"bench.batch_sizes must be positive integers, got {self.batch_sizes}")
        for key in ("repeats", "num_prompts", "prompt_len", "overhead_forwards"):
            if getattr(self, key) < 1:
                raise UserError(f"bench.{key} must be >= 1, got {getattr(self, key)}")
        if self.warmup < 0:
            raise UserError(f"bench.warmup must be >= 0, got {self.warmup}")
