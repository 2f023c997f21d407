"""Where each serving slot's prompt and blocks live in its own cache region, and the per-call inputs.

A slot's region has the sampler's layout (sample/layout.py), one row at a time: the prompt's n full
blocks are right-aligned to end at slot D0 (the prompt capacity in whole blocks), its r = p mod B
remaining tokens open decoded block 0, and decoded block k (position n B + k B + t) sits at slot
D0 + k B + t, so cached positions are slot - start as the cache requires. Unlike the sampler, rows are
at different blocks, so every row has its own write slots and cache length; the host (this module)
computes them, the program (step_program.py) only follows them.

The AR slots use the AR sampler's layout: the prompt right-aligned to end at A (the prompt capacity),
generated token t written at A + t once it is fed back.

Chunk widths are bucketed (powers of two of blocks, as the sampler's prompt buckets) so a call that
admits requests compiles once per bucket, and steady-state calls (2B, AR: 1) never recompile.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from efficient_dlm.sample.layout import bucket
from efficient_dlm.sample.program import MAX_STOP_TOKENS


@dataclasses.dataclass
class SlotState:
    """One request's progress in a slot (host side)."""

    request: object  # engine.Request
    prompt: np.ndarray  # int32 token ids
    max_new: int
    block: int = 0  # dLM: next block to decode; AR: tokens generated so far
    forwards: int = 0  # forward passes this request took part in (its RNG step, as in a solo generate)
    clean: np.ndarray | None = None  # dLM: the last decoded block (B tokens), the next call's clean context
    generated: list[int] = dataclasses.field(default_factory=list)
    done: bool = False


