"""The mixture-of-experts layer (Qwen2-MoE, Qwen3-MoE, Mixtral, GLM-4.5 / Ling 2.0 style) and its losses.

A MoE decoder layer is the dense layer with the SwiGLU MLP replaced by `MoEBlock`: a router
(models/routers.py) picks k experts per token, the routed experts run as grouped matmuls
(models/moe_dispatch.py: dropless or capacity, with expert parallelism), and an optional shared
expert runs on every token, optionally scaled by sigmoid(x . w) (Qwen2-MoE). Configs with dense-MLP
layers (`first_k_dense`, `mlp_only_layers`) keep them in a separate stack (Decoder.dense_layers),
interleaved with the MoE layers in layer order by models/layer_groups.py.

Contract with the trainer. `Decoder.hidden` returns `aux`, empty for dense models; for MoE models:
- per-layer router statistics stacked over the MoE layers (routers.py: expert_counts,
  router_prob_sum, router_tokens, router_z, expert_load), for metrics and the bias update;
- two weighted scalar losses, to be added to the training loss as they are (every aux key ending in
  "_loss" is a loss term): "moe_aux_loss" = router_aux_loss_coef * the Switch / Qwen load-balancing
  loss, exactly as transformers' `load_balancing_loss_func` computes it over all MoE layers
  (E * sum_e f_e * P_e, f_e = assignments to expert e per token, P_e = mean router probability,
  both pooled over layers), and "router_z_loss" = router_z_loss_coef * the mean z-loss of the layers.
`moe_loss_terms(aux)` gives the unweighted terms; `expert_load_metrics(counts)` scalars for the log;
`update_expert_bias(model, aux)` is the auxiliary-loss-free balancing step (DeepSeek-V3),
b_e += router_bias_update_rate * sign(mean load - load_e) per layer, once per optimizer step;
`with_updated_expert_bias` is the same on an nnx.State, as the train step (train/step.py) applies it
with the expert counts summed over its micro-batches, on the steps the optimizer applied.
Routing per phase (`Routing`, docs/METHOD.md section 7): capacity on the x_t half in training; the
x_0 half dropless (`model.clean_routing="dropless"`, the default) or with a capacity of its own
("capacity"); inference dropless; statistics over the real x_t tokens.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from efficient_dlm.models import quant_ops
from efficient_dlm.models.config import ModelConfig
from efficient_dlm.models.layers import MLP, Attention, AttendFn, RMSNorm, param
from efficient_dlm.models.lora import expert_weight
from efficient_dlm.models.moe_dispatch import ExpertWeights, routed_outputs
from efficient_dlm.models.routers import Router
from efficient_dlm.parallel.rules import constrain


class Routing(NamedTuple):
    """How one forward routes its tokens (docs/METHOD.md section 7), built by `Decoder.hidden`.

    capacity_len: the length of one capacity segment; the first capacity_segments of them in every row
        are routed with capacity, each with its own (training's x_t half, or the whole row without
        clean context; and the x_0 half under model.clean_routing="capacity"); later positions (the
        x_0 half under clean_routing="dropless") are routed dropless. None: everything dropless
        (inference and scoring).
    token_weight [B, T] float32: 1 on the tokens the router statistics count (the real tokens of the
        x_t half), else 0.
    capacity_segments: 1 (x_t only, or the whole row) or 2 (x_t and x_0, one capacity each).
    """

    capacity_len: int | None
    token_weight: jax.Array
    capacity_segments: int = 1


class MoEBlock(nnx.Module):
    """Router + routed SwiGLU experts + optional (gated) shared expert. Returns (y, router statistics)."""

    LORA_EXPERT_WEIGHTS = ("gate_proj", "up_proj", "down_proj")  # adapted merged (models/lora.py), target "experts"

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        e, d, m = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.router = Router(cfg, rngs=rngs)
        self.gate_proj = param(rngs, cfg, (e, d, m), ("experts", "embed", "mlp"))
        self.up_proj = param(rngs, cfg, (e, d, m), ("experts", "embed", "mlp"))
        self.down_proj = param(rngs, cfg, (e, m, d), ("experts", "mlp", "embed"))
        if cfg.shared_expert_intermediate_size:
            self.shared_expert = MLP(cfg, cfg.shared_expert_intermediate_size, rngs=rngs)
        if cfg.shared_expert_gate:
            self.shared_expert_gate = param(rngs, cfg, (d,), ("embed",))

    def __call__(self, x: jax.Array, routing: Routing | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
        """routing None: dropless, statistics over every token (decode)."""
        b, t, d = x.shape
        token_weight = None if routing is None else routing.token_weight.reshape(b * t)
        weights, experts, stats = self.router(x.reshape(b * t, d), token_weight)
        k = experts.shape[-1]
        w = ExpertWeights(*(expert_weight(self, name) for name in self.LORA_EXPERT_WEIGHTS))
        capacity_len, segments = (None, 1) if routing is None else (routing.capacity_len, routing.capacity_segments)
        outputs = routed_outputs(x, experts.reshape(b, t, k), w, self.cfg, capacity_len, segments)
        y = jnp.einsum("btkd,btk->btd", outputs, weights.reshape(b, t, k).astype(x.dtype))
        if self.cfg.shared_expert_intermediate_size:
            shared = self.shared_expert(x)
            if self.cfg.shared_expert_gate:
                gate = jnp.einsum("btd,d->bt", x, self.shared_expert_gate[...].astype(x.dtype))
                shared = jax.nn.sigmoid(gate)[..., None] * shared
            y = y + shared
        return y, stats


class MoEDecoderLayer(nnx.Module):
    """Pre-norm layer with a MoE feed-forward; same signature as layers.DecoderLayer."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.input_norm = RMSNorm(cfg, cfg.hidden_size, rngs=rngs)
        self.attn = Attention(cfg, rngs=rngs)
        self.post_attn_norm = RMSNorm(cfg, cfg.hidden_size, rngs=rngs)
        self.mlp = MoEBlock(cfg, rngs=rngs)

    def __call__(self, x, cos, sin, attend: AttendFn, layer_cache=None, routing: Routing | None = None):
        q, k, v = self.attn.project(self.input_norm(x), cos, sin)
        k, v, kv = quant_ops.kv_round_trip(k, v, self.attn.cfg.quantize_kv != "none")
        x = x + self.attn.output(attend(q, k, v, layer_cache))
        y, stats = self.mlp(self.post_attn_norm(x), routing)
        x = constrain(x + y, ("batch", "length", "act_embed"))
        return x, kv, stats


