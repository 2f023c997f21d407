"""The order in which the decoder runs its stacked layers: a schedule of scanned, repeating groups.

Real checkpoints mix layer kinds: Qwen-MoE's `decoder_sparse_step` / `mlp_only_layers` put dense-MLP
layers anywhere among the MoE layers, Qwen2's `max_window_layers` / `layer_types` give some layers a
sliding window and others full attention. Parameters stay in one stack per MLP kind (`dense_layers`,
`layers`, each in layer order: the checkpoint layout does not depend on the pattern), and each layer
has a static kind (its stack, its window). The decoder runs the layers as a short list of segments,
each a group of consecutive kinds repeated r times and run as one `lax.scan` over r with the group's
layers unrolled in the body:

- a uniform stack (every Llama / Qwen3 / Mistral) is one segment, group of one layer;
- leading dense layers then MoE (GLM-4.5's first_k_dense_replace) are two segments;
- decoder_sparse_step 2 (dense, MoE, dense, MoE, ...) is one segment whose group is (dense, MoE);
- an irregular pattern is cut greedily: at each layer the group that covers the most layers by
  repetition (ties: the shortest group) is taken; a kind that does not repeat becomes a segment of
  one layer. Compile time grows with the number of segments and group lengths, not with depth, as
  long as the pattern is regular; a pattern with no repetition at all costs one traced layer per
  irregular run, never more than the number of layers.

KV caches, returned keys/values and the MoE router statistics are concatenated over segments, so
they keep one leading axis over all layers (caches, keys/values) or over the MoE layers (statistics)
in layer order, whatever the schedule.
"""
from __future__ import annotations

import dataclasses

from efficient_dlm.models.config import ModelConfig

MOE_STACK, DENSE_STACK = "layers", "dense_layers"


@dataclasses.dataclass(frozen=True)
class LayerKind:
    stack: str  # the parameter stack holding the layer: "layers" or "dense_layers"
    window: int | None  # sliding window of its attention, None for full attention


@dataclasses.dataclass(frozen=True)
class Segment:
    """Layers first .. first + len(group) * repeats - 1, as `repeats` copies of `group`."""

    first: int
    group: tuple[LayerKind, ...]
    repeats: int
    offsets: dict  # stack -> index of the segment's first layer in that stack

    def per_group(self, stack: str) -> int:
        """Layers of `stack` in one group."""
        return sum(kind.stack == stack for kind in self.group)


def layer_kinds(cfg: ModelConfig) -> tuple[LayerKind, ...]:
    """Each layer's stack and attention window, in layer order."""
    dense = set(cfg.dense_mlp_layers)
    full = set(cfg.full_attention_layers)
    kinds = []
    for i in range(cfg.num_layers):
        stack = DENSE_STACK if cfg.is_moe and i in dense else MOE_STACK
        kinds.append(LayerKind(stack, None if i in full else cfg.sliding_window))
    return tuple(kinds)


def _best_group(kinds: tuple, start: int) -> tuple[int, int]:
    """(group length, repeats) at `start`: the most layers covered by repeating, then the shortest group."""
    best = (1, 1)
    for length in range(1, (len(kinds) - start) // 2 + 1):
        group = kinds[start : start + length]
        repeats = 1
        while kinds[start + repeats * length : start + (repeats + 1) * length] == group:
            repeats += 1
        if repeats > 1 and length * repeats > best[0] * best[1]:
            best = (length, repeats)
    return best


def schedule(cfg: ModelConfig) -> tuple[Segment, ...]:
    """The segments that run all layers in order (module docstring)."""
    kinds = layer_kinds(cfg)
    segments, start, offsets = [], 0, {MOE_STACK: 0, DENSE_STACK: 0}
    while start < len(kinds):
        length, repeats = _best_group(kinds, start)
        segment = Segment(start, kinds[start : start + length], repeats, dict(offsets))
        for stack in offsets:
            offsets[stack] += segment.per_group(stack) * repeats
        segments.append(segment)
        start += length * repeats
    return tuple(segments)
