"""The continuous-batching engine against the solo sampler: every request (more requests than slots,
ragged prompts, greedy and sampled, joining at different blocks) gets exactly what
`generate(model, [prompt], ...)` gives it alone; steady state does not recompile."""
from __future__ import annotations

import threading

import jax
import numpy as np
import pytest
from flax import nnx

from efficient_dlm.sample.api import generate
from efficient_dlm.sample.program import TRACES
from efficient_dlm.serve.engine import Engine, EngineConfig, QueueFull, Request, RequestError
from tests.hf_factory import random_model, tiny_config


def serve_model(seed: int = 0, **changes):
    """A tiny random dLM whose weights are scaled up so that its outputs depend on the prompt (a plain
    N(0, 0.02) model repeats one token, which would make the comparisons weak)."""
    cfg = tiny_config(**{"mask_token_id": 96, "eos_token_id": 0, "max_position_embeddings": 256, **changes})
    model = random_model(cfg, seed=seed)
    params = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(lambda x: x * 6 if x.ndim >= 2 else x, params))
    return model


def run_all(engine: Engine, requests: list[tuple[list[int], int, dict]]) -> list[tuple[list[int], str]]:
    out = [([], None) for _ in requests]
    left = threading.Semaphore(0)

    def receiver(i):
        def on_tokens(new, reason):
            out[i][0].extend(new)
            if reason is not None:
                out[i] = (out[i][0], reason)
                left.release()
        return on_tokens

    for i, (prompt, max_new, settings) in enumerate(requests):
        engine.submit(Request(prompt, max_new, {**engine.defaults, **settings}, receiver(i)))
    for _ in requests:
        assert left.acquire(timeout=300)
    return out


@pytest.mark.parametrize("strategy", ["threshold", "ar"])
def test_engine_equals_solo_generate(strategy):
    model = serve_model()
    engine = Engine(model, EngineConfig(slots=3, max_prompt_tokens=8, max_new_tokens=12, block_size=4,
                                        strategy=strategy))
    engine.warmup()
    traces = TRACES.copy()
    engine.start()
    rng = np.random.RandomState(1)
    lengths = [3, 8, 5, 1, 7, 2, 6]
    requests = [(rng.randint(1, 90, size=n).tolist(), 10,
                 {"threshold": 0.0 if i % 3 == 0 else 0.05, "temperature": 0.7 if i % 2 else 0.0, "seed": i}) for i, n in enumerate(lengths)]
    got = run_all(engine, requests)
    again = run_all(engine, requests[:3])
    assert TRACES == traces  # every call ran a program compiled by the warm-up
    engine.stop()
    parallel = 0
    for (prompt, max_new, s), (tokens, reason) in zip(requests, got):
        ref = generate(model, [prompt], max_new_tokens=max_new, block_size=4, strategy=strategy, prompt_bucket=8,
                       threshold=s["threshold"], temperature=s["temperature"], seed=s["seed"])
        assert tokens == ref.sequences[0]
        assert reason == ("stop" if tokens[-1] == 0 else "length")
        parallel += ref.forward_passes < len(tokens)
    assert [t for t, _ in again] == [t for t, _ in got[:3]]
    if strategy != "ar":
        assert parallel  # threshold 0 commits whole blocks: parallel commits are covered


def test_engine_refuses_bad_requests_and_a_full_queue():
    model = serve_model()
    engine = Engine(model, EngineConfig(slots=1, max_prompt_tokens=8, max_new_tokens=4, block_size=4, queue_size=1))
    settings = dict(engine.defaults)
    for prompt, max_new, changes, param in [
        ([1] * 9, 2, {}, "prompt"), ([], 2, {}, "prompt"), ([97], 2, {}, "prompt"), ([1], 5, {}, "max_tokens"),
        ([1], 2, {"threshold": float("nan")}, "threshold"), ([1], 2, {"temperature": float("inf")}, "temperature"),
        ([1], 2, {"top_p": 0.0}, "top_p"),
    ]:
        with pytest.raises(RequestError) as err:
            engine.check(prompt, max_new, {**settings, **changes})
        assert err.value.param == param
    engine._running = True  # accept without a thread: the queue fills
    engine.submit(Request([1], 2, settings, lambda *a: None))
    with pytest.raises(QueueFull):
        engine.submit(Request([1], 2, settings, lambda *a: None))
