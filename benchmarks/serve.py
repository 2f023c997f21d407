"""`edlm serve` under load against the static-batch `generate` path: generated tokens/s and p50/p95 latency.

For each model (the dLM of --dlm with its own decoding, the AR teacher of --teacher with strategy=ar,
and with --speculative the dLM drafting for the teacher), the same --prompts prompts (the demo's
held-out prompts) are sent by C closed-loop clients (C = each --concurrency): each client sends its
next request when the previous one has answered.

- server: the engine with --slots slots behind the OpenAI API on 127.0.0.1 (one port per model, warmed
  up before timing), requests sent with the official `openai` client, greedy, max_tokens=--max_tokens;
  latency = request sent -> response received (queueing included).
- static: the prompts in consecutive batches of C through `generate` (compiled before timing), which
  is what C clients in lockstep get from a server without continuous batching: every request's latency
  is its batch's time.

Throughput = generated tokens (the responses' usage.completion_tokens; generate's lengths) / wall time.
Bounded: --prompts requests per (model, path, concurrency); nothing listens beyond 127.0.0.1.

    python benchmarks/serve.py --dlm DLM_CKPT --teacher TEACHER_CKPT [--out serve_bench.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import openai  # noqa: E402

from efficient_dlm import checkpoints  # noqa: E402
from efficient_dlm.eval.tasks.utils import DEMO_FILE, read_rows  # noqa: E402
from efficient_dlm.sample.api import generate  # noqa: E402
from efficient_dlm.sample.layout import bucket  # noqa: E402
from efficient_dlm.serve.app import Server, create_app  # noqa: E402
from efficient_dlm.serve.engine import Engine, EngineConfig  # noqa: E402
from efficient_dlm.serve.text import Texts  # noqa: E402


def summary(latencies: list[float], tokens: int, seconds: float) -> dict:
    return {"tokens": tokens, "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 1),
            "p50_s": round(float(np.percentile(latencies, 50)), 3), "p95_s": round(float(np.percentile(latencies, 95)), 3)}


def through_server(url: str, name: str, prompts: list[list[int]], concurrency: int, max_tokens: int) -> dict:
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)

    def one(prompt):
        sent = time.perf_counter()
        out = client.completions.create(model=name, prompt=prompt, max_tokens=max_tokens, temperature=0)
        return time.perf_counter() - sent, out.usage.completion_tokens

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, prompts))
    return summary([r[0] for r in results], sum(r[1] for r in results), time.perf_counter() - started)


def static(model, prompts: list[list[int]], concurrency: int, max_tokens: int, settings: dict) -> dict:
    batches = [prompts[i:i + concurrency] for i in range(0, len(prompts), concurrency)]
    capacity = bucket(max(len(p) for p in prompts))
    run = lambda batch: generate(model, batch, max_new_tokens=max_tokens, prompt_bucket=capacity, **settings)  # noqa: E731
    for size in sorted({len(b) for b in batches}):  # compile every batch shape before timing
        run(batches[0][:size])
    latencies, tokens = [], 0
    started = time.perf_counter()
    for batch in batches:
        sent = time.perf_counter()
        result = run(batch)
        latencies += [time.perf_counter() - sent] * len(batch)
        tokens += result.generated_tokens
    return summary(latencies, tokens, time.perf_counter() - started)


def bench_model(label: str, ckpt: str, prompts, args, strategy: str | None, verifier=None) -> dict:
    model = checkpoints.load(ckpt)
    capacity = bucket(max(len(p) for p in prompts))
    engine = Engine(model, EngineConfig(slots=args.slots, max_prompt_tokens=capacity, max_new_tokens=args.max_tokens,
                                        queue_size=max(args.concurrency) + 1, strategy=strategy), verifier=verifier)
    programs = engine.warmup(sampled=(False,))
    settings = {"strategy": engine.strategy}
    if verifier is not None:
        settings["verifier"] = verifier
    out = {"model": label, "ckpt": ckpt, "strategy": engine.strategy, "slots": args.slots, "step_programs": programs,
           "server": {}, "static": {}}
    with Server(create_app(engine.start(), Texts(checkpoints.tokenizer_dir(ckpt)), label)) as server:
        through_server(server.url, label, prompts[: args.slots], args.slots, args.max_tokens)  # warm the HTTP path
        for c in args.concurrency:
            out["server"][c] = through_server(server.url, label, prompts, c, args.max_tokens)
            print(label, "server", c, out["server"][c], flush=True)
    for c in args.concurrency:
        out["static"][c] = static(model, prompts, c, args.max_tokens, settings)
        print(label, "static", c, out["static"][c], flush=True)
    out["tokens_per_forward"] = float(engine.metrics.tokens_per_forward._value.get())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dlm", required=True, help="dLM checkpoint (e.g. an `edlm demo` run's train directory)")
    parser.add_argument("--teacher", required=True, help="its AR teacher checkpoint (edlm import-hf of the demo teacher)")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max_tokens", type=int, default=32)
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32])
    parser.add_argument("--speculative", action="store_true", help="also serve the dLM drafting for the teacher")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    texts = Texts(checkpoints.tokenizer_dir(args.teacher))
    prompts = [texts.encode(r["prompt"]) for r in read_rows(DEMO_FILE)[: args.prompts]]
    results = {"prompts": len(prompts), "prompt_tokens": [min(map(len, prompts)), max(map(len, prompts))],
               "max_tokens": args.max_tokens, "models": []}
    results["models"].append(bench_model("dlm", args.dlm, prompts, args, None))
    results["models"].append(bench_model("teacher", args.teacher, prompts, args, "ar"))
    if args.speculative:
        results["models"].append(bench_model("speculative", args.dlm, prompts, args, "speculative",
                                             verifier=checkpoints.load(args.teacher)))
    text = json.dumps(results, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
