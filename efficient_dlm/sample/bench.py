"""The measurements behind `edlm bench`: one prompt set through the AR baseline and the dLM strategies.

Per setting (strategy, parameter, batch size): generated tokens/s (prompt tokens never counted; wall
time of whole `generate` calls, host preparation included), forward passes, tokens per forward,
latency per row (the wall time of the call that produced the row) p50/p95, memory, accuracy when the
prompts carry references, and the sampler overhead. Compilation and warm-up runs are excluded;
`repeats` timed passes over the prompt set, the median is reported.

Sampler overhead = the program's wall time divided by the time the same forward passes take as bare
jitted `model.decode` + LM head calls of the same shapes (measured in a lax.fori_loop, so neither has
per-call dispatch costs; the LM head on the positions the sampler reads: the block, or AR's last
token): everything the sampler adds (choice, ranking, commits, cache writes, loop control) shows up
as the excess over 1. Both times are the best of `repeats` back-to-back calls per batch (other
processes' load only ever adds time, so the minimum is the estimate of the program's own cost); the
same ratio over this process's CPU time (`sampler_overhead_cpu`) is reported too. Speculative settings
(the dLM drafts, a verifier keeps its own decoding) report tokens per verifier forward and the
acceptance rate instead of the overhead (their forwards mix two models and shapes).
"""
from __future__ import annotations

import dataclasses
import platform
import resource
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from efficient_dlm.models.cache import KVCache
from efficient_dlm.models.reductions import argmax
from efficient_dlm.sample.api import GenerateResult, generate
from efficient_dlm.sample.config import SampleConfig
from efficient_dlm.sample.inputs import Prompt, decode


@dataclasses.dataclass(frozen=True)
class Setting:
    name: str
    strategy: str
    kwargs: tuple  # sorted (key, value) pairs passed to generate on top of the base settings
    batch_size: int

    def file_name(self) -> str:
        return f"{self.name}_b{self.batch_size}.json"


def make_settings(strategies, thresholds, batch_sizes, sample: SampleConfig, spec) -> list[Setting]:
    """AR once, threshold once per value, every other strategy once with its parameter: the sample
    section's when set, else the dLM's DiffusionSpec's (speculative: verifier "teacher" is resolved by the
    caller; self_speculative verifies with the dLM itself)."""
    parameter = {strategy: (key, getattr(sample, key) if getattr(sample, key) is not None else getattr(spec, key))
                 for strategy, key in (("topk", "tokens_per_step"), ("factor", "factor"), ("entropy", "entropy_bound"))}
    variants = []
    for strategy in strategies:
        if strategy == "ar":
            variants.append(("ar", "ar", ()))
        elif strategy in ("speculative", "self_speculative"):
            verifier = "self" if strategy == "self_speculative" else "teacher"
            knobs = (("draft_steps", sample.draft_steps), ("verifier", verifier))
            variants.append((f"{strategy}_d{sample.draft_steps}", "speculative", knobs))
        elif strategy == "threshold":
            variants += [(f"threshold_{t:g}", "threshold", (("threshold", float(t)),)) for t in thresholds]
        else:
            key, value = parameter[strategy]
            variants.append((f"{strategy}_{value:g}", strategy, ((key, value),)))
    return [Setting(name, strategy, kwargs, size) for size in batch_sizes for name, strategy, kwargs in variants]


def is_correct(completion: str, reference: str) -> bool:
    """The completion starts with the reference (whitespace-normalised), ending at a word boundary."""
    text, answer = " ".join(completion.split()), " ".join(reference.split())
    return text.startswith(answer) and (len(text) == len(answer) or not text[len(answer)].isalnum())


# ---- bare forward reference ----------------------------------------------------------------------

_bare_loops: dict[tuple, tuple] = {}


