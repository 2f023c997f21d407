"""The demo's data: standard-library corpus, generated tasks, BPE tokenizer, JSONL writers."""
from __future__ import annotations

import json
import os
import random
import re

import pytest

from efficient_dlm.demo import corpus, data, tasks
from efficient_dlm.demo import tokenizer as demo_tokenizer


def _solve(inst: tasks.Instance) -> str:
    """An independent solver reading only the prompt text."""
    body = inst.prompt[len(inst.task) + 2 : -3]
    items = body.split()
    if inst.task in ("add", "sub"):  # interleaved operands, least-significant digit first; digit + carry pairs
        digits = [int(x) for x in items]
        a = sum(d * 10**j for j, d in enumerate(digits[0::2]))
        b = sum(d * 10**j for j, d in enumerate(digits[1::2]))
        n = len(digits) // 2
        if inst.task == "add":
            value, carry = a + b, [int(a % 10 ** (j + 1) + b % 10 ** (j + 1) >= 10 ** (j + 1)) for j in range(n)]
        else:
            value, carry = a - b, [int(a % 10 ** (j + 1) < b % 10 ** (j + 1)) for j in range(n)]
        assert value >= 0
        return " ".join(f"{value // 10**j % 10} {carry[j]}" for j in range(n))
    if inst.task == "reverse":
        return " ".join(items[::-1])
    if inst.task == "upper":
        return " ".join(s.upper() for s in items)
    if inst.task == "shift":
        return " ".join("abcdefghijklmnopqrstuvwxyz"[("abcdefghijklmnopqrstuvwxyz".index(s) + 1) % 26] for s in items)
    if inst.task == "sort":
        return " ".join(sorted(items))
    raise AssertionError(inst.task)


def test_task_answers_match_an_independent_solver_and_splits_are_disjoint():
    train = tasks.instances("train", 3000, seed=0)
    held = tasks.instances("eval", 700, seed=0)
    for inst in train[:700] + held:
        assert inst.prompt.startswith(inst.task + ": ") and inst.prompt.endswith(" ->")
        assert inst.answer.startswith(" ") and _solve(inst) == inst.answer.strip()
    assert not {i.prompt for i in train} & {i.prompt for i in held}
    assert {i.task for i in held} == set(tasks.TASKS)
    # Issue #19: every answer is long enough for parallel decoding to pay.
    assert min(len(i.answer.split()) for i in train + held) >= 16
    # Deterministic in the seed, different across seeds.
    assert tasks.instances("eval", 50, seed=0) == held[:50]
    assert tasks.instances("eval", 50, seed=1) != held[:50]


def test_scorer_and_bad_task_names():
    items = [tasks.Instance("add", "add: 1 + 2 ->", " 3"), tasks.Instance("sort", "sort: 2 1 ->", " 1 2")]
    assert tasks.accuracy([" 3 ", "2 1"], items) == {"add": 100.0, "sort": 0.0, "all": 50.0}
    assert not tasks.exact_match("31", " 3")
    with pytest.raises(ValueError, match="unknown task.*multiply"):
        tasks.instances("train", 5, 0, ["add", "multiply"])
    with pytest.raises(ValueError, match="number of predictions|predictions for"):
        tasks.accuracy(["3"], items)


def test_corpus_is_deterministic_split_by_source_name_and_chunked():
    names = [n for n, _ in corpus.sources()]
    assert names == sorted(n for n in names if n.startswith("Lib/")) + sorted(n for n in names if n.startswith("docs/"))
    held = [n for n in names if corpus.is_held_out(n)]
    assert 0 < len(held) < len(names) / 5
    train, evals = corpus.documents("train"), corpus.documents("eval")
    assert train == corpus.documents("train") and train and evals
    assert max(map(len, train + evals)) <= corpus.MAX_CHARS
    # Chunking keeps every non-blank character of a source, in order.
    name, text = next((n, t) for n, t in corpus.sources() if n == "Lib/bisect.py")
    squash = lambda s: re.sub(r"\s+", "", s)
    assert squash("".join(corpus.chunk_text(text, 300))) == squash(text)
    assert max(map(len, corpus.chunk_text("x" * 1000 + "\n" + "y" * 10, 300))) <= 300
    with pytest.raises(ValueError, match="unknown corpus split"):
        corpus.documents("test")


def test_tokenizer_round_trips_in_transformers_and_prompts_are_prefixes(tmp_path):
    from transformers import AutoTokenizer

    rng = random.Random(0)
    texts = rng.sample(corpus.documents("train"), 300) + [i.text for i in tasks.instances("train", 2000, 0)]
    tok = demo_tokenizer.train_tokenizer(texts, vocab_size=600)
    demo_tokenizer.save_hf(tok, str(tmp_path))
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    assert (hf.eos_token_id, hf.pad_token_id, hf.mask_token_id) == (demo_tokenizer.EOS_ID, demo_tokenizer.EOS_ID, demo_tokenizer.MASK_ID)
    for inst in tasks.instances("eval", 70, 0):
        full, prompt = tok.encode(inst.text).ids, tok.encode(inst.prompt).ids
        assert full[: len(prompt)] == prompt
        assert hf(inst.text).input_ids == full
        assert tok.decode(full[len(prompt):]) == inst.answer
        if inst.task in ("add", "sub", "sort"):  # one token per digit, its space included
            assert len(full) - len(prompt) == len(inst.answer.replace(" ", "")), inst
    assert tok.encode("12345").tokens == list("12345")
    assert tok.encode("x 12").tokens == ["x", "\u0120" + "1", "2"]  # a digit keeps its leading space
    with pytest.raises(ValueError, match="vocab_size"):
        demo_tokenizer.train_tokenizer(texts, vocab_size=100)


def test_data_writer_layout(tmp_path):
    tok_dir = tmp_path / "tok"
    rng = random.Random(0)
    tok = demo_tokenizer.train_tokenizer(rng.sample(corpus.documents("train"), 50), vocab_size=520)
    demo_tokenizer.save_hf(tok, str(tok_dir))
    out = tmp_path / "data"
    manifest = data.write(str(out), seed=3, train_tasks=140, eval_tasks_per_task=2, tokenizer_dir=str(tok_dir))
    assert manifest["counts"]["tasks_train.jsonl"] == 140 and manifest["counts"]["tasks_eval.jsonl"] == 2 * len(tasks.TASKS)
    held = data.eval_tasks(str(out / "tasks_eval.jsonl"))
    assert held == tasks.instances("eval", 2 * len(tasks.TASKS), 3)
    first = json.loads((out / "tasks_train.jsonl").read_text().splitlines()[0])
    assert first == {"text": tasks.instances("train", 1, 3)[0].text}
    prompts = [r["prompt"] for r in data.read_jsonl(str(out / "tasks_prompts.jsonl"))]  # OPD rollouts' prompts
    assert prompts == [i.prompt for i in tasks.instances("train", 140, 3)]
    assert len(data.read_jsonl(str(out / "text_eval.jsonl"))) == len(corpus.documents("eval"))
    assert (out / "tokenizer" / "tokenizer.json").read_bytes() == (tok_dir / "tokenizer.json").read_bytes()
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        data.write(str(tmp_path / "x"), train_tasks=1, eval_tasks_per_task=1, tokenizer_dir=str(tmp_path))
