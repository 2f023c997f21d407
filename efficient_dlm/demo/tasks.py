"""Exact-match tasks generated from a seed: copies with a transformation, reversing, sorting, and
addition and subtraction with explicit carries.

Every instance is one document "<task>: <input> -><answer>" followed by EOS (the data pipeline adds
EOS between documents). The answer starts with a space so that the prompt "<task>: <input> ->"
tokenizes to a prefix of the full document. Symbols are separated by spaces (and the tokenizer
splits digits), so each symbol is one token.

What the tasks are for (issue #19): an answer must be long enough for parallel decoding to pay
(every answer here is 16 or 20 tokens plus EOS; the first demo's averaged 6.5, which capped tokens
per forward near 2.7 at block 4), and the teacher must solve every task reliably, or the task says
nothing about the conversion. Two kinds:
- copies with a transformation (upper, shift) and reverse: each answer token is a function of one
  input token. Lists have a fixed length of 20: with 16-24 symbols drawn with replacement, the
  source of an output token is at an offset that depends on the list's length and repeated symbols
  defeat a content lookup, and a 4-layer teacher had learned none of the three after 2,000 steps
  (4M tokens) while it already solved half of the sums;
- computation over the input: sort (each output depends on counts over the whole list) and
  add / sub with carries. The teachers of sessions 1-4 never learned multi-digit sums (the carry
  into digit j needs digits j-1 of both operands and the carry before: a two-hop dependency a
  2M-parameter, 4-layer model missed at 3 digits, 0-18%). Here the operands are interleaved
  least-significant digit first ("a0 b0 a1 b1 ...") and the answer writes each digit with its carry
  ("s0 c0 s1 c1 ..."), the scratchpad of Nye et al. (2021) / Lee et al. (2023): every answer token
  is a fixed offset away from the tokens it depends on, so the carry chain is computed token by
  token. For a block-diffusion model that chain is real sequential work inside a block, unlike the
  copies, which is what makes it a test of parallel decoding.

The teacher (configs/demo_teacher.py) trains on all six; its record (assets/demo_teacher/
demo_teacher.json) has 100% on add, sub, upper, shift and sort and 0% on reverse of 20
distinct symbols (it gets the first token, then loses its place: the content lookup an induction
head would do never formed in 4,500 steps). The demo evaluates the five it solves (demo.tasks).
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


LIST_LEN = 20  # symbols per list task (fixed: see the module docstring)
DIGITS = 8  # operand digits of add / sub: answers of 2 x 8 = 16 tokens


def digits_lsd_first(n: int, width: int) -> list[int]:
    """`n`'s decimal digits, zero-padded to `width`, least-significant first: 47, 3 -> [7, 4, 0]."""
    return [int(c) for c in f"{n:0{width}d}"[::-1]]


def _interleaved(a: int, b: int) -> str:
    return " ".join(f"{x} {y}" for x, y in zip(digits_lsd_first(a, DIGITS), digits_lsd_first(b, DIGITS)))


def _with_carries(a: int, b: int, sign: int) -> str:
    """Digit j of a + b (sign 1) or a - b (sign -1, a >= b), each followed by its carry / borrow."""
    out, carry = [], 0
    for x, y in zip(digits_lsd_first(a, DIGITS), digits_lsd_first(b, DIGITS)):
        v = x + sign * y + sign * carry
        carry = int(v >= 10) if sign > 0 else int(v < 0)
        out += [v % 10, carry]
    return " ".join(map(str, out))


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randrange(10**DIGITS), rng.randrange(10**DIGITS)
    return _interleaved(a, b), _with_carries(a, b, 1)


def _sub(rng: random.Random) -> tuple[str, str]:
    a, b = sorted((rng.randrange(10**DIGITS), rng.randrange(10**DIGITS)), reverse=True)
    return _interleaved(a, b), _with_carries(a, b, -1)


def _reverse(rng: random.Random) -> tuple[str, str]:
    items = _distinct(rng, LIST_LEN, LIST_LEN)
    return " ".join(items), " ".join(reversed(items))


def _upper(rng: random.Random) -> tuple[str, str]:
    items = _symbols(rng, LIST_LEN, LIST_LEN, string.ascii_lowercase)
    return " ".join(items), " ".join(s.upper() for s in items)


def _shift(rng: random.Random) -> tuple[str, str]:
    items = _symbols(rng, LIST_LEN, LIST_LEN, string.ascii_lowercase)
    shifted = [chr((ord(s) - 97 + 1) % 26 + 97) for s in items]
    return " ".join(items), " ".join(shifted)


def _sort(rng: random.Random) -> tuple[str, str]:
    items = _symbols(rng, LIST_LEN, LIST_LEN, string.digits)
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
