"""Exact-match tasks generated from a seed: arithmetic, copying with a transformation, reversing, sorting.

Every instance is one document "<task>: <input> -><answer>" followed by EOS (the data pipeline adds
EOS between documents). The answer starts with a space so that the prompt "<task>: <input> ->"
tokenizes to a prefix of the full document. Symbols are separated by spaces (and the tokenizer
splits digits), so each symbol is one token: a few-million-parameter model learns the tasks in CPU
minutes, and answers whose tokens are locally predictable (copy, reverse, sort) are what
lets a block-diffusion model commit several tokens per forward pass.

The formats are chosen for what a 2M-parameter, 4-layer teacher can learn within its recipe's 8M
tokens, because a task the teacher fails says nothing about the conversion (both models
sit near 0%, and the dLM, unsure of a wrong answer, decodes it one token per forward). What the
first teachers showed (docs/BENCHMARKS.md, demo section): tasks solved by relative-position
attention (copy with a transformation, reverse, sort) are learned; lookups by content that need an
induction head (key-value recall: 1-14%; the units digit of a sum of variable-length numbers: 9%,
i.e. chance) are not. So numbers are written least-significant digit first and zero-padded to a
fixed width: digit j of a sum or difference sits at a fixed offset from digits j of its operands,
the order in which carries and borrows propagate (Lee et al., 2023, "Teaching Arithmetic to Small
Transformers"); the shipped teacher still gets only 18% / 13% of sums / differences right (the tens
digit, which needs the units' carry, is what it misses). Key-value recall was dropped. Reverse draws
distinct symbols.
"""
from __future__ import annotations

import dataclasses
import hashlib
import random
import string
from typing import Callable, Iterable

from efficient_dlm.errors import UserError

HELD_OUT_ONE_IN = 10
SYMBOLS = string.ascii_lowercase + string.digits


@dataclasses.dataclass(frozen=True)
class Instance:
    task: str
    prompt: str
    answer: str

    @property
    def text(self) -> str:
        return self.prompt + self.answer


def _symbols(rng: random.Random, lo: int, hi: int, alphabet: str = SYMBOLS) -> list[str]:
    return [rng.choice(alphabet) for _ in range(rng.randint(lo, hi))]


def _distinct(rng: random.Random, lo: int, hi: int, alphabet: str = SYMBOLS) -> list[str]:
    return rng.sample(alphabet, rng.randint(lo, hi))


def lsd_first(n: int, width: int) -> str:
    """`n` in decimal, zero-padded to `width` digits, least-significant digit first: 47 -> "740"."""
    return f"{n:0{width}d}"[::-1]


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 999), rng.randint(0, 999)
    return f"{lsd_first(a, 3)} + {lsd_first(b, 3)}", lsd_first(a + b, 4)


def _sub(rng: random.Random) -> tuple[str, str]:
    a, b = sorted((rng.randint(0, 999), rng.randint(0, 999)), reverse=True)
    return f"{lsd_first(a, 3)} - {lsd_first(b, 3)}", lsd_first(a - b, 3)


def _reverse(rng: random.Random) -> tuple[str, str]:
    items = _distinct(rng, 3, 8)
    return " ".join(items), " ".join(reversed(items))


def _upper(rng: random.Random) -> tuple[str, str]:
    items = _symbols(rng, 3, 8, string.ascii_lowercase)
    return " ".join(items), " ".join(s.upper() for s in items)


def _shift(rng: random.Random) -> tuple[str, str]:
    items = _symbols(rng, 3, 8, string.ascii_lowercase)
    shifted = [chr((ord(s) - 97 + 1) % 26 + 97) for s in items]
    return " ".join(items), " ".join(shifted)


def _sort(rng: random.Random) -> tuple[str, str]:
    items = _symbols(rng, 3, 8, string.digits)
    return " ".join(items), " ".join(sorted(items))


TASKS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "add": _add,
    "sub": _sub,
    "reverse": _reverse,
    "upper": _upper,
    "shift": _shift,
    "sort": _sort,
}


def make_instance(task: str, rng: random.Random) -> Instance:
    inputs, answer = TASKS[task](rng)
    return Instance(task, f"{task}: {inputs} ->", f" {answer}")


def is_held_out(prompt: str) -> bool:
    digest = hashlib.sha256(prompt.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") % HELD_OUT_ONE_IN == 0


def check_tasks(names: Iterable[str]) -> list[str]:
    names = list(names)
    unknown = [n for n in names if n not in TASKS]
    if unknown or not names:
        raise UserError(f"unknown task(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(TASKS)}")
    return names


def instances(split: str, count: int, seed: int, tasks: Iterable[str] = tuple(TASKS)) -> list[Instance]:
    """`count` instances of the split, round-robin over tasks, deterministic in (split, seed, tasks)."""
    if split not in ("train", "eval"):
        raise UserError(f"unknown task split {split!r}; choose train or eval")
    names = check_tasks(tasks)
    rng = random.Random(f"{split}:{seed}")
    want_held_out = split == "eval"
    out = []
    while len(out) < count:
        inst = make_instance(names[len(out) % len(names)], rng)
        if is_held_out(inst.prompt) == want_held_out:
            out.append(inst)
    return out


def exact_match(prediction: str, answer: str) -> bool:
    """The scorer: the generated text up to EOS equals the answer, ignoring surrounding whitespace."""
    return prediction.strip() == answer.strip()


def accuracy(predictions: list[str], items: list[Instance]) -> dict[str, float]:
    """Exact-match accuracy in percent, overall ("all") and per task."""
    if len(predictions) != len(items):
        raise UserError(f"{len(predictions)} predictions for {len(items)} instances")
    hits: dict[str, list[bool]] = {}
    for pred, inst in zip(predictions, items):
        hits.setdefault(inst.task, []).append(exact_match(pred, inst.answer))
    out = {task: 100.0 * sum(h) / len(h) for task, h in hits.items()}
    out["all"] = 100.0 * sum(sum(h) for h in hits.values()) / max(1, len(items))
    return out
