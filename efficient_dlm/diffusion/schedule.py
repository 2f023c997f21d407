"""Block-size schedule (LLaDA2.0 warm-up / stable / decay) as (step, block_size) pairs.

The train loop compiles one step function per block size and switches at the listed steps, so a
schedule costs one compilation per distinct size, never one per step.
"""
from __future__ import annotations

from efficient_dlm.errors import UserError


def parse_schedule(text: str, default: int | None, key: str = "diffusion.block_size_schedule") -> list[tuple[int, int]]:
    """"0:4,1000:32,5000:64" -> [(0, 4), (1000, 32), (5000, 64)]; empty text -> [(0, default)].

    `key` names the config entry in error messages (also used for opd.max_new_tokens_schedule)."""
    if not text.strip():
        return [(0, default)]
    pairs = []
    for item in text.split(","):
        step, sep, size = item.strip().partition(":")
        if not sep or not step.strip().isdigit() or not size.strip().isdigit():
            raise UserError(f"{key} item {item.strip()!r} must be step:value")
        pairs.append((int(step), int(size)))
    steps = [s for s, _ in pairs]
    if steps != sorted(set(steps)):
        raise UserError(f"{key} steps must be strictly increasing, got {steps}")
    if any(size <= 0 for _, size in pairs):
        raise UserError(f"{key} values must be positive, got {text!r}")
    if pairs[0][0] > 0:
        pairs.insert(0, (0, default))
    return pairs


def block_size_at(schedule: list[tuple[int, int]], step: int) -> int | None:
    """The block size in force at `step` (the last pair whose step is <= step)."""
    size = schedule[0][1]
    for start, value in schedule:
        if start <= step:
            size = value
    return size