def _bare_loop(model, batch: int, chunk: int, head: int, cache_size: int, attention: str, block_size, iterations: int):
    """A compiled lax.fori_loop of `iterations` bare model.decode calls on [batch, chunk] against a full
    cache of cache_size slots, each with the LM head and argmax on the last `head` positions, with its
    arguments (compiled once per shape, cached)."""
    key = (id(model), batch, chunk, head, cache_size, attention, block_size, iterations)
    if key in _bare_loops:
        return _bare_loops[key]
    graphdef, state = nnx.split(model)
    cfg = model.config
    rng = np.random.default_rng(0)
    shape = (cfg.num_layers, batch, cache_size, cfg.num_kv_heads, cfg.head_dim)
    cache = KVCache(
        jnp.asarray(rng.standard_normal(shape), cfg.compute_dtype), jnp.asarray(rng.standard_normal(shape), cfg.compute_dtype),
        jnp.zeros((batch,), jnp.int32), jnp.full((batch,), cache_size, jnp.int32),
        jnp.full((batch,), cache_size + chunk, jnp.int32) if cfg.rope_type == "dynamic" else None,
    )
    positions = jnp.broadcast_to(cache_size + jnp.arange(chunk, dtype=jnp.int32), (batch, chunk))

    @jax.jit
    def loop(state, cache, tokens):
        model = nnx.merge(graphdef, state)

        def body(_, tokens):
            hidden, _ = model.decode(tokens, positions, cache, attention=attention, block_size=block_size)
            chosen = argmax(model.logits(hidden[:, chunk - head :]))
            return tokens.at[:, chunk - head :].set(chosen)

        return jax.lax.fori_loop(0, iterations, body, tokens)

    args = (state, cache, jnp.zeros((batch, chunk), jnp.int32))
    loop(*args).block_until_ready()
    _bare_loops[key] = (loop, args)
    return _bare_loops[key]


def bare_forward_seconds(
    model, batch: int, chunk: int, head: int, cache_size: int, attention: str, block_size, iterations: int
) -> np.ndarray:
    """(wall, CPU) seconds per bare jitted forward of this shape, timed now (so it is paired with the
    sampler run it is compared to: on a shared machine the load changes between runs)."""
    loop, args = _bare_loop(model, batch, chunk, head, cache_size, attention, block_size, iterations)
    start, cpu_start = time.perf_counter(), time.process_time()
    loop(*args).block_until_ready()
    return np.array([time.perf_counter() - start, time.process_time() - cpu_start]) / iterations


def bare_seconds(model, result: GenerateResult, strategy: str, iterations: int) -> np.ndarray:
    """(wall, CPU) time the result's forward passes take as bare forwards of the same shapes."""
    shapes, batch = result.shapes, result.shapes["batch"]

    def per_forward(chunk: int, head: int, attention: str, block_size=None) -> np.ndarray:
        return bare_forward_seconds(model, batch, chunk, head, shapes["cache_size"], attention, block_size, iterations)

    if strategy == "ar":
        return per_forward(shapes["prompt_bucket"], 1, "causal") + (result.forward_passes - 1) * per_forward(1, 1, "causal")
    size, prefix = shapes["block_size"], shapes["prompt_bucket"]
    # Each block's first step runs [clean block ; block], block 0's [prompt's full blocks ; block].
    firsts = [(2 * size, result.blocks)] if prefix == size else [(prefix + size, 1), (2 * size, result.blocks - 1)]
    total = sum(count * per_forward(chunk, size, "block", size) for chunk, count in firsts if count)
    return total + (result.forward_passes - result.blocks) * per_forward(size, size, "bidirectional", size)


# ---- one setting ---------------------------------------------------------------------------------


def _batches(prompts: list[Prompt], size: int) -> list[tuple[list[Prompt], int]]:
    """Batches of `size` prompts; the last is filled with copies of its first prompt (not counted)."""
    out = []
    for i in range(0, len(prompts), size):
        batch = prompts[i : i + size]
        out.append((batch + [batch[0]] * (size - len(batch)), len(batch)))
    return out


