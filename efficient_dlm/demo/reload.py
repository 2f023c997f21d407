"""The exported dLM as a user meets it: loaded by `transformers` with trust_remote_code, then sampled.

Each prompt is also decoded by `efficient_dlm.generate`, both sides with the decoding defaults the
export recorded (its diffusion spec), so the demo states whether the PyTorch modeling file and our
JAX sampler agree token for token on the real model.
"""
from __future__ import annotations

from typing import Any, Sequence

from efficient_dlm.demo import tasks
from efficient_dlm.extras import require
from efficient_dlm.port.hf_import import from_hf
from efficient_dlm.sample.api import generate


def reload_and_generate(
    hf_dir: str, items: Sequence[tasks.Instance], *, max_new_tokens: int
) -> list[dict[str, Any]]:
    """[{prompt, answer, output, jax_output, tokens_per_forward}] for each item."""
    torch = require("torch", "test", "reloading the export in transformers (demo.hf_samples > 0)")
    transformers = require("transformers", "test", "reloading the export in transformers (demo.hf_samples > 0)")
    AutoModelForCausalLM, AutoTokenizer = transformers.AutoModelForCausalLM, transformers.AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_dir, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=True, dtype=torch.float32)
    model.eval()
    ours = from_hf(hf_dir)
    eos = tokenizer.eos_token_id
    out = []
    for inst in items:
        ids = tokenizer(inst.prompt).input_ids
        result = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, return_dict_in_generate=True)
        hf_ids = _until_stop([int(t) for t in result["new_tokens"][0]], eos)
        jax_ids = generate(ours, [ids], max_new_tokens=max_new_tokens).sequences[0]
        out.append({
            "prompt": inst.prompt,
            "answer": inst.answer.strip(),
            "output": tokenizer.decode(_strip_stop(hf_ids, eos)).strip(),
            "same_as_efficient_dlm": hf_ids == _until_stop(jax_ids, eos),
            "tokens_per_forward": float(result["tokens_per_forward"]),
        })
    return out


def _until_stop(ids: list[int], stop: int) -> list[int]:
    return ids[: ids.index(stop) + 1] if stop in ids else ids


def _strip_stop(ids: list[int], stop: int) -> list[int]:
    return ids[:-1] if ids and ids[-1] == stop else ids
