"""`edlm serve` over HTTP on 127.0.0.1, spoken to with the official `openai` client: completions and chat,
whole and streamed, equal to `generate` on the prompt alone; the error cases; a client that leaves frees its slot; 32 concurrent streams with ragged prompts each get their own solo output."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx2 as httpx  # the HTTP client the openai package is built on
import numpy as np
import openai
import pytest
from transformers import AutoTokenizer

from efficient_dlm import checkpoints
from efficient_dlm.diffusion.spec import DiffusionSpec
from efficient_dlm.sample.api import generate
from efficient_dlm.serve.app import Server, create_app
from efficient_dlm.serve.engine import Engine, EngineConfig, Request
from efficient_dlm.serve.text import Texts
from tests.test_serve_engine import serve_model

BYTE_TOKENIZER = os.path.join(os.path.dirname(checkpoints.__file__), "assets", "byte_tokenizer")
CHAT_TEMPLATE = "{% for m in messages %}{{ m.role[0] }}:{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}a:{% endif %}"
MAX_NEW = 12
CKPT: dict[str, str] = {}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(client, url, engine, model, texts, tokenizer dir): a tiny dLM with the byte tokenizer and a chat template."""
    root = tmp_path_factory.mktemp("serve")
    tok_dir = root / "tok"
    shutil.copytree(BYTE_TOKENIZER, tok_dir)
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": CHAT_TEMPLATE, "eos_token": "<eos>"}))
    model = serve_model(vocab_size=260, mask_token_id=259, eos_token_id=1, pad_token_id=0)
    ckpt = str(root / "tiny-dlm")
    checkpoints.save(model, ckpt, tokenizer_dir=str(tok_dir), spec=DiffusionSpec(mask_token_id=259, block_size=4))
    model = checkpoints.load(ckpt)
    engine = Engine(model, EngineConfig(slots=4, max_prompt_tokens=16, max_new_tokens=MAX_NEW, queue_size=64))
    engine.warmup(sampled=(False,))
    texts = Texts(checkpoints.tokenizer_dir(ckpt))
    with Server(create_app(engine.start(), texts, "tiny-dlm")) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=300)
        CKPT["dir"] = ckpt  # for the test that starts `edlm serve` itself
        yield client, server.url, engine, model, texts, checkpoints.tokenizer_dir(ckpt)


def solo(model, texts, ids, max_new=MAX_NEW) -> str:
    ref = generate(model, [ids], max_new_tokens=max_new, prompt_bucket=16)
    return texts.decode(ref.sequences[0]), len(ref.sequences[0])


def test_completions_whole_and_streamed_equal_generate(served):
    client, _, _, model, texts, _ = served
    prompt = "def add(a, b"
    expected, count = solo(model, texts, texts.encode(prompt))
    whole = client.completions.create(model="tiny-dlm", prompt=prompt, max_tokens=MAX_NEW, temperature=0)
    assert whole.choices[0].text == expected
    assert whole.usage.completion_tokens == count and whole.usage.prompt_tokens == len(texts.encode(prompt))
    chunks = list(client.completions.create(model="tiny-dlm", prompt=prompt, max_tokens=MAX_NEW, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
    assert chunks[-1].usage.completion_tokens == count and not chunks[-1].choices
    assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason


def test_chat_whole_and_streamed_equal_generate(served):
    client, _, _, model, texts, tok_dir = served
    messages = [{"role": "user", "content": "hi"}]
    rendered = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True).apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)
    assert rendered == "u:hi\na:"
    expected, _ = solo(model, texts, texts.encode(rendered))
    whole = client.chat.completions.create(model="tiny-dlm", messages=messages, max_tokens=MAX_NEW, temperature=0)
    assert whole.choices[0].message.content == expected and whole.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(model="tiny-dlm", messages=messages, max_tokens=MAX_NEW,
                                                 temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected


def test_models_health_metrics(served):
    client, url, _, _, _, _ = served
    assert [m.id for m in client.models.list().data] == ["tiny-dlm"]
    assert httpx.get(url + "/health").json() == {"status": "ok"}
    text = httpx.get(url + "/metrics").text
    for name in ("edlm_requests_total", "edlm_generated_tokens_total", "edlm_tokens_per_forward", "edlm_queue_depth",
                 "edlm_slot_occupancy", "edlm_request_latency_seconds_bucket", "edlm_time_to_first_token_seconds"):
        assert name in text


@pytest.mark.parametrize("body, param", [
    (b"{not json", None),
    ({"prompt": "x", "max_tokens": "12"}, "max_tokens"),
    ({"prompt": "x" * 40, "max_tokens": 4}, "prompt"),
    ({"prompt": "x", "max_tokens": MAX_NEW + 1}, "max_tokens"),
    ({"prompt": "x", "temperature": float("nan")}, "temperature"),
    ({"prompt": "x", "threshold": float("inf")}, "threshold"),
    ({"prompt": "x", "logprobs": 2}, "logprobs"),
    ({"prompt": "x", "n": 2}, "n"),
    ({"prompt": "x", "strategy": "ar"}, "strategy"),
    ({"prompt": 7}, "prompt"),
])
def test_bad_requests_get_openai_errors(served, body, param):
    url = served[1]
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(url + "/v1/completions", content=content, headers={"content-type": "application/json"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]


def test_full_queue_is_429(served):
    client, url, engine, _, _, _ = served
    # The idle engine sleeps until a submit wakes it: requests parked in its queue stay there.
    parked = [Request([5], 1, dict(engine.defaults), lambda *a: None) for _ in range(engine.config.queue_size)]
    for r in parked:
        r.cancel()  # dropped unrun once the engine wakes
    engine.waiting.extend(parked)
    response = httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 2, "temperature": 0})
    with engine._wake:
        engine._wake.notify()
    while engine.waiting:  # the parked requests are dropped before the next test
        time.sleep(0.02)
    assert response.status_code == 429 and response.json()["error"]["type"] == "rate_limit_error"


