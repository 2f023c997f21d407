"""Where prompts and decoded blocks live in the static-shape KV cache (host-side preparation).

Block diffusion decodes blocks aligned to positions, exactly as in training: the block of position i
is i // B, and positions start at 0 at each row's first real token. With ragged prompts, row b has
n_b = p_b // B full prompt blocks and r_b = p_b % B prompt tokens that sit inside its first decoded
block (docs/METHOD.md section 6: "a block starts all [MASK]; prompt tokens inside it stay").

Each row's full prompt blocks are right-aligned to end at slot D0 = K * B (K = bucketed max n_b, at
least 1), so
decoded block k of every row occupies the same slots [D0 + kB, D0 + (k+1)B): one cache-write offset
serves the whole batch, and a row's left padding (slots below shift_b = D0 - n_b * B, a multiple of B)
is excluded through `KVCache.start`. Padding inside a chunk the model reads (the prompt prefill) gets
a position beyond every real one, so causal and block-causal visibility both hide it.

The AR baseline uses the plain layout: prompts left-padded to a bucket P, generated tokens at P + t.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from efficient_dlm.errors import UserError
from efficient_dlm.models.token_ids import check_token_ids


def bucket(n: int, minimum: int = 1) -> int:
    """0 for 0, else the smallest power of two >= max(n, minimum): few shapes, few compilations."""
    if n <= 0:
        return 0
    return 1 << (max(n, minimum) - 1).bit_length()


def check_prompts(prompts: Sequence[Sequence[int]], vocab_size: int) -> list[np.ndarray]:
    """Token-id arrays of the prompts; rejects an empty batch, empty prompts and ids outside the vocabulary."""
    if len(prompts) == 0:
        raise UserError("prompts is empty: give at least one prompt (a list of token ids)")
    rows = []
    for i, prompt in enumerate(prompts):
        row = check_token_ids(prompt, None, f"prompt {i}").reshape(-1)
        if row.size == 0:
            raise UserError(f"prompt {i} is empty; every prompt needs at least one token")
        bad = row[(row < 0) | (row >= vocab_size)]
        if bad.size:
            raise UserError(f"prompt {i} holds token id {int(bad[0])} outside the vocabulary (size {vocab_size})")
        rows.append(row.astype(np.int32))
    return rows


def _check_capacity(lengths: np.ndarray, capacity: int | None) -> None:
    if capacity is None:
        return
    if capacity < 1:
        raise UserError(f"prompt_bucket must be a positive number of tokens, got {capacity}")
    longest = int(np.argmax(lengths))
    if lengths[longest] > capacity:
        raise UserError(
            f"prompt {longest} has {int(lengths[longest])} tokens, longer than the cache's prompt capacity "
            f"prompt_bucket={capacity}"
        )


def position_limit(cfg) -> int | None:
    """The longest sequence a generation may reach: max_position_embeddings, except for dynamic RoPE,
    which rescales itself beyond it (that is what it is for; models/rope.py)."""
    return None if cfg.rope_type == "dynamic" else cfg.max_position_embeddings


def _check_positions(total: int, max_positions: int | None) -> None:
    if max_positions is not None and total > max_positions:
        raise UserError(
            f"prompt plus max_new_tokens needs positions up to {total}, beyond the model's "
            f"max_position_embeddings={max_positions}"
        )


@dataclasses.dataclass(frozen=True)
class BlockLayout:
    """Arrays the block-diffusion program reads; shapes depend only on (batch, K, B, blocks)."""

    prefix: np.ndarray  # [batch, D0] full prompt blocks right-aligned at D0, pad below
    prefix_positions: np.ndarray  # [batch, D0] positions; pad slots hold `pad_position`
    first_block: np.ndarray  # [batch, B] the r_b prompt tokens of block 0, then [MASK]
    shift: np.ndarray  # [batch] first valid cache slot (left padding), a multiple of B
    remainder: np.ndarray  # [batch] r_b: prompt tokens inside block 0
    prompt_lengths: np.ndarray  # [batch]
    block_size: int
    num_blocks: int  # blocks the program may decode (static bound)
    pad_position: int

    @property
    def prefix_len(self) -> int:
        return self.prefix.shape[1]

    @property
    def cache_size(self) -> int:
        """Slots for the prompt prefix and every block but the last (the last is never read back)."""
        return self.prefix_len + (self.num_blocks - 1) * self.block_size

    def arrays(self) -> dict[str, np.ndarray]:
        names = ("prefix", "prefix_positions", "first_block", "shift", "remainder")
        return {name: getattr(self, name) for name in names}


def block_layout(
    prompts: list[np.ndarray],
    *,
    block_size: int,
    max_new_tokens: int,
    mask_id: int,
    pad_id: int,
    max_positions: int | None,
    capacity: int | None = None,
) -> BlockLayout:
    """Places ragged prompts for block-diffusion decoding (see the module docstring)."""
    lengths = np.array([len(p) for p in prompts], dtype=np.int32)
    _check_capacity(lengths, capacity)
    full_blocks = lengths // block_size
    remainder = lengths % block_size
    # At least one prefix block: block k's first step reads "the previous clean block", which for
    # block 0 is the prompt's last full block (or padding when the prompt is shorter than B).
    k = max(1, (capacity // block_size) if capacity is not None else bucket(int(full_blocks.max())))
    prefix_len = k * block_size
    # Row b needs ceil((r_b + max_new) / B) blocks; the static bound covers every r_b < B.
    num_blocks = -(-(block_size - 1 + max_new_tokens) // block_size)
    pad_position = prefix_len + block_size  # in a later block than every position of the prefill chunk
    _check_positions(int(lengths.max()) + max_new_tokens, max_positions)
    batch = len(prompts)
    prefix = np.full((batch, prefix_len), pad_id, np.int32)
    prefix_positions = np.full((batch, prefix_len), pad_position, np.int32)
    first_block = np.full((batch, block_size), mask_id, np.int32)
    shift = (prefix_len - full_blocks * block_size).astype(np.int32)
    for b, prompt in enumerate(prompts):
        whole = full_blocks[b] * block_size
        prefix[b, shift[b]:] = prompt[:whole]
        prefix_positions[b, shift[b]:] = np.arange(whole)
        first_block[b, : remainder[b]] = prompt[whole:]
    return BlockLayout(
        prefix, prefix_positions, first_block, shift, remainder.astype(np.int32), lengths, block_size, num_blocks,
        pad_position,
    )


@dataclasses.dataclass(frozen=True)
class ARLayout:
    """Left-padded prompts for causal decoding; generated token t goes to slot P + t."""

    prompt: np.ndarray  # [batch, P]
    positions: np.ndarray  # [batch, P]; pad slots hold a position beyond every real one
    start: np.ndarray  # [batch] first valid slot
    prompt_lengths: np.ndarray  # [batch]

    @property
    def prompt_len(self) -> int:
        return self.prompt.shape[1]

    def arrays(self) -> dict[str, np.ndarray]:
        return {"prompt": self.prompt, "positions": self.positions, "start": self.start, "lengths": self.prompt_lengths}


def ar_layout(
    prompts: list[np.ndarray], *, max_new_tokens: int, pad_id: int, max_positions: int | None, capacity: int | None = None
) -> ARLayout:
    lengths = np.array([len(p) for p in prompts], dtype=np.int32)
    _check_capacity(lengths, capacity)
    width = capacity if capacity is not None else bucket(int(lengths.max()), 16)
    _check_positions(int(lengths.max()) + max_new_tokens, max_positions)
    batch = len(prompts)
    prompt = np.full((batch, width), pad_id, np.int32)
    positions = np.full((batch, width), width, np.int32)  # after every prompt position
    start = (width - lengths).astype(np.int32)
    for b, row in enumerate(prompts):
        prompt[b, start[b]:] = row
        positions[b, start[b]:] = np.arange(len(row))
    return ARLayout(prompt, positions, start, lengths)
