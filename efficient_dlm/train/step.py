"""The jitted train and eval steps.

`make_train_step(diffusion, train, model_cfg, block_size=...)` (the typed `diffusion` and `train`
config sections: frozen, so a compiled step is keyed by their values) returns `step(state, batch, rng) -> (state,
metrics)`: corruption from `rng` (the loop passes fold_in(state.rng, step)), forward, loss, gradient
(accumulated over `train.grad_accum` micro-batches with lax.scan, normalised by the masked-token
count of the whole batch so accumulation is exact), and the optax update. A step whose loss or
gradients are non-finite leaves params and optimizer moments untouched (optax.apply_if_finite); the
metrics report it. One compiled function per block size: the loop caches them.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from efficient_dlm.diffusion.config import DiffusionConfig
from efficient_dlm.diffusion.objectives import Example, Objective, corrupt, loss_and_sums
from efficient_dlm.models.adapters import fill_dropout_keys
from efficient_dlm.models.config import ModelConfig
from efficient_dlm.models.lora import LoraConfig
from efficient_dlm.models.moe import expert_load_metrics, with_updated_expert_bias
from efficient_dlm.train.config import TrainConfig
from efficient_dlm.train.optim import learning_rate_schedule, make_optimizer
from efficient_dlm.train.state import TrainState, dropout_key_template, graphdef_for

Batch = dict[str, jax.Array]

# The train-section keys a compiled step depends on (optimizer, schedule, loss); the rest is host-side.
STEP_TRAIN_KEYS = (
    "steps", "learning_rate", "schedule", "warmup_steps", "min_lr_ratio", "wsd_decay_fraction", "b1", "b2",
    "adam_eps", "weight_decay", "decay_norms", "decay_biases", "decay_embeddings", "grad_clip", "z_loss",
    "loss_chunk", "max_nonfinite_steps", "grad_accum",
)


def step_settings(train: TrainConfig) -> tuple:
    """The train-section values a compiled step depends on (a cache key: equal settings, one compilation)."""
    return tuple((k, getattr(train, k)) for k in STEP_TRAIN_KEYS)


def _micro_batches(ex: Example, count: int) -> Example:
    return jax.tree.map(lambda x: x.reshape(count, x.shape[0] // count, *x.shape[1:]), ex)


_DROPOUT_STREAM = 0x10A  # fold_in constant: the LoRA dropout keys' stream, apart from the mask-noise key


def _loss_fn(
    model_cfg: ModelConfig, lora: LoraConfig | None, obj: Objective, valid_vocab: int | None, chunk: int, accum: int,
    z_loss: float, train: bool,
):
    """train: MoE training routing (capacity on x_t; x_0 per model.clean_routing) and LoRA dropout; the
    eval step routes dropless, as inference, without dropout. frozen: the LoRA base (None for full
    fine-tuning)."""
    dropout = train and lora is not None and lora.dropout > 0
    graphdef = graphdef_for(model_cfg, lora, train=dropout)
    keys = dropout_key_template(model_cfg, lora) if dropout else None

    def loss_fn(params, ex: Example, normaliser, key, step, frozen=None):
        states = [] if frozen is None else [frozen]
        if keys is not None:
            states.append(fill_dropout_keys(keys, jax.random.fold_in(key, _DROPOUT_STREAM)))
        model = nnx.merge(graphdef, params, *states)
        loss, aux, sums = loss_and_sums(
            model, obj, ex, normaliser=normaliser, key=key, step=step, z_loss=z_loss, valid_vocab=valid_vocab,
            chunk=chunk, train=train,
        )
        return loss + aux / accum, {**sums, "loss": loss, "aux_loss": aux / accum}

    return loss_fn


def accumulate(grad_fn, params, ex: Example, normaliser, key, step, accum: int, frozen=None):
    """Sum of gradients and metric sums over `accum` micro-batches (lax.scan); frozen: the LoRA base."""
    if frozen is not None:
        grad_fn = functools.partial(grad_fn, frozen=frozen)
    if accum == 1:
        (_, sums), grads = grad_fn(params, ex, normaliser, key, step)
        return grads, sums
    micro = _micro_batches(ex, accum)

    def body(carry, xs):
        i, ex_i = xs
        (_, sums), grads = grad_fn(params, ex_i, normaliser, jax.random.fold_in(key, i), step)
        return jax.tree.map(jnp.add, carry, (grads, sums)), None

    zero_grads = jax.tree.map(jnp.zeros_like, params)
    zero_sums = jax.eval_shape(lambda: grad_fn(params, jax.tree.map(lambda x: x[0], micro), normaliser, key, step)[0][1])
    zero_sums = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zero_sums)
    (grads, sums), _ = jax.lax.scan(body, (zero_grads, zero_sums), (jnp.arange(accum), micro))
    return grads, sums


def summarize(sums: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Ratios from summed statistics: masked NLL, masked-token accuracy, masked fraction (and CAP's
    confidence_loss, the mean entropy term per masked token, when diffusion.confidence_weight > 0)."""
    count = jnp.maximum(sums["count"], 1.0)
    out = {
        "nll": sums["ce"] / count,
        "accuracy": sums["correct"] / count,
        "masked_fraction": sums["count"] / jnp.maximum(sums["tokens"], 1.0),
    }
    if "ar_ce" in sums:  # joint objective (diffusion.ar_weight): the causal next-token NLL
        out["ar_nll"] = sums["ar_ce"] / jnp.maximum(sums["ar_count"], 1.0)
    if "confidence" in sums:  # CAP (diffusion.confidence_weight): L_conf, before its weight
        out["confidence_loss"] = sums["confidence"] / count
    return out