def test_client_disconnect_frees_its_slot(served, monkeypatch):
    _, url, engine, _, _, _ = served
    permits = threading.Semaphore(0)
    run_step = engine.step

    def gated_step():  # the engine waits for a permit after each call: the request cannot finish meanwhile
        run_step()
        assert permits.acquire(timeout=60)

    monkeypatch.setattr(engine, "step", gated_step)
    cancelled = engine.metrics.requests.labels(reason="cancelled")
    before = cancelled._value.get()
    body = {"prompt": [5, 6, 7], "max_tokens": MAX_NEW, "temperature": 0, "stream": True}
    deadline = time.time() + 60
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        while not any(engine.slots) and time.time() < deadline:
            time.sleep(0.02)
        slot = next(s for s in engine.slots if s is not None)
    while not slot.request.cancelled.is_set() and time.time() < deadline:  # hung up: the server cancels it
        time.sleep(0.02)
    assert slot.request.cancelled.is_set()
    monkeypatch.setattr(engine, "step", run_step)
    permits.release()
    while engine.busy and time.time() < deadline:
        time.sleep(0.02)
    assert not engine.busy and cancelled._value.get() == before + 1
    assert len(slot.generated) < MAX_NEW  # it left at a block boundary, unfinished


def test_32_concurrent_streams_each_get_their_solo_output(served):
    client, _, _, model, texts, _ = served
    rng = np.random.RandomState(0)
    prompts = ["".join(rng.choice(list("abcdefghij(){}=+ "), size=n)) for n in rng.randint(1, 15, size=32)]
    expected = [solo(model, texts, texts.encode(p))[0] for p in prompts]

    def stream(i):
        chunks = client.completions.create(model="tiny-dlm", prompt=prompts[i], max_tokens=MAX_NEW, temperature=0,
                                           stream=True)
        return "".join(c.choices[0].text for c in chunks if c.choices)

    with ThreadPoolExecutor(32) as pool:
        got = list(pool.map(stream, range(32)))
    assert got == expected


def test_serve_refuses_a_checkpoint_that_does_not_load(tmp_path, capsys):
    from efficient_dlm.cli import main

    (tmp_path / "config.json").write_text("{broken")
    assert main(["edlm", "serve", "--ckpt", str(tmp_path)]) == 2
    assert "does not load" in capsys.readouterr().err
    assert main(["edlm", "serve", "--ckpt", str(tmp_path), "--verifier", str(tmp_path / "missing")]) == 2
    assert "--verifier: checkpoint directory" in capsys.readouterr().err


def test_sigterm_drains_open_requests_and_exits(served):
    """`edlm serve` in a subprocess: SIGTERM while requests stream and wait; every one completes, then it exits."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([cli_root(), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "efficient_dlm.cli", "serve", "--ckpt", CKPT["dir"], "--port",
                             str(port), "--slots", "2", "--max_prompt_tokens", "16", "--max_tokens", str(MAX_NEW)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        started = threading.Semaphore(0)

        def stream(i):
            body = {"prompt": [5 + i, 6, 7], "max_tokens": MAX_NEW, "temperature": 0, "stream": True}
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as response:
                started.release()  # headers received: the request is in the engine (queued or in a slot)
                return [line for line in response.iter_lines() if line]

        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(stream, i) for i in range(8)]
            for _ in futures:
                assert started.acquire(timeout=120)
            proc.send_signal(signal.SIGTERM)
            results = [f.result() for f in futures]
        assert all(lines and lines[-1] == "data: [DONE]" for lines in results)
        # uvicorn re-raises the signal once its graceful shutdown (and our engine drain) is complete
        assert proc.wait(120) in (0, -signal.SIGTERM)
        assert "Application shutdown complete" in proc.stdout.read().decode()
    finally:
        proc.kill()


def cli_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(checkpoints.__file__)))


def test_stop_string_cuts_whole_and_streamed_text_alike(served):
    client, _, _, model, texts, _ = served
    prompt = "x = (1"
    full, _ = solo(model, texts, texts.encode(prompt))
    stop = full[4:6]  # a string the solo output contains: the response ends before its first occurrence
    assert len(stop) == 2
    expected = full[: full.find(stop)]
    kwargs = dict(model="tiny-dlm", prompt=prompt, max_tokens=MAX_NEW, temperature=0, stop=[stop])
    whole = client.completions.create(**kwargs)
    assert whole.choices[0].text == expected and whole.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(stream=True, **kwargs) if c.choices)
    assert streamed == expected