# ---- losses, metrics and the bias update (the trainer's side of the contract) ------------------------


def moe_loss_terms(aux: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Unweighted {"load_balancing", "router_z"} from the stacked router statistics ({} if dense)."""
    if "expert_counts" not in aux:
        return {}
    tokens = jnp.sum(aux["router_tokens"])
    fraction = jnp.sum(aux["expert_counts"], axis=0) / tokens  # assignments per token, sums to k
    prob = jnp.sum(aux["router_prob_sum"], axis=0) / tokens
    num_experts = fraction.shape[-1]
    return {"load_balancing": num_experts * jnp.sum(fraction * prob), "router_z": jnp.mean(aux["router_z"])}


def with_moe_losses(aux: dict[str, jax.Array], cfg: ModelConfig) -> dict[str, jax.Array]:
    """aux plus the weighted scalar losses "moe_aux_loss" and "router_z_loss" (see the module docstring)."""
    terms = moe_loss_terms(aux)
    return {
        **aux,
        "moe_aux_loss": cfg.router_aux_loss_coef * terms["load_balancing"],
        "router_z_loss": cfg.router_z_loss_coef * terms["router_z"],
    }


def expert_load_metrics(counts: jax.Array) -> dict[str, jax.Array]:
    """Scalars for the training log from expert_counts [moe layers, experts]: the most and least
    loaded expert relative to uniform (1.0 = balanced) and the worst layer's coefficient of variation."""
    load = counts / jnp.maximum(jnp.sum(counts, axis=-1, keepdims=True), 1.0) * counts.shape[-1]
    return {
        "expert_load_max": jnp.max(load),
        "expert_load_min": jnp.min(load),
        "expert_load_cv": jnp.max(jnp.std(load, axis=-1)),
    }


def expert_bias_update(bias: jax.Array, counts: jax.Array, rate: float) -> jax.Array:
    """New selection bias [moe layers, experts] from expert_counts: + rate toward under-loaded experts,
    - rate away from over-loaded ones (sign of the load error, DeepSeek-V3)."""
    return bias + rate * jnp.sign(jnp.mean(counts, axis=-1, keepdims=True) - counts)


def update_expert_bias(model, aux: dict[str, jax.Array], rate: float | None = None) -> None:
    """Aux-loss-free balancing step, in place on the model's `ExpertBias` (works inside nnx.jit).

    rate defaults to model.config.router_bias_update_rate; a no-op without router_bias.
    """
    cfg = model.config
    if not cfg.router_bias or "expert_counts" not in aux:
        return
    bias = model.layers.mlp.router.bias
    bias[...] = expert_bias_update(bias[...], aux["expert_counts"], cfg.router_bias_update_rate if rate is None else rate)


BIAS_PATH = ("layers", "mlp", "router", "bias")


def with_updated_expert_bias(params: nnx.State, previous: nnx.State, counts: jax.Array, cfg: ModelConfig,
                             apply: jax.Array | bool = True) -> nnx.State:
    """Functional train-step form: `params` (after the optimizer) with the selection bias set to
    previous bias + update when `apply` (e.g. the step was finite), else to the previous bias. The
    optimizer never moves the bias (its gradient is zero; this overwrites whatever weight decay did)."""
    if not cfg.router_bias:
        return params
    old = dict(nnx.to_flat_state(previous))[BIAS_PATH][...]
    new = jnp.where(apply, expert_bias_update(old, counts, cfg.router_bias_update_rate), old)
    return nnx.from_flat_state([(p, v.replace(new) if p == BIAS_PATH else v) for p, v in nnx.to_flat_state(params)])
