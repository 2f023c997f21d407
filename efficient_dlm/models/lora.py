"""LoRA: low-rank adapters on the projections, as the layers compute them (the math; models/adapters.py adds them).

y = x W + (alpha / r) * dropout(x) A B, with A [in, r] (PEFT's default init: kaiming-uniform, bound
1 / sqrt(fan_in)) and B [r, out] zero, so training starts at the base model exactly (Hu et al. 2021;
PEFT's `LoraLayer`). Routed MoE experts are adapted in the merged form, W_e + (alpha / r) A_e B_e,
computed per layer inside the scan, because their tokens go through grouped matmuls (ragged_dot /
gmm, capacity buffers, expert parallelism) that a side path would have to replicate; PEFT's
`target_parameters` LoRA on fused expert tensors is the same merged form and, like ours, has no dropout.

Why these few functions rather than qwix's `LoraProvider` or Flax's `nnx.LoRA` / `nnx.LoRALinear`
(checked against their current sources): our projections are einsums on 3-D weights ([embed, heads,
head_dim], [heads, head_dim, embed], [experts, embed, mlp]) held in stacked layer states that
`lax.scan` slices (models/decoder.py run_segment). qwix intercepts `einsum` / `dot_general` calls
whose right operand *is* a module parameter and creates the adapter lazily at the first call: our
weights are cast to the compute dtype first (the operand is no longer the parameter), the first call
happens inside the scan body (an adapter created there escapes the trace and would be one adapter
for all layers), and the experts' `ragged_dot` / Pallas gmm are not intercepted at all. `nnx.LoRA`
is a 2-D `x @ a @ b` module for `nnx.Linear`. What we take from Flax is its variable type:
adapters are `nnx.LoRAParam`, so `nnx.split(model, nnx.LoRAParam, ...)` separates them from the
frozen base (the optimizer sees adapters only) exactly as Flax's LoRA modules do. The einsum for
the adapter path is derived from the base projection's own equation (contracted letters go to A,
the others to B), so every projection shape is covered by one rule, as in qwix.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from efficient_dlm.models import quant_ops

# What lora.targets may name: the attention and MLP projections (dense layers and the MoE shared
# expert) by their module attribute, and "experts" for the routed experts' gate / up / down.
ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
EXPERTS = "experts"
TARGETS = ATTENTION_TARGETS + MLP_TARGETS + (EXPERTS,)
RANK_AXIS = "lora_rank"  # logical axis of the adapters' rank dimension (replicated, parallel/rules.py)
SUFFIX_A, SUFFIX_B, KEY = "_lora_a", "_lora_b", "lora_key"


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """The `lora` config section as static structure (hashable: it shapes the graph)."""

    rank: int = 0  # 0 = off
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ATTENTION_TARGETS + MLP_TARGETS
    base_dtype: str = ""  # "" = model.param_dtype; "bfloat16": the frozen base held in bfloat16

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class LoraDropoutKey(nnx.Variable):
    """Per-layer PRNG key of an adapted module's dropout; the train step fills it each step (models/adapters.py)."""


def split_equation(equation: str) -> tuple[str, str, str, str]:
    """"bte,ehd->bthd" -> (lhs "bte", contracted "e", remaining "hd", out "bthd")."""
    inputs, out = equation.split("->")
    lhs, weight = inputs.split(",")
    contracted = "".join(c for c in weight if c in lhs)
    remaining = "".join(c for c in weight if c not in lhs)
    return lhs, contracted, remaining, out


def adapter_delta(equation: str, x: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
    """x A B for the projection `equation`: A [contracted..., r], B [r, remaining...]."""
    lhs, contracted, remaining, out = split_equation(equation)
    mid = "".join(c for c in lhs if c not in contracted) + "r"
    h = jnp.einsum(f"{lhs},{contracted}r->{mid}", x, a.astype(x.dtype))
    return jnp.einsum(f"{mid},r{remaining}->{out}", h, b.astype(x.dtype))


def _dropout(x: jax.Array, rate: float, key: jax.Array) -> jax.Array:
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def project(module: nnx.Module, name: str, equation: str, x: jax.Array, dtype) -> jax.Array:
    """The projection `name` of `module` on x: einsum with the weight, plus its adapter when it has one."""
    cfg = module.cfg  # the base weight: float, or quantized (models/quantize.py) through qwix
    out = quant_ops.einsum(equation, x, getattr(module, name), dtype, cfg.quantize_activations)
    spec: LoraConfig | None = getattr(module, "lora", None)
    if spec is None or not hasattr(module, name + SUFFIX_A):
        return out
    xa = x
    if spec.dropout > 0 and hasattr(module, KEY):  # only the train step's graph carries the keys
        index = sorted(type(module).LORA_PROJECTIONS).index(name)
        xa = _dropout(x, spec.dropout, jax.random.fold_in(module.lora_key[...], index))
    a, b = getattr(module, name + SUFFIX_A)[...], getattr(module, name + SUFFIX_B)[...]
    return out + (spec.scale * adapter_delta(equation, xa, a, b)).astype(out.dtype)


def merged(weight: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """W + scale * A B in float32 for a weight [lead..., contracted..., remaining...] whose A is
    [lead..., contracted..., r] and B [lead..., r, remaining...] (lead: stacked layers, experts)."""
    lead = a.ndim + b.ndim - weight.ndim - 2
    n_con, n_rem = a.ndim - lead - 1, b.ndim - lead - 1
    letters = "abcdefghijklmnopq"
    lead_s, con_s, rem_s = letters[:lead], letters[lead : lead + n_con], letters[lead + n_con : lead + n_con + n_rem]
    delta = jnp.einsum(f"{lead_s}{con_s}z,{lead_s}z{rem_s}->{lead_s}{con_s}{rem_s}", a.astype(jnp.float32), b.astype(jnp.float32))
    return weight.astype(jnp.float32) + scale * delta


def expert_weight(module: nnx.Module, name: str) -> jax.Array:
    """A routed-expert weight [experts, in, out], merged with its adapter when it has one; a quantized
    weight is dequantized to the compute dtype (the grouped matmuls take float operands)."""
    w = quant_ops.float_weight(getattr(module, name), module.cfg.compute_dtype)
    spec: LoraConfig | None = getattr(module, "lora", None)
    if spec is None or not hasattr(module, name + SUFFIX_A):
        return w
    a, b = getattr(module, name + SUFFIX_A)[...], getattr(module, name + SUFFIX_B)[...]
    return merged(w, a, b, spec.scale).astype(jnp.promote_types(w.dtype, a.dtype))
