"""Where a sampler step's time goes on XLA:CPU: overhead at a fixed forward count, and per-op time (docs/BENCHMARKS.md,
"Session 9: where the sampler's excess went").

    JAX_PLATFORMS=cpu PYTHONPATH=. python benchmarks/sampler_profile.py [--batch 1,8] [--threshold 1.0,0.0] \
        [--repeats 9] [--profile] [--hlo OUT.txt] [--per_call] [--fit] [--alternatives] [--required_tpf]

The model is the shipped demo teacher (architecture and weights of the demo's dLM; the weights do not change
what a step costs). Threshold 1.0 commits one token per step (32 new tokens: a fixed number of forwards, no
stop token), threshold 0.0 a whole block per step (per-block costs). For each setting it prints the best
program time of `--repeats` calls against the same forwards as bare jitted forwards (sample/bench.py
`bare_seconds`, what `edlm bench` reports as the sampler overhead). `--profile` adds a jax.profiler trace of
3 calls at the first setting, summed per XLA:CPU thunk (the fusions, copies and loops of the compiled
program, named as in its HLO: `--hlo` writes that HLO), the largest first. `--per_call`, `--fit` and
`--alternatives` (docs/BENCHMARKS.md, "Session 10") split a call's time around the program, separate the
per-call and per-forward parts of the overhead, and time the first-step and attention-span alternatives;
`--required_tpf` gives the tokens per forward the CPU bar of issue 20 needs, from bare forward costs.
Why a script of its own: `edlm bench` needs trained checkpoints and measures whole decodings, whose forward
counts depend on the weights; this isolates the program's per-step work.
"""
from __future__ import annotations

import argparse
import collections
import glob
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

import efficient_dlm as edlm
from efficient_dlm.sample import bench
from efficient_dlm.sample.api import prepare

TEACHER = "efficient_dlm/assets/demo_teacher"


def _settings(batch: int, threshold: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(5, 3000, size=int(n)).tolist() for n in rng.integers(12, 30, size=batch)]
    kwargs = dict(strategy="threshold", threshold=threshold, block_size=16, max_new_tokens=32, stop_tokens=[],
                  token_shift=True)
    return prompts, kwargs


def overhead(model, batch: int, threshold: float, repeats: int) -> str:
    prompts, kwargs = _settings(batch, threshold)
    results = [edlm.generate(model, prompts, **kwargs) for _ in range(repeats + 1)][1:]  # the first compiles
    program = min(r.program_seconds for r in results)
    bare = min(bench.bare_seconds(model, results[0], "threshold", 20)[0] for _ in range(repeats))
    forwards = results[0].forward_passes
    return (f"batch {batch} threshold {threshold}: {forwards} forwards, program {program * 1e3:.2f} ms, bare "
            f"{bare * 1e3:.2f} ms, overhead {program / bare:.3f}, {program / forwards * 1e3:.3f} ms per forward")


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def per_call(model, batch: int, threshold: float, repeats: int) -> str:
    """Where one call's time goes around the compiled program, best of `repeats` each: `prepare` (host
    layout), the jitted call as `generate` times it (dispatch: static-argument hashing, flattening and
    transferring the arguments; the run; fetching the outputs), the same without the fetch, the
    compiled executable on arguments already on the device (the run alone), and a program taking the same
    arguments and returning the same outputs with no work (what dispatch, transfers and fetch cost)."""
    prompts, kwargs = _settings(batch, threshold)
    prep = prepare(model, prompts, **kwargs)
    program, args = prep.program, prep.args
    jax.block_until_ready(program(*args))
    dynamic = jax.device_put(args[2:])  # (state, inputs, knobs): graphdef and plan are static
    compiled = program.lower(*args).compile()
    leaves = len(jax.tree.leaves(dynamic))

    def trivial(graphdef, plan, state, inputs, knobs):  # the same arguments and outputs, (almost) no work
        tokens = jnp.zeros((batch, 16), jnp.int32) + inputs["prefix"][:, :1] + knobs["seed"].astype(jnp.int32)
        total = sum(jnp.sum(leaf) for leaf in jax.tree.leaves(state)).astype(jnp.int32)
        return dict(tokens=tokens, commit_step=tokens, lengths=tokens[:, 0], row_forwards=tokens[:, 0],
                    forwards=total, blocks=total)

    empty = jax.jit(trivial, static_argnums=(0, 1))
    jax.device_get(empty(*args))
    times = {
        "prepare": _best(lambda: prepare(model, prompts, **kwargs), repeats),
        "trivial program": _best(lambda: jax.device_get(empty(*args)), repeats),
        "call + fetch": _best(lambda: jax.device_get(program(*args)), repeats),
        "call": _best(lambda: jax.block_until_ready(program(*args)), repeats),
        "compiled, device args": _best(lambda: jax.block_until_ready(compiled(*dynamic)), repeats),
    }
    rows = [f"  {name:24s} {t * 1e3:8.3f} ms" for name, t in times.items()]
    return "\n".join([f"per call, batch {batch} threshold {threshold} ({leaves} argument leaves):"] + rows)


