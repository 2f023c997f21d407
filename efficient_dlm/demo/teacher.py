"""The shipped demo teacher: where it lives, and its recorded accuracy on a fixed held-out set.

`python -m efficient_dlm.demo.teacher --record DIR` (the last step of configs/demo_teacher.py's
recipe) decodes the fixed check set greedily with the AR sampler and writes DIR/demo_teacher.json;
tests/test_demo_teacher.py re-measures the shipped model and compares. Greedy decoding in float32
is deterministic, so the comparison is exact.
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Any

from efficient_dlm.demo import tasks
from efficient_dlm.errors import UserFileNotFoundError
from efficient_dlm.demo.evaluate import task_eval
from efficient_dlm.demo.tokenizer import load as load_tokenizer
from efficient_dlm.port.hf_config import model_config_from_hf, read_config_json
from efficient_dlm.port.hf_import import from_hf

ASSET_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "demo_teacher")
RECORD_NAME = "demo_teacher.json"
CHECK_SEED = 0
CHECK_PER_TASK = 10  # the fixed check set: 10 held-out instances per task (70 prompts)


def teacher_dir(path: str = "") -> str:
    """`path`, or the shipped teacher; FileNotFoundError naming what is missing."""
    path = path or ASSET_DIR
    if not os.path.exists(os.path.join(path, "config.json")):
        hint = " (the package was installed without its assets?)" if path == ASSET_DIR else ""
        raise UserFileNotFoundError(f"{path}: no demo teacher here (no config.json){hint}")
    return path


def check_set() -> list[tasks.Instance]:
    return tasks.instances("eval", CHECK_PER_TASK * len(tasks.TASKS), CHECK_SEED)


def measure(path: str, batch_size: int = 70) -> dict[str, Any]:
    """Greedy AR accuracy of the teacher at `path` on the fixed check set."""

    model = from_hf(teacher_dir(path))
    result = task_eval(model, load_tokenizer(path), check_set(), strategy="ar", batch_size=batch_size)
    return {"seed": CHECK_SEED, "per_task": CHECK_PER_TASK, "accuracy": result["accuracy"]}


def read_record(path: str = "") -> dict[str, Any]:
    with open(os.path.join(teacher_dir(path), RECORD_NAME)) as f:
        return json.load(f)


def record(path: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Measures the teacher and writes DIR/demo_teacher.json (recipe facts + check-set accuracy)."""

    cfg = model_config_from_hf(read_config_json(path))
    payload = {
        "recipe": "configs/demo_teacher.py",
        "architecture": {k: getattr(cfg, k) for k in ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim")},
        "check_set": measure(path),
        **(extra or {}),
    }
    with open(os.path.join(path, RECORD_NAME), "w") as f:
        json.dump(payload, f, indent=2)
    return payload


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--record", required=True, help="HF directory of the exported teacher")
    parser.add_argument("--extra", default="", help="JSON object merged into the record (e.g. training facts)")
    args = parser.parse_args(argv)
    out = record(args.record, json.loads(args.extra) if args.extra else None)
    print(json.dumps(out["check_set"]["accuracy"], indent=1))


if __name__ == "__main__":
    main()
