"""Writes the demo's data directory: JSONL files the training pipeline reads, plus held-out sets.

Layout of `out_dir`:
    text_train.jsonl    {"text": ...} standard-library documents (train split)
    tasks_train.jsonl   {"text": prompt + answer} generated task instances (train split)
    tasks_prompts.jsonl {"prompt": ...} the same instances' prompts (on-policy distillation rollouts)
    text_eval.jsonl     {"text": ...} held-out documents
    tasks_eval.jsonl    {"task", "prompt", "answer", "text"} held-out task instances
    chat_train.jsonl, chat_eval.jsonl   with --chat: the same tasks as chat turns (write_chat, chat SFT)
    tokenizer/          the tokenizer (trained here for the teacher, copied from the teacher otherwise)
    manifest.json       what was written and from what (Python version, seed, counts)
The pipeline adds EOS after every document, so a task document teaches "prompt -> answer<eos>".
Files are written atomically (temporary name, then rename), so an interrupted run never leaves a
half-written file that a later run would take as complete.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
from typing import Any, Iterable

from efficient_dlm.demo import corpus, tasks
from efficient_dlm.demo import tokenizer as demo_tokenizer
from efficient_dlm.errors import UserError, UserFileNotFoundError

TOKENIZER_SUBDIR = "tokenizer"
MANIFEST = "manifest.json"


def write_jsonl(path: str, rows: Iterable[dict[str, Any]]) -> int:
    tmp = path + ".tmp"
    count = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    os.replace(tmp, path)
    return count


def read_jsonl(path: str) -> list[dict[str, Any]]:
    if not os.path.exists(path):
        raise UserFileNotFoundError(f"{path}: missing (write it with `edlm demo-data`)")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def eval_tasks(path: str) -> list[tasks.Instance]:
    """The held-out task instances of a data directory's tasks_eval.jsonl."""
    return [tasks.Instance(r["task"], r["prompt"], r["answer"]) for r in read_jsonl(path)]


def write(
    out_dir: str,
    *,
    seed: int = 0,
    train_tasks: int = 200_000,
    eval_tasks_per_task: int = 100,
    task_names: Iterable[str] = tuple(tasks.TASKS),
    tokenizer_dir: str | None = None,
    vocab_size: int = 3072,
) -> dict[str, Any]:
    """Writes every file of the layout above and returns the manifest.

    tokenizer_dir: copy this tokenizer (e.g. the shipped teacher's); None trains a new BPE on the
    train split (the teacher recipe).
    """
    names = tasks.check_tasks(task_names)
    if train_tasks < 1 or eval_tasks_per_task < 1:
        raise UserError(f"train_tasks and eval_tasks_per_task must be positive, got {train_tasks}, {eval_tasks_per_task}")
    os.makedirs(out_dir, exist_ok=True)
    text_train = corpus.documents("train")
    text_eval = corpus.documents("eval")
    train_items = tasks.instances("train", train_tasks, seed, names)
    eval_items = tasks.instances("eval", eval_tasks_per_task * len(names), seed, names)
    counts = {
        "text_train.jsonl": write_jsonl(os.path.join(out_dir, "text_train.jsonl"), ({"text": d} for d in text_train)),
        "text_eval.jsonl": write_jsonl(os.path.join(out_dir, "text_eval.jsonl"), ({"text": d} for d in text_eval)),
        "tasks_train.jsonl": write_jsonl(os.path.join(out_dir, "tasks_train.jsonl"), ({"text": i.text} for i in train_items)),
        "tasks_prompts.jsonl": write_jsonl(os.path.join(out_dir, "tasks_prompts.jsonl"), ({"prompt": i.prompt} for i in train_items)),
        "tasks_eval.jsonl": write_jsonl(
            os.path.join(out_dir, "tasks_eval.jsonl"),
            ({"task": i.task, "prompt": i.prompt, "answer": i.answer, "text": i.text} for i in eval_items),
        ),
    }
    tok_out = os.path.join(out_dir, TOKENIZER_SUBDIR)
    if tokenizer_dir:
        _copy_tokenizer(tokenizer_dir, tok_out)
        tokenizer_source = os.path.abspath(tokenizer_dir)
    else:
        tok = demo_tokenizer.train_tokenizer(text_train + [i.text for i in train_items], vocab_size)
        demo_tokenizer.save_hf(tok, tok_out)
        tokenizer_source = f"trained here (vocab {vocab_size})"
    manifest = {
        "python": platform.python_version(),
        "stdlib": corpus.stdlib_dir(),
        "seed": seed,
        "tasks": names,
        "counts": counts,
        "tokenizer": tokenizer_source,
    }
    with open(os.path.join(out_dir, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=2)
    return manifest


CHAT_TRAIN, CHAT_EVAL = "chat_train.jsonl", "chat_eval.jsonl"


def write_chat(out_dir: str, *, seed: int = 0, train_tasks: int = 200_000, eval_tasks_per_task: int = 100,
               task_names: Iterable[str] = tuple(tasks.TASKS)) -> dict[str, int]:
    """The task instances as chat turns for `data.format=chat` (configs/demo_sft.py), the same instances
    as tasks_train.jsonl / tasks_eval.jsonl:
        chat_train.jsonl  {"prompt": task prompt, "response": answer} (the user turn and the reply)
        chat_eval.jsonl   {"task", "prompt", "answer"} held out (`edlm sample --chat --prompts_jsonl` reads
                          "prompt" and reports exact matches against "answer")
    The answer keeps its leading space: the reply's tokens are the ones the teacher learned after "->"."""
    names = tasks.check_tasks(task_names)
    os.makedirs(out_dir, exist_ok=True)
    train_items = tasks.instances("train", train_tasks, seed, names)
    eval_items = tasks.instances("eval", eval_tasks_per_task * len(names), seed, names)
    return {
        CHAT_TRAIN: write_jsonl(os.path.join(out_dir, CHAT_TRAIN), ({"prompt": i.prompt, "response": i.answer} for i in train_items)),
        CHAT_EVAL: write_jsonl(os.path.join(out_dir, CHAT_EVAL),
                               ({"task": i.task, "prompt": i.prompt, "answer": i.answer} for i in eval_items)),
    }


def _copy_tokenizer(src: str, dst: str) -> None:
    if not os.path.exists(os.path.join(src, "tokenizer.json")):
        raise UserFileNotFoundError(f"{src}: no tokenizer.json to copy")
    os.makedirs(dst, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if os.path.exists(os.path.join(src, name)):
            shutil.copy2(os.path.join(src, name), os.path.join(dst, name))