@dataclasses.dataclass(frozen=True)
class SlotGeometry:
    """Static sizes of the slot batch: every program input's shape follows from these and the chunk width."""

    kind: str  # "diffusion" | "ar"
    slots: int
    block_size: int  # AR: 1
    max_prompt_tokens: int
    max_new_tokens: int
    mask_id: int
    pad_id: int

    @property
    def prefix_len(self) -> int:
        """D0 (dLM: whole blocks, at least one) or A (AR): the cache slots before the generated tokens."""
        if self.kind == "ar":
            return self.max_prompt_tokens
        return max(1, self.max_prompt_tokens // self.block_size) * self.block_size

    @property
    def cache_size(self) -> int:
        if self.kind == "ar":
            return self.max_prompt_tokens + self.max_new_tokens - 1
        blocks = -(-(self.block_size - 1 + self.max_new_tokens) // self.block_size)
        return self.prefix_len + (blocks - 1) * self.block_size

    @property
    def pad_position(self) -> int:
        """Beyond every real position: padding is invisible to real queries under causal and block masks."""
        return self.cache_size + 2 * self.block_size + self.max_prompt_tokens

    def chunk_width(self, admitting: list[SlotState]) -> int:
        """dLM: 2B, or (prompt bucket in blocks) + B when some slot is admitted; AR: 1 or the prompt bucket."""
        if self.kind == "ar":
            if not admitting:
                return 1
            return min(bucket(max(len(s.prompt) for s in admitting), 16), self.max_prompt_tokens)
        size = self.block_size
        if not admitting:
            return 2 * size
        blocks = max(max(len(s.prompt) // size for s in admitting), 1)
        return (min(bucket(blocks), self.prefix_len // size) + 1) * size


def chunk_widths(geo: SlotGeometry) -> list[int]:
    """Every chunk width a call can have (the programs compiled by `Engine.warmup`)."""
    if geo.kind == "ar":
        caps = {min(bucket(p, 16), geo.max_prompt_tokens) for p in range(1, geo.max_prompt_tokens + 1)}
        return [1, *sorted(caps)]
    size, blocks = geo.block_size, geo.prefix_len // geo.block_size
    return [2 * size, *sorted({(min(bucket(n), blocks) + 1) * size for n in range(1, blocks + 1)})]


def empty_inputs(geo: SlotGeometry, width: int) -> dict[str, np.ndarray]:
    s, size = geo.slots, geo.block_size
    clean = width - size if geo.kind == "diffusion" else width
    return {
        "tokens": np.full((s, width), geo.pad_id, np.int32),
        "positions": np.full((s, width), geo.pad_position, np.int32),
        "write_slot": np.full((s, clean), geo.cache_size, np.int32),  # out of range: not written
        "start": np.zeros((s,), np.int32), "length": np.zeros((s,), np.int32),
        "length_after": np.zeros((s,), np.int32), "open": np.zeros((s, size), bool),
        "rope_length": np.ones((s,), np.int32),
    }


def _fill_diffusion(geo: SlotGeometry, inputs: dict, row: int, slot: SlotState) -> None:
    size, d0, width = geo.block_size, geo.prefix_len, inputs["tokens"].shape[1]
    p = len(slot.prompt)
    n, r = p // size, p % size
    k = slot.block
    base = n * size  # position of decoded block 0
    tokens, positions, write = inputs["tokens"][row], inputs["positions"][row], inputs["write_slot"][row]
    if k == 0:  # admission: the prompt's full blocks ride along in the block's first step
        whole = n * size
        if whole:
            tokens[width - size - whole : width - size] = slot.prompt[:whole]
            positions[width - size - whole : width - size] = np.arange(whole)
            write[width - size - whole :] = d0 - whole + np.arange(whole)
        block = np.full((size,), geo.mask_id, np.int32)
        block[:r] = slot.prompt[whole:]
        inputs["length"][row] = 0
    else:
        tokens[width - 2 * size : width - size] = slot.clean
        positions[width - 2 * size : width - size] = base + (k - 1) * size + np.arange(size)
        write[width - 2 * size :] = d0 + (k - 1) * size + np.arange(size)
        block = np.full((size,), geo.mask_id, np.int32)
        inputs["length"][row] = d0 + (k - 1) * size
    tokens[-size:] = block
    positions[-size:] = base + k * size + np.arange(size)
    inputs["start"][row] = d0 - n * size
    inputs["length_after"][row] = d0 + k * size
    index = k * size + np.arange(size) - r  # generated-token index of each block position
    inputs["open"][row] = (index >= 0) & (index < slot.max_new)
    inputs["rope_length"][row] = p + slot.max_new


def _fill_ar(geo: SlotGeometry, inputs: dict, row: int, slot: SlotState) -> None:
    a, width = geo.prefix_len, inputs["tokens"].shape[1]
    p, t = len(slot.prompt), slot.block
    tokens, positions, write = inputs["tokens"][row], inputs["positions"][row], inputs["write_slot"][row]
    if t == 0:
        tokens[width - p :] = slot.prompt
        positions[width - p :] = np.arange(p)
        write[width - p :] = a - p + np.arange(p)
        inputs["length"][row], inputs["length_after"][row] = 0, a
    else:
        tokens[-1], positions[-1], write[-1] = slot.generated[-1], p + t - 1, a + t - 1
        inputs["length"][row], inputs["length_after"][row] = a + t - 1, a + t
    inputs["start"][row] = a - p
    inputs["open"][row] = True
    inputs["rope_length"][row] = p + slot.max_new


def build_inputs(geo: SlotGeometry, slots: list[SlotState | None]) -> dict[str, np.ndarray]:
    """The program inputs for one call over all slots (None: an empty slot, which computes padding)."""
    admitting = [s for s in slots if s is not None and s.block == 0]
    inputs = empty_inputs(geo, geo.chunk_width(admitting))
    fill = _fill_ar if geo.kind == "ar" else _fill_diffusion
    for row, slot in enumerate(slots):
        if slot is not None:
            fill(geo, inputs, row, slot)
    return inputs


def build_knobs(slots: list[SlotState | None], defaults: dict) -> dict[str, np.ndarray]:
    """Per-row decoding knobs: each request's own (threshold, temperature, seed, stop ids, RNG step)."""
    n = len(slots)
    settings = [defaults if s is None else s.request.settings for s in slots]
    column = lambda name, dtype: np.array([st[name] for st in settings], dtype)  # noqa: E731
    stop = np.full((MAX_STOP_TOKENS, n, 1), -1, np.int32)
    for row, st in enumerate(settings):
        ids = list(st["stop_ids"])[:MAX_STOP_TOKENS]
        stop[: len(ids), row, 0] = ids
    return {
        "threshold": column("threshold", np.float32)[:, None], "factor": column("factor", np.float32)[:, None],
        "entropy_bound": column("entropy_bound", np.float32)[:, None],
        "temperature": column("temperature", np.float32), "top_p": column("top_p", np.float32),
        "seed": column("seed", np.uint32), "stop_ids": stop,
        "forwards": np.array([0 if s is None else s.forwards for s in slots], np.int32),
    }


def committed(block: np.ndarray, step: np.ndarray, stop_ids) -> tuple[list[int], bool]:
    """The tokens a call committed in a row (in order), cut after the first stop token; and whether it stopped."""
    out = []
    for token in block[step >= 0].tolist():
        out.append(token)
        if token in stop_ids:
            return out, True
    return out, False