def fit(model, threshold: float, repeats: int, lengths=(16, 32, 64, 128)) -> str:
    """Per-call and per-forward parts of the overhead at batch 1: one 20-token prompt, max_new_tokens in
    `lengths` (no stop token: the forward count grows with it), program and bare times (best of `repeats`)
    and a least-squares line through each: the slopes' ratio is the sampler's cost per forward against a
    bare forward, the intercepts' difference what a call costs beyond its forwards."""
    prompt = [np.random.default_rng(0).integers(5, 3000, size=20).tolist()]
    rows = []
    for n in lengths:
        kwargs = dict(strategy="threshold", threshold=threshold, block_size=16, max_new_tokens=n, stop_tokens=[],
                      token_shift=True)
        results = [edlm.generate(model, prompt, **kwargs) for _ in range(repeats + 1)][1:]
        program = min(r.program_seconds for r in results)
        bare = min(bench.bare_seconds(model, results[0], "threshold", 20)[0] for _ in range(repeats))
        rows.append((results[0].forward_passes, 1e3 * program, 1e3 * bare))
    f = np.array(rows)
    (ps, pi), (bs, bi) = np.polyfit(f[:, 0], f[:, 1], 1), np.polyfit(f[:, 0], f[:, 2], 1)
    cells = " ".join(f"[{int(n)} forwards {p:.2f} / {b:.2f} ms = {p / b:.3f}]" for n, p, b in rows)
    return (f"batch 1 threshold {threshold}: {cells}\n  program = {pi:.2f} + {ps:.3f} ms per forward, bare = "
            f"{bi:.2f} + {bs:.3f} ms per forward: per-forward ratio {ps / bs:.3f}")


def _bare_ms(model, batch: int, chunk: int, head: int, slots: int, attention: str, size: int, repeats: int) -> float:
    """Milliseconds per bare forward of this shape (sample/bench.py), the best of `repeats` timed loops."""
    return 1e3 * min(bench.bare_forward_seconds(model, batch, chunk, head, slots, attention, size, 20)[0]
                     for _ in range(repeats))


def alternatives(model, batch: int, repeats: int, size: int = 16, cache: int = 80, filled: int = 48) -> str:
    """The two costs issue 20 asked about, as bare forwards (sample/bench.py) of the demo's shapes: a block's
    first step as one [clean block ; block] chunk (block-causal, what the sampler runs) against the block
    alone plus a separate forward that caches the clean block; and a denoising step's attention over the
    whole static cache (`cache` slots, what the sampler runs) against one bounded by the filled length
    (`filled`: the demo's mean over a generation)."""
    def ms(chunk, head, attention, slots=cache):
        return _bare_ms(model, batch, chunk, head, slots, attention, size, repeats)

    first = ms(2 * size, size, "block")
    split = ms(size, size, "bidirectional") + ms(size, 1, "block")
    whole, bounded = ms(size, size, "bidirectional"), ms(size, size, "bidirectional", filled)
    return (f"batch {batch}: first step [clean ; block] {first:.3f} ms vs block + separate cache write {split:.3f} ms"
            f" ({split / first:.2f}x); step over {cache} cache slots {whole:.3f} ms vs {filled} filled {bounded:.3f} ms"
            f" ({whole / bounded:.3f}x)")


