"""The shipped demo teacher (efficient_dlm/assets/demo_teacher): size, recorded accuracy, transformers parity.

The record (demo_teacher.json) was written by `python -m efficient_dlm.demo.teacher --record` at the
end of the recipe in configs/demo_teacher.py; here the shipped weights are measured again on the same
fixed held-out check set, and a few of its greedy answers are decoded independently by transformers.
"""
import os

import pytest

from efficient_dlm.demo import teacher

MAX_ASSET_BYTES = 25 * 2**20


def test_shipped_teacher_is_small_and_records_its_recipe():
    path = teacher.teacher_dir()
    size = sum(os.path.getsize(os.path.join(path, name)) for name in os.listdir(path))
    assert size <= MAX_ASSET_BYTES
    record = teacher.read_record()
    assert record["recipe"] == "configs/demo_teacher.py" and record["architecture"]["model_type"] == "qwen3"


def test_shipped_tokenizer_gives_one_token_per_task_symbol():
    """The task formats rely on it (efficient_dlm/demo/tasks.py): a symbol is one position, digits included."""
    from efficient_dlm.demo import tasks
    from efficient_dlm.demo.tokenizer import load as load_tokenizer

    tok = load_tokenizer(teacher.teacher_dir())
    for inst in tasks.instances("eval", 60, seed=0):
        prompt, full = tok.encode(inst.prompt).ids, tok.encode(inst.text).ids
        assert full[: len(prompt)] == prompt
        body = inst.prompt[len(inst.task) + 2 : -3]  # "<task>: <body> ->"
        for text in (body, inst.answer):
            assert len(tok.encode(" " + text.strip()).ids) == len(text.split()), (inst, text)


def test_shipped_teacher_reaches_its_recorded_accuracy():
    recorded = teacher.read_record()["check_set"]
    measured = teacher.measure(teacher.teacher_dir())
    assert (measured["seed"], measured["per_task"]) == (recorded["seed"], recorded["per_task"])
    one_instance = 100.0 / recorded["per_task"]  # greedy float32 decoding: at most a tie flips one answer
    for task, accuracy in recorded["accuracy"].items():
        assert measured["accuracy"][task] == pytest.approx(accuracy, abs=one_instance + 1e-9), task


def test_shipped_teacher_decodes_like_transformers():
    """Our AR sampler and transformers' greedy generate produce the same answers from the shipped files."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from efficient_dlm.demo.evaluate import task_eval
    from efficient_dlm.demo.tokenizer import load as load_tokenizer
    from efficient_dlm.port.hf_import import from_hf

    path = teacher.teacher_dir()
    items = teacher.check_set()[:: len(teacher.check_set()) // 7][:7]  # one prompt per task
    ours = task_eval(from_hf(path), load_tokenizer(path), items, strategy="ar", batch_size=len(items), max_new_tokens=32)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    expected = []
    for inst in items:
        ids = tok(inst.prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = hf.generate(ids, max_new_tokens=32, do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
        expected.append(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    assert [e["output"] for e in ours["examples"]] == expected
