"""Dataset loader and scorer of the shipped demo tasks (lm-eval resolves `!function utils.x` here).

demo_eval.jsonl holds the demo's default held-out set, `efficient_dlm.demo.tasks.instances("eval",
1000, seed=0, tasks=<demo.tasks>)` (200 per task, the order `edlm demo` evaluates them in); tests
check it is exactly that.
`data_file` (in --metadata or the YAML's dataset_kwargs) points a task at another file of the same
format, e.g. a run's data/tasks_eval.jsonl. Nothing is downloaded.
"""
from __future__ import annotations

import json
import os

import datasets

from efficient_dlm.demo import tasks

HERE = os.path.dirname(os.path.abspath(__file__))
DEMO_FILE = os.path.join(HERE, "demo_eval.jsonl")


def read_rows(path: str, task: str | None = None) -> list[dict]:
    """{"task", "prompt", "answer"} records of a JSONL file, optionally of one task only."""
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    rows = [{"task": r["task"], "prompt": r["prompt"], "answer": r["answer"], "text": r["prompt"] + r["answer"]}
            for r in rows if task is None or r["task"] == task]
    if not rows:
        raise ValueError(f"{path}: no task instances" + (f" of task {task!r}" if task else ""))
    return rows


def load_demo(task: str | None = None, data_file: str | None = None, **_metadata) -> datasets.DatasetDict:
    """The held-out demo instances as a one-split ("test") dataset; lm-eval passes metadata too."""
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(read_rows(data_file or DEMO_FILE, task))})


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """The demo's own scorer (efficient_dlm.demo.tasks.exact_match): whitespace-stripped equality."""
    return {"exact_match": float(tasks.exact_match(results[0], doc["answer"]))}
