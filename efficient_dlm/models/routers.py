"""MoE routers: which k experts each token visits, with what weight, plus load statistics.

One function covers the routers of the checkpoints we import, switched by ModelConfig fields:
- softmax top-k (Qwen2-MoE, Qwen3-MoE, Mixtral): p = softmax(logits); the k largest p are chosen;
  `router_norm_topk` renormalises them to sum to 1 (HF norm_topk_prob; Mixtral always does).
- sigmoid, selection bias, group-limited top-k (DeepSeek-V3, GLM-4.5, Ling 2.0): s = sigmoid(logits);
  selection ranks s + b (b: per-expert `ExpertBias`, moved by `update_expert_bias`, never by
  gradients); experts form `router_groups` groups, each scored by the sum of its two best biased
  scores, and only the best `router_topk_groups` groups are eligible; the weights are the unbiased s
  of the chosen experts, optionally renormalised (+1e-20, as HF), times `routed_scaling_factor`.
Router logits are computed in float32 whatever the compute dtype (a bf16 router flips near-ties).

Per-layer statistics returned with every routing (the MoE entries of `Decoder.hidden`'s aux), over
the counted tokens only (`token_weight`: the real tokens of training's x_t half, never padding nor
the x_0 copy; docs/METHOD.md section 7):
    expert_counts [E]   number of (token, slot) assignments per expert
    router_prob_sum [E] sum over tokens of the router probabilities (softmax p, or s / sum(s))
    router_tokens []    number of counted tokens
    router_z []         mean over tokens of logsumexp(logits)^2 (the ST-MoE z-loss of this layer)
    expert_load [E]     expert_counts / (tokens * k): the fraction of assignments per expert
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from efficient_dlm.models.config import ModelConfig
from efficient_dlm.models.layers import param


class ExpertBias(nnx.Variable):
    """Per-expert selection bias (float32). Not an nnx.Param: optimizers skip it, checkpoints keep it."""


class Router(nnx.Module):
    """Linear router [embed, experts] (replicated: it is small and top-k wants whole rows)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.weight = param(rngs, cfg, (cfg.hidden_size, cfg.num_experts), ("embed", None))
        if cfg.router_bias:
            self.bias = ExpertBias(jnp.zeros((cfg.num_experts,), jnp.float32), out_sharding=(None,), eager_sharding=False)

    def __call__(
        self, x: jax.Array, token_weight: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
        """x [N, embed] -> (weights [N, k] float32, experts [N, k] int32, statistics over the tokens
        with token_weight [N] = 1 (all tokens when None))."""
        logits = jnp.einsum("nd,de->ne", x.astype(jnp.float32), self.weight[...].astype(jnp.float32))
        bias = self.bias[...] if self.cfg.router_bias else None
        weights, experts, probs = route(self.cfg, logits, bias)
        return weights, experts, routing_stats(logits, probs, experts, self.cfg.num_experts, token_weight)


def route(cfg: ModelConfig, logits: jax.Array, bias: jax.Array | None = None):
    """Top-k routing of float32 logits [N, E] -> (weights [N, k], experts [N, k], probs [N, E])."""
    if cfg.router_score == "softmax":
        scores = jax.nn.softmax(logits, axis=-1)
        probs = scores
    else:
        scores = jax.nn.sigmoid(logits)
        probs = scores / jnp.sum(scores, axis=-1, keepdims=True)
    choice = scores if bias is None else scores + bias
    if cfg.router_groups > 1:
        choice = _limit_to_best_groups(choice, cfg.router_groups, cfg.router_topk_groups)
    _, experts = jax.lax.top_k(choice, cfg.num_experts_per_tok)
    weights = jnp.take_along_axis(scores, experts, axis=-1)
    if cfg.router_norm_topk:
        weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + 1e-20)
    return weights * cfg.routed_scaling_factor, experts.astype(jnp.int32), probs


def _limit_to_best_groups(choice: jax.Array, groups: int, topk_groups: int) -> jax.Array:
    """Sets the scores of experts outside the topk_groups best groups to -inf (DeepSeek-V3 rule)."""
    tokens, experts = choice.shape
    grouped = choice.reshape(tokens, groups, experts // groups)
    group_scores = jnp.sum(jax.lax.top_k(grouped, min(2, experts // groups))[0], axis=-1)
    _, best = jax.lax.top_k(group_scores, topk_groups)
    eligible = jnp.any(best[:, :, None] == jnp.arange(groups)[None, None, :], axis=1)  # [N, groups]
    return jnp.where(eligible[:, :, None], grouped, -jnp.inf).reshape(tokens, experts)


def routing_stats(
    logits: jax.Array, probs: jax.Array, experts: jax.Array, num_experts: int, token_weight: jax.Array | None = None
) -> dict[str, jax.Array]:
    """The per-layer load statistics listed in the module docstring, over the tokens of weight 1."""
    n, k = experts.shape
    weight = jnp.ones((n,), jnp.float32) if token_weight is None else token_weight.astype(jnp.float32)
    tokens = jnp.sum(weight)
    counts = jnp.zeros((num_experts,), jnp.float32).at[experts.reshape(-1)].add(jnp.repeat(weight, k))
    z = jnp.square(jax.nn.logsumexp(logits, axis=-1))
    return {
        "expert_counts": counts,
        "router_prob_sum": jnp.sum(weight[:, None] * probs, axis=0),
        "router_tokens": tokens,
        "router_z": jnp.sum(weight * z) / jnp.maximum(tokens, 1.0),
        "expert_load": counts / jnp.maximum(tokens * k, 1.0),
    }
