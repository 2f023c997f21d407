"""`generate(model, prompts, ...)`: the public sampler API for the dLM and the AR baseline.

It validates arguments (one clear line per mistake), lays the ragged prompts out for a static-shape
cache (layout.py), runs one compiled program (diffusion.py or ar.py; jax caches it per shape and plan)
and returns the generated tokens with the statistics every benchmark needs.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable, Sequence

import jax
import numpy as np
from flax import nnx

from efficient_dlm.diffusion.spec import resolve_decoding
from efficient_dlm.errors import UserError
from efficient_dlm.models.quantize import quantize_model
from efficient_dlm.sample import layout as layout_lib
from efficient_dlm.sample.ar import ar_program
from efficient_dlm.sample.choice import Sampling
from efficient_dlm.sample.diffusion import diffusion_program
from efficient_dlm.sample.program import Plan, stop_id_array, streaming
from efficient_dlm.sample.speculative import check_verifier, prepare_speculative
from efficient_dlm.sample.strategies import STRATEGIES

# self_speculative: strategy="speculative" with verifier="self" (the dLM's own causal mode verifies). A complete
# decoding that needs no other model, so a DiffusionSpec can name it as the model's default.
SELF_SPECULATIVE = "self_speculative"
ALL_STRATEGIES = ("ar", *STRATEGIES, "speculative", SELF_SPECULATIVE)

_diffusion_jit = jax.jit(diffusion_program, static_argnums=(0, 1))
_ar_jit = jax.jit(ar_program, static_argnums=(0, 1))


@dataclasses.dataclass
class GenerateResult:
    """Generated tokens (stop token included, prompt excluded) and decoding statistics."""

    tokens: np.ndarray  # [batch, max_new_tokens], pad_id after each row's end
    lengths: np.ndarray  # [batch] generated tokens per row
    forward_passes: int  # batched forward passes the program ran
    row_forwards: np.ndarray  # [batch] forward passes in which the row still had tokens to produce
    commit_step: np.ndarray  # [batch, max_new_tokens] forward pass (0-based) that committed each token; -1 none
    prompt_lengths: np.ndarray  # [batch]
    blocks: int  # blocks decoded (AR: tokens)
    seconds: float  # wall time of the call, host preparation included
    program_seconds: float  # wall time of the compiled program alone (compilation included on a first call)
    program_cpu_seconds: float  # CPU time of this process during the program (all threads; robust to load)
    shapes: dict  # static shapes of this program (prompt bucket, cache size, ...)
    logits: np.ndarray | None = None  # [batch, max_new_tokens, V] raw logits at commit (return_logits)
    memory: dict | None = None  # XLA memory analysis of the program in bytes (measure_memory)
    # strategy="speculative" only (forward_passes and row_forwards count drafter and verifier forwards):
    verifier_forwards: int | None = None  # batched verifier forwards
    draft_forwards: int | None = None  # batched drafter forwards
    row_verifier_forwards: np.ndarray | None = None  # [batch] verifier forwards in which the row was generating
    proposed: np.ndarray | None = None  # [batch] draft tokens offered to the verifier
    accepted: np.ndarray | None = None  # [batch] draft tokens the verifier accepted

    @property
    def sequences(self) -> list[list[int]]:
        return [row[:n].tolist() for row, n in zip(self.tokens, self.lengths)]

    @property
    def generated_tokens(self) -> int:
        return int(self.lengths.sum())

    @property
    def tokens_per_forward(self) -> float:
        """Generated tokens per forward pass, per sequence (token-weighted over rows)."""
        return float(self.lengths.sum() / max(int(self.row_forwards.sum()), 1))

    @property
    def tokens_per_verifier_forward(self) -> float | None:
        """Speculative: generated tokens per verifier forward, per sequence (token-weighted over rows)."""
        if self.row_verifier_forwards is None:
            return None
        return float(self.lengths.sum() / max(int(self.row_verifier_forwards.sum()), 1))

    @property
    def acceptance_rate(self) -> float | None:
        """Speculative: the fraction of draft tokens (within max_new_tokens) the verifier accepted."""
        if self.proposed is None:
            return None
        return float(self.accepted.sum() / max(int(self.proposed.sum()), 1))


def check_settings(strategy, max_new_tokens, block_size, threshold, tokens_per_step, temperature, top_p, top_k) -> None:
    """Rejects bad decoding settings with one line naming the argument (also used for the config section)."""
    if strategy not in ALL_STRATEGIES:
        raise UserError(f"strategy must be one of {', '.join(ALL_STRATEGIES)}, got {strategy!r}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if strategy != "ar" and (not isinstance(block_size, (int, np.integer)) or block_size <= 0):
        raise UserError(f"block_size must be a positive integer, got {block_size!r}")
    if not 0.0 <= threshold <= 1.0:  # false for NaN too
        raise UserError(f"threshold must be in [0, 1], got {threshold}")
    if not _is_int(tokens_per_step) or tokens_per_step < 1:
        raise UserError(f"tokens_per_step must be an integer >= 1, got {tokens_per_step!r}")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise UserError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise UserError(f"top_p must be in (0, 1], got {top_p}")
    if not _is_int(top_k) or top_k < 0:
        raise UserError(f"top_k must be an integer >= 0 (0 = off), got {top_k!r}")


def self_verified(strategy: str, verifier):
    """(strategy, verifier) with "self_speculative" spelled out as "speculative" verified by "self"."""
    if strategy != SELF_SPECULATIVE:
        return strategy, verifier
    if verifier not in (None, "self"):
        raise UserError("strategy='self_speculative' verifies with the dLM itself; give strategy='speculative' "
                        "with verifier= to verify with another model")
    return "speculative", "self"


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def check_model(model, strategy: str, top_k: int = 0) -> None:
    """Rejects a strategy the model cannot run (no [MASK] token) and a top_k beyond its vocabulary."""
    cfg = model.config
    if strategy != "ar" and cfg.mask_token_id is None:
        raise UserError(
            "the model config has no mask_token_id, so it is not a block-diffusion model; set "
            "model.mask_token_id (or use strategy='ar')"
        )
    if top_k > cfg.vocab_size:
        raise UserError(f"top_k must be at most the vocabulary size {cfg.vocab_size}, got {top_k}")


def _stop_ids(model, stop_tokens: Sequence[int] | None) -> tuple[int, ...]:
    if stop_tokens is None:
        eos = model.config.eos_token_id
        return () if eos is None else (int(eos),)
    ids = tuple(int(t) for t in stop_tokens)
    for t in ids:
        if not 0 <= t < model.config.vocab_size:
            raise UserError(f"stop token {t} is outside the vocabulary (size {model.config.vocab_size})")
    return ids


def _stream_adapter(on_block: Callable) -> Callable:
    """Adapts the program's (block, tokens, generated mask) to on_block(block, [tokens of each row])."""

    def handler(block: int, tokens: np.ndarray, generated: np.ndarray) -> None:
        on_block(block, [row[mask].tolist() for row, mask in zip(tokens, generated)])

    return handler