def required_tpf(model, batch: int, target: float, repeats: int, size: int = 16, cache: int = 80) -> str:
    """Issue 20's CPU bar as arithmetic: bare forwards (sample/bench.py) of an AR step (1 position), a
    denoising step (the block) and fused self-speculation's forward (3B + 1 positions, timed as one causal
    chunk with the LM head on 2B + 1), and the tokens per forward each dLM decoding would need to make
    `target` times the AR tokens/s at this batch (its forward's cost over the AR step's, times target; a
    threshold decoding's first steps cost more than its other steps, so its figure is a lower bound)."""
    def ms(chunk, head, attention):
        return _bare_ms(model, batch, chunk, head, cache, attention, size, repeats)

    ar, step, fused = ms(1, 1, "causal"), ms(size, size, "bidirectional"), ms(3 * size + 1, 2 * size + 1, "causal")
    return (f"batch {batch}: AR step {ar:.3f} ms, denoising step {step:.3f} ms, fused forward {fused:.3f} ms; for "
            f"{target:g}x AR: threshold decoding needs TPF >= {target * step / ar:.1f}, fused self-speculation "
            f">= {target * fused / ar:.1f} (a block commits at most {size + 1})")


def profile(model, batch: int, threshold: float, top: int = 40) -> str:
    from jax._src.lib import _profile_data  # jaxlib's reader of the trace's xplane

    prompts, kwargs = _settings(batch, threshold)
    for _ in range(2):
        edlm.generate(model, prompts, **kwargs)
    out = tempfile.mkdtemp(prefix="sampler_profile_")
    jax.profiler.start_trace(out)
    for _ in range(3):
        edlm.generate(model, prompts, **kwargs)
    jax.profiler.stop_trace()
    data = _profile_data.ProfileData.from_file(sorted(glob.glob(f"{out}/**/*.xplane.pb", recursive=True))[-1])
    total, count = collections.Counter(), collections.Counter()
    for plane in data.planes:
        for line in plane.lines:
            if "XLAEigen" not in line.name:  # the XLA:CPU worker threads
                continue
            for event in line.events:
                if not event.name.startswith(("end:", "ThunkExecutor", "SlinkyThreadPool")):
                    total[event.name] += event.duration_ns
                    count[event.name] += 1
    rows = [f"{ns / 3e3:10.1f} us per call {count[name] // 3:5d}x  {name}" for name, ns in total.most_common(top)]
    return "\n".join([f"per XLA:CPU thunk, batch {batch} threshold {threshold} (3 calls):"] + rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", default="1,8")
    parser.add_argument("--threshold", default="1.0,0.0")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--per_call", action="store_true", help="time a call's parts around the program")
    parser.add_argument("--alternatives", action="store_true", help="first-step and attention-span alternatives")
    parser.add_argument("--fit", action="store_true", help="batch 1: per-call and per-forward parts of the overhead")
    parser.add_argument("--required_tpf", action="store_true", help="the TPF issue 20's bar needs (batch 1 and 64)")
    parser.add_argument("--hlo", default=None, help="write the compiled HLO of the first setting here")
    args = parser.parse_args()
    model = edlm.from_hf(TEACHER)
    settings = [(int(b), float(t)) for b in args.batch.split(",") for t in args.threshold.split(",")]
    for batch, threshold in settings:
        print(overhead(model, batch, threshold, args.repeats), flush=True)
    if args.hlo:
        prompts, kwargs = _settings(*settings[0])
        prep = prepare(model, prompts, **kwargs)
        with open(args.hlo, "w") as f:
            f.write(prep.program.lower(*prep.args).compile().as_text())
    if args.required_tpf:
        for batch, target in ((1, 2.0), (64, 1.0)):
            print(required_tpf(model, batch, target, args.repeats), flush=True)
    if args.fit:
        for threshold in sorted({t for _, t in settings}):
            print(fit(model, threshold, args.repeats), flush=True)
    if args.alternatives:
        for batch in sorted({b for b, _ in settings}):
            print(alternatives(model, batch, args.repeats), flush=True)
    if args.per_call:
        for batch, threshold in settings:
            print(per_call(model, batch, threshold, args.repeats), flush=True)
    if args.profile:
        print(profile(model, *settings[0]))


if __name__ == "__main__":
    main()