def apply_gradients(
    t: TrainConfig, tx: optax.GradientTransformation, model_cfg: ModelConfig, state: TrainState, grads,
    sums: dict[str, jax.Array],
) -> tuple[TrainState, dict[str, jax.Array]]:
    """The optax update from summed gradients; a non-finite loss (sums["loss"] + sums["aux_loss"]) or
    gradient leaves params and moments untouched (optax.apply_if_finite). MoE (sums["expert_counts"]):
    the aux-loss-free selection-bias update and expert-load metrics. Shared by every objective."""
    loss = sums["loss"] + sums["aux_loss"]
    finite = jnp.isfinite(loss)  # a non-finite loss poisons the gradients so apply_if_finite skips
    grads = jax.tree.map(lambda g: jnp.where(finite, g, jnp.nan), grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    moe_metrics = {}
    if "expert_counts" in sums:  # the selection bias moves only on steps the optimizer applied
        if state.frozen is None:  # under LoRA it is part of the frozen base
            params = with_updated_expert_bias(params, state.params, sums["expert_counts"], model_cfg, opt_state.last_finite)
        moe_metrics = expert_load_metrics(sums["expert_counts"])
    metrics = {
        "loss": loss,
        "aux_loss": sums["aux_loss"],
        "grad_norm": optax.tree.norm(grads),
        "param_norm": optax.tree.norm(params),  # the loop's divergence guard (train.max_param_norm_ratio)
        "learning_rate": learning_rate_schedule(t)(state.step),
        "skipped": ~opt_state.last_finite,  # what apply_if_finite decided
        "nonfinite_streak": opt_state.notfinite_count,
        **moe_metrics,
    }
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def make_train_step(
    diffusion: DiffusionConfig,
    train: TrainConfig,
    model_cfg: ModelConfig,
    *,
    lora: LoraConfig | None = None,
    block_size: int | None = None,
    tx: optax.GradientTransformation | None = None,
    jit: bool = True,
    donate: bool = True,
) -> Callable[[TrainState, Batch, jax.Array], tuple[TrainState, dict[str, Any]]]:
    """The train step for `model_cfg` under the `diffusion` objective and the `train` optimizer, accumulation
    and z-loss; `block_size` overrides diffusion.block_size (the block-size schedule's current value);
    `lora`: adapters trained on the frozen base in TrainState.frozen (None: full fine-tuning).

    batch: {tokens, segment_ids, positions[, loss_weights]} with leading dimension train.batch_size.
    """
    obj = diffusion.make_objective(model_cfg.mask_token_id, block_size)
    tx = tx or make_optimizer(train)
    accum = train.grad_accum
    loss_fn = _loss_fn(model_cfg, lora, obj, diffusion.valid_vocab_size, train.loss_chunk, accum, train.z_loss,
                       train=True)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state: TrainState, batch: Batch, rng: jax.Array):
        corrupt_key, noise_key = jax.random.split(rng)
        ex = corrupt(obj, batch, corrupt_key)
        normaliser = jnp.maximum(jnp.sum(ex.count), 1.0)
        grads, sums = accumulate(grad_fn, state.params, ex, normaliser, noise_key, state.step, accum, state.frozen)
        state, metrics = apply_gradients(train, tx, model_cfg, state, grads, sums)
        return state, {**metrics, "tokens": sums["tokens"], **summarize(sums)}

    if not jit:
        return step
    return jax.jit(step, donate_argnums=(0,) if donate else ())


def make_eval_step(
    diffusion: DiffusionConfig, train: TrainConfig, model_cfg: ModelConfig, *, lora: LoraConfig | None = None,
    block_size: int | None = None, jit: bool = True,
):
    """eval_step(params, batch, rng, frozen=None) -> metric sums: "loss" (the ELBO / NLL numerator, no
    z-loss, no mask-embedding noise, no CAP term), count, ce, correct, tokens. Ratios come from
    `summarize` over all batches. frozen: the LoRA base (TrainState.frozen)."""
    obj = dataclasses.replace(diffusion.make_objective(model_cfg.mask_token_id, block_size), mask_noise_std=0.0,
                              ar_weight=0.0, confidence_weight=0.0)
    loss_fn = _loss_fn(model_cfg, lora, obj, diffusion.valid_vocab_size, train.loss_chunk, 1, 0.0, train=False)

    def eval_step(params, batch: Batch, rng: jax.Array, frozen=None):
        _, sums = loss_fn(params, corrupt(obj, batch, rng), 1.0, None, 0, frozen)
        return sums

    return jax.jit(eval_step) if jit else eval_step