@dataclasses.dataclass
class Prepared:
    """One sampler call ready to run: `program(*args)` with args (graphdef, plan, state, inputs, knobs)."""

    program: Callable  # jax.jit of diffusion_program / ar_program, graphdef and plan static
    args: tuple
    prompt_lengths: np.ndarray  # [batch]
    shapes: dict  # static shapes of the program (batch, prompt bucket, cache size, ...)


def prepare(
    model,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 64,
    block_size: int | None = None,
    strategy: str | None = None,
    threshold: float | None = None,
    tokens_per_step: int | None = None,
    factor: float | None = None,
    entropy_bound: float | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    stop_tokens: Sequence[int] | None = None,
    prompt_bucket: int | None = None,
    valid_vocab_size: int | None = None,
    token_shift: bool | None = None,
    return_logits: bool = False,
    stream: bool = False,
    verifier=None,
    draft_steps: int = 1,
    fuse_draft: bool = True,
    quantize: str | None = None,
    quantize_activations: bool = False,
    quantize_lm_head: bool = True,
    quantize_embed: bool = True,
    quantize_kv: str | None = None,
) -> Prepared:
    """Validates a `generate` call and builds its compiled program's arguments without running it
    (the decoding settings are documented on `generate`; `stream` compiles the block-streaming hook in). `model` may be
    abstract (`abstract_model`): `edlm aot` lowers the same program for a TPU topology from it."""
    given = dict(block_size=block_size, strategy=strategy, threshold=threshold, tokens_per_step=tokens_per_step,
                 factor=factor, entropy_bound=entropy_bound, valid_vocab_size=valid_vocab_size, token_shift=token_shift)
    spec = getattr(model, "spec", None)  # recorded (load, from_hf of an export); None: defaults, nothing to contradict
    if strategy == "ar":  # causal decoding: only the vocabulary padding of the spec applies
        spec = None if spec is None else spec.replace(token_shift=bool(token_shift))
    d = resolve_decoding(spec, **given)
    strategy, threshold, tokens_per_step, factor, entropy_bound = (
        d["strategy"], d["threshold"], d["tokens_per_step"], d["factor"], d["entropy_bound"])
    block_size, valid_vocab_size, token_shift = d["block_size"], d["valid_vocab_size"], d["token_shift"]
    strategy, verifier = self_verified(strategy, verifier)
    check_settings(strategy, max_new_tokens, block_size, threshold, tokens_per_step, temperature, top_p, top_k)
    for name, value in (("factor", factor), ("entropy_bound", entropy_bound)):
        if not (math.isfinite(value) and value > 0):
            raise UserError(f"{name} must be a finite number > 0, got {value}")
    check_model(model, strategy, top_k)
    quantization = dict(quantize=quantize, quantize_activations=quantize_activations, quantize_lm_head=quantize_lm_head,
                        quantize_embed=quantize_embed, quantize_kv=quantize_kv)
    model = quantize_model(model, **quantization)
    if verifier is not None and verifier != "self":
        verifier = quantize_model(verifier, **quantization)
    if strategy == "speculative":
        check_verifier(model, verifier, draft_steps)
        if return_logits or stream:
            raise UserError("strategy='speculative' supports neither return_logits nor streaming (on_block)")
    elif verifier is not None:
        raise UserError(f"verifier= is used by strategy='speculative' only, got strategy={strategy!r}")
    cfg = model.config
    rows = layout_lib.check_prompts(prompts, cfg.vocab_size)
    pad_id = next((t for t in (cfg.pad_token_id, cfg.eos_token_id) if t is not None), 0)
    sampling = Sampling(
        greedy=temperature == 0, top_k=int(top_k) if temperature else 0, top_p=bool(temperature and top_p < 1),
        entropy=strategy == "entropy",
    )
    plan = Plan(
        strategy=strategy, max_new_tokens=int(max_new_tokens), sampling=sampling,
        pad_id=int(pad_id), banned_ids=() if cfg.mask_token_id is None else (cfg.mask_token_id,),
        valid_vocab_size=valid_vocab_size, vocab_size=cfg.vocab_size, record_logits=return_logits,
        stream=stream,
    )
    if strategy == "speculative":
        program, head, prompt_lengths, shapes = prepare_speculative(
            model, verifier, rows, plan, block_size=int(block_size), draft_steps=draft_steps,
            token_shift=bool(token_shift), prompt_bucket=prompt_bucket, valid_vocab_size=valid_vocab_size,
            fuse_draft=bool(fuse_draft),
        )
    elif strategy == "ar":
        lay = layout_lib.ar_layout(
            rows, max_new_tokens=max_new_tokens, pad_id=pad_id, max_positions=layout_lib.position_limit(cfg),
            capacity=prompt_bucket,
        )
        program = _ar_jit
        shapes = {"prompt_bucket": lay.prompt_len, "cache_size": lay.prompt_len + max_new_tokens - 1}
    else:
        lay = layout_lib.block_layout(
            rows, block_size=int(block_size), max_new_tokens=max_new_tokens, mask_id=cfg.mask_token_id, pad_id=pad_id,
            max_positions=layout_lib.position_limit(cfg), capacity=prompt_bucket,
        )
        plan = dataclasses.replace(
            plan, block_size=int(block_size), num_blocks=lay.num_blocks, tokens_per_step=int(tokens_per_step),
            mask_id=cfg.mask_token_id, token_shift=bool(token_shift),
        )
        program = _diffusion_jit
        shapes = {"prompt_bucket": lay.prefix_len, "cache_size": lay.cache_size, "block_size": int(block_size)}
    # Host numpy values: jit transfers them in its C++ dispatch path, where jnp.asarray per value costs a
    # Python-level dispatch each (~1.7 ms per generate call in all, a fifth of a batch-1 demo generation).
    knobs = {
        "threshold": np.float32(threshold), "factor": np.float32(factor), "entropy_bound": np.float32(entropy_bound),
        "temperature": np.float32(max(temperature, 1e-6)), "top_p": np.float32(top_p), "seed": np.uint32(seed),
        "stop_ids": stop_id_array(_stop_ids(model, stop_tokens)),
    }
    if strategy == "speculative":
        return Prepared(program, (*head, knobs), prompt_lengths, {"batch": len(rows), **shapes})
    graphdef, state = nnx.split(model)
    inputs = lay.arrays()
    return Prepared(program, (graphdef, plan, state, inputs, knobs), lay.prompt_lengths, {"batch": len(rows), **shapes})