def _memory(result: GenerateResult) -> dict:
    stats = jax.devices()[0].memory_stats() or {}
    return {
        "program_bytes": result.memory["total"] if result.memory else None,
        "device_peak_bytes": stats.get("peak_bytes_in_use"),
        "process_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def _speculative_stats(result: GenerateResult, real: int) -> np.ndarray:
    """[tokens, verifier row-forwards, accepted, proposed] of the batch's real rows."""
    return np.array([result.lengths[:real].sum(), result.row_verifier_forwards[:real].sum(),
                     result.accepted[:real].sum(), result.proposed[:real].sum()])


def overhead_times(model, batches, kwargs: dict, strategy: str, repeats: int, iterations: int) -> np.ndarray:
    """[[program wall, CPU], [bare wall, CPU]] summed over batches, each the best of `repeats` calls in a
    row: back-to-back calls of one program find the caches as warm as the bare loop's later iterations
    do (interleaving the two would charge the sampler for the bare loop's cache traffic)."""
    total = np.zeros((2, 2))
    for batch, _ in batches:
        ids = [p.ids for p in batch]
        results = [generate(model, ids, **kwargs) for _ in range(repeats)]
        total[0] += np.min([[r.program_seconds, r.program_cpu_seconds] for r in results], axis=0)
        total[1] += np.min([bare_seconds(model, results[0], strategy, iterations) for _ in range(repeats)], axis=0)
    return total


def run_setting(model, setting: Setting, prompts: list[Prompt], tokenizer, base: dict, *, repeats: int, warmup: int,
                overhead_forwards: int, verifier=None) -> dict:
    """Measures one setting; returns the JSON-ready record (verifier: the model a speculative setting's
    "teacher" names)."""
    kwargs = base | dict(setting.kwargs) | {"strategy": setting.strategy}
    if kwargs.get("verifier") == "teacher":
        kwargs["verifier"] = verifier
    batches = _batches(prompts, setting.batch_size)
    first = generate(model, [p.ids for p in batches[0][0]], measure_memory=True, **kwargs)
    for _ in range(warmup):
        for batch, _ in batches:
            generate(model, [p.ids for p in batch], **kwargs)
    runs, latencies, correct = [], [], []
    speculative = np.zeros(4)
    for repeat in range(repeats):
        tokens = forwards = row_forwards = 0
        wall = 0.0
        for batch, real in batches:
            result = generate(model, [p.ids for p in batch], **kwargs)
            tokens += int(result.lengths[:real].sum())
            row_forwards += int(result.row_forwards[:real].sum())
            forwards += result.forward_passes
            wall += result.seconds
            latencies += [result.seconds] * real
            if repeat == 0 and setting.strategy == "speculative":
                speculative += _speculative_stats(result, real)
            if repeat == 0:
                for prompt, ids in zip(batch[:real], result.sequences):
                    if prompt.reference is not None:
                        text = decode(tokenizer, ids) if tokenizer is not None else " ".join(map(str, ids))
                        correct.append(is_correct(text, prompt.reference))
        runs.append({"tokens": tokens, "seconds": wall, "tokens_per_second": tokens / wall, "forward_passes": forwards,
                     "tokens_per_forward": tokens / max(row_forwards, 1)})
    median = lambda key: statistics.median(run[key] for run in runs)  # noqa: E731
    if setting.strategy == "speculative":
        program_wall = program_cpu = bare_wall = bare_cpu = None
    else:
        (program_wall, program_cpu), (bare_wall, bare_cpu) = overhead_times(model, batches, kwargs, setting.strategy,
                                                                             repeats, overhead_forwards)
    if "verifier" in kwargs:  # JSON: the verifier by name, not the model object
        kwargs["verifier"] = dict(setting.kwargs)["verifier"]
    return {
        "setting": setting.name, "strategy": setting.strategy, "batch_size": setting.batch_size,
        "generate_kwargs": kwargs, "num_prompts": len(prompts), "repeats": repeats, "warmup": warmup,
        "tokens_per_verifier_forward": speculative[0] / speculative[1] if speculative[1] else None,
        "acceptance_rate": speculative[2] / speculative[3] if speculative[3] else None,
        "generated_tokens": median("tokens"), "tokens_per_second": median("tokens_per_second"),
        "forward_passes": median("forward_passes"), "tokens_per_forward": median("tokens_per_forward"),
        "latency_p50_s": float(np.percentile(latencies, 50)), "latency_p95_s": float(np.percentile(latencies, 95)),
        "memory": _memory(first), "sampler_overhead": _ratio(program_wall, bare_wall),
        "sampler_overhead_cpu": _ratio(program_cpu, bare_cpu),
        "program_seconds": program_wall, "bare_seconds": bare_wall, "program_cpu_seconds": program_cpu,
        "bare_cpu_seconds": bare_cpu,
        "accuracy": sum(correct) / len(correct) if correct else None, "runs": runs,
        "device": jax.devices()[0].device_kind, "machine": f"{platform.machine()} {platform.system()}",
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a / b


def format_table(records: list[dict]) -> str:
    header = ("setting", "batch", "tok/s", "vs AR", "forwards", "TPF", "TPVF", "accept", "p50 ms", "p95 ms", "MiB", "overhead",
              "ovh CPU", "accuracy")
    optional = lambda value, spec: "-" if value is None else format(value, spec)  # noqa: E731
    rows = [header]
    for r in records:
        memory = r["memory"]["device_peak_bytes"] or r["memory"]["program_bytes"] or 0
        rows.append((
            r["setting"], str(r["batch_size"]), f"{r['tokens_per_second']:.1f}", optional(r.get("speedup_vs_ar"), ".2f"),
            f"{r['forward_passes']:g}",
            f"{r['tokens_per_forward']:.2f}", optional(r.get("tokens_per_verifier_forward"), ".2f"),
            optional(r.get("acceptance_rate"), ".3f"), f"{1e3 * r['latency_p50_s']:.1f}", f"{1e3 * r['latency_p95_s']:.1f}",
            f"{memory / 2**20:.1f}", optional(r["sampler_overhead"], ".3f"), optional(r["sampler_overhead_cpu"], ".3f"),
            optional(r["accuracy"], ".3f"),
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows)
