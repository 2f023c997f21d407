"""Speculative decoding through the serving engine and its HTTP server against the whole-generation
speculative sampler: every request (more requests than slots, ragged prompts, greedy and sampled, stop
tokens) gets exactly what `generate(model, [prompt], strategy="speculative", verifier=...)` gives it alone,
which for greedy requests is the verifier's own AR decoding (tests/test_speculative.py). One engine, one
set of compiled programs for the module."""
from __future__ import annotations

import numpy as np
import openai
import pytest

from efficient_dlm.sample.api import generate
from efficient_dlm.serve import speculative as spec_lib
from efficient_dlm.serve.app import Server, create_app
from efficient_dlm.serve.engine import Engine, EngineConfig
from efficient_dlm.serve.text import Texts
from tests.test_serve_engine import run_all, serve_model

MAX_NEW, DRAFT_STEPS = 10, 2


@pytest.fixture(scope="module")
def spec_engine():
    """(engine, drafter, teacher, widths of every call): a tiny dLM drafting for a tiny AR teacher."""
    drafter = serve_model()
    teacher = serve_model(seed=1, mask_token_id=None, vocab_size=96)  # the AR teacher: the dLM appended [MASK]
    engine = Engine(drafter, EngineConfig(slots=3, max_prompt_tokens=4, max_new_tokens=MAX_NEW, block_size=4,
                                          draft_steps=DRAFT_STEPS), verifier=teacher)
    widths = []
    build = spec_lib.build_inputs

    def recording(geo, slots):
        inputs = build(geo, slots)
        widths.append((inputs["d_tokens"].shape[1], inputs["v_tokens"].shape[1]))
        return inputs

    spec_lib.build_inputs = recording
    try:
        yield engine.start(), drafter, teacher, widths
    finally:
        spec_lib.build_inputs = build
        engine.stop()


def solo(drafter, teacher, prompt, threshold=None, temperature=0.0, seed=0) -> list[int]:
    return generate(drafter, [prompt], max_new_tokens=MAX_NEW, block_size=4, strategy="speculative", verifier=teacher,
                    draft_steps=DRAFT_STEPS, prompt_bucket=4, threshold=threshold, temperature=temperature,
                    seed=seed).sequences[0]


def test_speculative_engine_equals_solo_speculative_generate(spec_engine):
    engine, drafter, teacher, widths = spec_engine
    assert engine.strategy == "speculative"
    rng = np.random.RandomState(2)
    lengths = [3, 4, 1, 2, 4, 3, 2]  # shorter than a block and one whole block (the prompt capacity)
    requests = [(rng.randint(1, 90, size=n).tolist(), MAX_NEW,
                 {"threshold": 0.05 if i % 3 else 0.0, "temperature": 0.8 if i % 2 else 0.0, "seed": i,
                  "stop_ids": (0,) if i < 4 else (0, 17)}) for i, n in enumerate(lengths)]
    got = run_all(engine, requests)
    reasons = set()
    for (prompt, _, s), (tokens, reason) in zip(requests, got):
        ref = generate(drafter, [prompt], max_new_tokens=MAX_NEW, block_size=4, strategy="speculative",
                       verifier=teacher, draft_steps=DRAFT_STEPS, prompt_bucket=4, threshold=s["threshold"],
                       temperature=s["temperature"], seed=s["seed"], stop_tokens=s["stop_ids"])
        assert tokens == ref.sequences[0], (prompt, s)
        assert reason == ("stop" if tokens[-1] in s["stop_ids"] else "length")
        reasons.add(reason)
    assert set(widths) <= set(engine.runner.geometry.all_widths())  # what the warm-up compiles: no compile in service
    accepted = engine.metrics.draft_accepted._value.get()
    assert 0 < accepted < engine.metrics.draft_proposed._value.get()  # drafts both accepted and rejected


def test_openai_client_gets_the_speculative_output(spec_engine):
    engine, drafter, teacher, _ = spec_engine
    prompt = [5, 61, 7]
    expected = Texts(None).decode(solo(drafter, teacher, prompt, threshold=0.05))
    with Server(create_app(engine, Texts(None), "tiny-spec")) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=300)
        kwargs = dict(model="tiny-spec", prompt=prompt, max_tokens=MAX_NEW, temperature=0, extra_body={"threshold": 0.05})
        whole = client.completions.create(**kwargs)
        streamed = "".join(c.choices[0].text for c in client.completions.create(stream=True, **kwargs) if c.choices)
        with pytest.raises(openai.BadRequestError, match="speculative"):
            client.completions.create(model="tiny-spec", prompt=prompt, max_tokens=2, extra_body={"strategy": "threshold"})
    assert whole.choices[0].text == expected == streamed