def generate(
    model,
    prompts: Sequence[Sequence[int]],
    *,
    on_block: Callable[[int, list[list[int]]], None] | None = None,
    measure_memory: bool = False,
    **settings,
) -> GenerateResult:
    """Generates up to max_new_tokens after each prompt (lists of token ids, ragged lengths allowed).

    settings: the decoding arguments of `prepare`, which validates them. Every dLM setting left unset
    comes from the model's DiffusionSpec (`model.spec`, attached by `load`; diffusion/spec.py), so
    `generate(load(run_dir), prompts, max_new_tokens=n)` decodes the model as it was trained and as
    `edlm sample --ckpt run_dir` does; a model without a spec gets the spec defaults for its [MASK] id.
    max_new_tokens (default 64, as the CLI's sample.max_new_tokens); strategy: "threshold" | "topk" | "factor" | "entropy" (block diffusion,
    docs/METHOD.md section 6, needs model.config.mask_token_id) or "ar" (causal decoding, the baseline);
    block_size; threshold / tokens_per_step / factor / entropy_bound parametrise the strategies;
    temperature 0 is greedy, otherwise tokens are sampled (top_p, top_k filters) with `seed`;
    stop_tokens default to model.config.eos_token_id, and a row ends after its first stop token;
    prompt_bucket fixes the cache's prompt capacity (default: the next power of two, so few shapes);
    valid_vocab_size: ids at or above it are vocabulary padding and never generated (the spec's by
    default; raising it above the spec's is refused); token_shift: the dLM was trained to predict token
    i from the hidden state at i - 1 (dLM only; contradicting the spec is refused); return_logits
    records the raw logits with which each token was committed (tests, analysis).
    strategy "speculative" (lossless): the dLM drafts each block (draft_steps denoising steps, the
    threshold knob choosing the commits of all but the last), `verifier` (an AR model, or "self": the
    dLM's own weights in causal mode) checks the draft in one forward and keeps exactly what its own
    decoding (strategy="ar") would produce: the same tokens when greedy, the same distribution when sampled.
    fuse_draft (default True; applies to verifier="self" with draft_steps=1): the verifier's forward also
    drafts the next block, so a fully accepted block costs one forward (sample/speculative.py).
    strategy "self_speculative" is "speculative" with verifier="self": a decoding that needs no other
    model, so a recipe can make it the model's default (sample.strategy, recorded in its DiffusionSpec).
    quantize ("int8" | "fp8" | "none"; None: the model as it is): per-channel quantized weights (qwix,
    models/quantize.py), with quantize_activations (matmul inputs per token to the same type),
    quantize_lm_head and quantize_embed choosing those two tables; quantize_kv "int8": keys and values
    (and so the KV cache) in int8 with a scale per token and head. The model is quantized on every call:
    for repeated calls quantize once (`efficient_dlm.quantize_model`, or `edlm quantize`) and pass that.
    on_block(block_index, tokens_per_row) is called on the host as each block becomes final.
    measure_memory adds XLA's memory analysis of the compiled program (bytes) to the result.
    """
    started = time.perf_counter()
    prep = prepare(model, prompts, stream=on_block is not None, **settings)
    program, args = prep.program, prep.args
    program_started, cpu_started = time.perf_counter(), time.process_time()
    with streaming(_stream_adapter(on_block) if on_block else None):
        out = jax.device_get(program(*args))
    finished, cpu_finished = time.perf_counter(), time.process_time()
    memory = _memory_analysis(program, args) if measure_memory else None  # after the run: a jit cache hit
    return GenerateResult(
        tokens=out["tokens"], lengths=out["lengths"], forward_passes=int(out["forwards"]),
        row_forwards=out["row_forwards"], commit_step=out["commit_step"], prompt_lengths=prep.prompt_lengths,
        blocks=int(out["blocks"]), seconds=finished - started, program_seconds=finished - program_started,
        program_cpu_seconds=cpu_finished - cpu_started,
        shapes=prep.shapes, logits=out.get("logits"), memory=memory,
        verifier_forwards=_optional_int(out.get("verifier_forwards")), draft_forwards=_optional_int(out.get("draft_forwards")),
        row_verifier_forwards=out.get("row_verifier_forwards"), proposed=out.get("proposed"), accepted=out.get("accepted"),
    )


def _optional_int(value) -> int | None:
    return None if value is None else int(value)


def _memory_analysis(program, args) -> dict[str, int]:
    """Bytes XLA plans for the compiled program: arguments (weights, prompts), outputs and temporaries
    (KV cache, activations). Their sum bounds the program's peak device memory on every backend."""
    stats = program.lower(*args).compile().memory_analysis()
    names = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "alias_size_in_bytes")
    out = {name.removesuffix("_size_in_bytes"): int(getattr(stats, name, 0) or 0) for name in names}
    out["total"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
    return out
