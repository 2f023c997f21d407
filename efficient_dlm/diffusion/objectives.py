"""Training objectives (docs/METHOD.md sections 1-3): corrupt a batch, run the model, weight the loss.

An objective is split in two pure functions so the train step can normalise exactly over gradient
accumulation: `corrupt(objective, batch, key)` -> `Example` (model inputs, targets, per-token loss
weights and counts), and `predict_hidden(model, objective, example, ...)` -> hidden states aligned
with the targets. The loss is sum(weight * CE) / sum(count) over the whole global batch, plus
the confidence-aware term (LLaDA2.0's CAP, `confidence_weight`, docs/METHOD.md section 9) under the
same normaliser.

Objectives:
- block_diffusion (default): [x_t ; x_0] with the clean-context pattern, loss on the x_t half.
- block: block-causal attention over x_t only (no clean context).
- bidirectional: MDLM / LLaDA full diffusion; one rate per sequence.
- ar: next-token prediction with causal attention (the teacher / baseline).

Why our own code: the objectives are the diffusion workload itself; no library provides them.
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from efficient_dlm.diffusion import corruption
from efficient_dlm.diffusion.losses import confidence_sum, token_stats

OBJECTIVES = ("block_diffusion", "block", "bidirectional", "ar")
MASKINGS = ("position", "uniform")
WEIGHTINGS = ("elbo", "mean")
ATTENTION = {"block_diffusion": "clean_context", "block": "block", "bidirectional": "bidirectional", "ar": "causal"}


@dataclasses.dataclass(frozen=True)
class Objective:
    """Static description of a training objective (hashable: one jitted step per value)."""

    kind: str = "block_diffusion"
    block_size: int | None = 32
    masking: str = "position"
    half_life: float = 0.25
    rate_min: float = 1e-3
    rate_max: float = 1.0
    complementary: bool = False
    token_shift: bool = False
    weighting: str = "elbo"
    mask_token_id: int | None = None
    mask_noise_std: float = 0.0
    mask_noise_steps: int = 0
    ar_weight: float = 0.0  # joint objective: + ar_weight * causal next-token loss (self-speculative verifier)
    confidence_weight: float = 0.0  # CAP: + weight * entropy at masked positions already predicted correctly
    confidence_temperature: float = 1.0  # the entropy is that of softmax(logits / this)

    def __post_init__(self):
        if self.kind not in OBJECTIVES:
            raise ValueError(f"unknown diffusion.objective {self.kind!r}; choose one of {', '.join(OBJECTIVES)}")
        if self.masking not in MASKINGS:
            raise ValueError(f"unknown diffusion.masking {self.masking!r}; choose one of {', '.join(MASKINGS)}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"unknown diffusion.loss_weighting {self.weighting!r}; choose one of {', '.join(WEIGHTINGS)}")
        if self.is_diffusion and self.mask_token_id is None:
            raise ValueError("no [MASK] token: set model.mask_token_id or diffusion.mask_token='append'")
        if not 0.0 < self.rate_min <= self.rate_max <= 1.0:
            raise ValueError(
                f"diffusion rates need 0 < rate_min <= rate_max <= 1, got [{self.rate_min}, {self.rate_max}]"
            )
        if self.ar_weight < 0:
            raise ValueError(f"diffusion.ar_weight must be >= 0, got {self.ar_weight}")
        if self.ar_weight and not self.is_diffusion:
            raise ValueError("diffusion.ar_weight adds an AR loss to a diffusion objective; objective=ar is AR already")
        if self.half_life <= 0:
            raise ValueError(f"diffusion.half_life must be positive, got {self.half_life}")
        check_confidence(self.kind, self.confidence_weight, self.confidence_temperature)

    @property
    def is_diffusion(self) -> bool:
        return self.kind != "ar"

    @property
    def attention(self) -> str:
        return ATTENTION[self.kind]

    @property
    def shifted(self) -> bool:
        """Whether token i is predicted from the hidden state at i - 1."""
        return self.kind == "ar" or self.token_shift

    def corruption_block(self, length: int) -> int:
        """Positions sharing one mask rate: the whole sequence for bidirectional (MDLM)."""
        return length if self.kind == "bidirectional" else self.block_size


def check_confidence(kind: str, weight: float, temperature: float) -> None:
    """The CAP settings (ValueError naming the key): weight >= 0, temperature > 0, and a diffusion
    objective (objective=ar has no masked positions, so the term would silently do nothing)."""
    if not weight >= 0:
        raise ValueError(f"diffusion.confidence_weight must be >= 0, got {weight}")
    if not temperature > 0:
        raise ValueError(f"diffusion.confidence_temperature must be > 0, got {temperature}")
    if weight and kind == "ar":
        raise ValueError("diffusion.confidence_weight acts on masked positions; objective=ar has none (set it to 0)")


class Example(NamedTuple):
    """A corrupted batch ready for the model. B' = 2B with complementary masks.

    inputs [B', L or 2L]: token ids fed to the model ([x_t ; x_0] for block_diffusion).
    targets, weight, count, noised: [B', L]. weight is the per-token loss weight (for the ELBO
    n / k, the inverse of the block's realised masked fraction, docs/METHOD.md section 3; 1 for the
    mean; times the batch's loss_weights), count the per-token normaliser contribution, noised
    marks [MASK] positions (mask-embedding noise). With ar_weight > 0, ar_count marks the clean tokens
    the causal next-token loss covers and ar_weight is their loss weight, scaled so that
    sum(ar_weight * CE) / sum(count) = ar_weight * (mean causal CE) over the whole batch.
    """

    inputs: jax.Array
    segment_ids: jax.Array
    positions: jax.Array
    targets: jax.Array
    weight: jax.Array
    count: jax.Array
    noised: jax.Array
    ar_count: jax.Array | None = None
    ar_weight: jax.Array | None = None


def _loss_weights(batch: dict[str, jax.Array]) -> jax.Array:
    real = (batch["segment_ids"] > 0).astype(jnp.float32)
    return real * batch["loss_weights"].astype(jnp.float32) if "loss_weights" in batch else real


def _autoregressive(batch: dict[str, jax.Array]) -> Example:
    tokens, seg = batch["tokens"], batch["segment_ids"]
    count = _loss_weights(batch) * corruption.predecessor_in_document(seg)
    return Example(tokens, seg, batch["positions"], tokens, count, count, jnp.zeros(tokens.shape, bool))


def corrupt(obj: Objective, batch: dict[str, jax.Array], key: jax.Array) -> Example:
    """Masks the batch {tokens, segment_ids, positions[, loss_weights][, maskable]} (all [B, L]) for `obj`.

    `maskable` (bool) restricts which tokens may be masked: scoring a continuation keeps its prefix clean.
    """
    if obj.kind == "ar":
        return _autoregressive(batch)
    tokens, seg = batch["tokens"], batch["segment_ids"]
    batch_size, length = tokens.shape
    block = obj.corruption_block(length)
    lw = _loss_weights(batch)
    eligible = seg > 0
    if "maskable" in batch:
        eligible &= batch["maskable"]
    if obj.token_shift:
        eligible &= corruption.predecessor_in_document(seg)
    rate_key, mask_key = jax.random.split(key)
    rates = corruption.block_rates(rate_key, batch_size, length // block, obj.rate_min, obj.rate_max)
    if obj.masking == "position":
        mask = corruption.position_dependent_mask(mask_key, rates, eligible, block, obj.half_life)
    else:
        mask = corruption.uniform_mask(mask_key, rates, eligible, block)
    masks = [mask, eligible & ~mask] if obj.complementary else [mask]
    mask = jnp.concatenate(masks)
    copies = len(masks)
    tokens, seg, pos, lw, eligible = (jnp.tile(x, (copies, 1)) for x in (tokens, seg, batch["positions"], lw, eligible))
    x_t = corruption.apply_mask(tokens, mask, obj.mask_token_id)
    inputs = jnp.concatenate([x_t, tokens], axis=1) if obj.kind == "block_diffusion" else x_t
    count = mask * lw
    weight = count * corruption.elbo_weight(mask, eligible, block) if obj.weighting == "elbo" else count
    ar_count = ar_weight = None
    if obj.ar_weight:  # the causal loss on the clean rows, once (not on the complementary copy)
        ar_count = _autoregressive(batch).count
        ar_count = jnp.concatenate([ar_count, jnp.zeros_like(ar_count)]) if copies == 2 else ar_count
        scale = jnp.maximum(jnp.sum(count), 1.0) / jnp.maximum(jnp.sum(ar_count), 1.0)
        ar_weight = obj.ar_weight * scale * ar_count
    return Example(inputs, seg, pos, tokens, weight, count, mask, ar_count, ar_weight)


def _shift_right(h: jax.Array) -> jax.Array:
    """out[:, i] = h[:, i - 1]; out[:, 0] = 0 (never trained: its weight is 0)."""
    return jnp.pad(h[:, :-1], ((0, 0), (1, 0), (0, 0)))


def predict_hidden(
    model, obj: Objective, ex: Example, *, key: jax.Array | None = None, step: jax.Array | int = 0,
    train: bool = False,
) -> tuple[jax.Array, dict[str, Any]]:
    """Final hidden states [B', L, E] whose row i predicts targets[:, i], and the model's aux outputs.

    train: route MoE experts as in training (capacity on the x_t half, the x_0 half per
    model.clean_routing, docs/METHOD.md section 7); False (evaluation, scoring) routes them
    dropless, as inference does.

    With token shift, position i reads the hidden state at i - 1; under clean context the first
    token of a block reads the clean x_0 state at i - 1 (it sees only finished blocks, as at decode).
    """
    embeddings = None
    if obj.mask_noise_std > 0 and obj.mask_noise_steps > 0:
        noised = ex.noised
        if obj.kind == "block_diffusion":
            noised = jnp.concatenate([noised, jnp.zeros_like(noised)], axis=1)
        embeddings = corruption.mask_embedding_noise(
            key, model.embed(ex.inputs), noised, obj.mask_noise_std, jnp.asarray(step), obj.mask_noise_steps
        )
    h, aux = model.hidden(
        ex.inputs,
        attention=obj.attention,
        block_size=obj.block_size if obj.kind in ("block", "block_diffusion") else None,
        segment_ids=ex.segment_ids,
        positions=ex.positions,
        embeddings=embeddings,
        moe_capacity=train,
    )
    length = ex.targets.shape[1]
    h_t = h[:, :length]
    if not obj.shifted:
        return h_t, aux
    shifted = _shift_right(h_t)
    if obj.kind == "block_diffusion":
        block_start = (jnp.arange(length) % obj.block_size == 0)[None, :, None]
        shifted = jnp.where(block_start, _shift_right(h[:, length:]), shifted)
    return shifted, aux


def aux_losses(aux: dict[str, Any]) -> jax.Array:
    """Sum of every auxiliary output whose name ends in "_loss" (e.g. MoE router losses), all layers."""
    leaves = jax.tree_util.tree_flatten_with_path(aux)[0]
    total = jnp.zeros((), jnp.float32)
    for path, leaf in leaves:
        if jax.tree_util.keystr(path[-1:]).strip("[]'\".").endswith("_loss"):
            total = total + jnp.sum(leaf.astype(jnp.float32))
    return total


def loss_and_sums(
    model,
    obj: Objective,
    ex: Example,
    *,
    normaliser: jax.Array,
    key: jax.Array | None = None,
    step: jax.Array | int = 0,
    z_loss: float = 0.0,
    valid_vocab: int | None = None,
    chunk: int = 0,
    train: bool = False,
) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """(sum(weight * CE + z * count * lse^2) / normaliser, aux losses, metric sums) for one example.

    The normaliser is the global batch's sum of `count` (the masked-token count, Efficient-DLM), so
    micro-batches of an accumulated step add up to exactly the full-batch loss. With
    obj.confidence_weight = w > 0 the numerator also gets w * sum(count * [argmax == target] * H)
    (CAP, docs/METHOD.md section 9), and sums["confidence"] holds that sum without w.
    """

    h, aux = predict_hidden(model, obj, ex, key=key, step=step, train=train)
    cap = obj.confidence_weight > 0
    stats = token_stats(model, h, ex.targets, valid_vocab=valid_vocab, chunk=chunk,
                        entropy_temperature=obj.confidence_temperature if cap else None)
    loss = jnp.sum(ex.weight * stats.ce)
    if z_loss:
        loss = loss + z_loss * jnp.sum(ex.count * stats.lse**2)
    if cap:
        confidence = confidence_sum(ex.count, stats.correct, stats.entropy)
        loss = loss + obj.confidence_weight * confidence
    sums = {
        "ce": jnp.sum(ex.count * stats.ce),
        "correct": jnp.sum(ex.count * stats.correct),
        "count": jnp.sum(ex.count),
        "tokens": jnp.sum(ex.segment_ids > 0).astype(jnp.float32),
    }
    if cap:
        sums["confidence"] = confidence
    if "expert_counts" in aux:  # MoE routing counts [moe layers, experts]: load metrics and the bias update
        sums["expert_counts"] = aux["expert_counts"]
    if ex.ar_weight is not None:  # joint objective: the same weights in causal mode on the clean tokens
        h_ar, _ = model.hidden(ex.targets, attention="causal", segment_ids=ex.segment_ids, positions=ex.positions,
                               moe_capacity=train)
        ar = token_stats(model, _shift_right(h_ar), ex.targets, valid_vocab=valid_vocab, chunk=chunk)
        loss = loss + jnp.sum(ex.ar_weight * ar.ce)
        sums.update(ar_ce=jnp.sum(ex.ar_count * ar.ce), ar_count=jnp.sum(ex.ar_count))
    return loss / normaliser, aux_losses(aux), sums
