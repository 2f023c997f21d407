"""Hugging Face tensor names <-> our parameter paths, one readable table per model family.

Each rule says: this HF tensor (with `{i}` for the layer index, `{j}` for the expert index) is that
parameter of ours, seen through this layout change. Layouts are pure views (reshape + transpose),
so an importer can apply them to a memory-mapped tensor and read only the slice a device needs;
`to_hf` is the exact inverse used by export. Per-layer rules fill the stacked layer axis of our
parameters, per-expert rules also the experts axis after it. `named_slices(rule, cfg)` lists, for
each HF tensor of a rule, the index of its slice in our stacked parameter (import and export both
walk it). MoE configs hold two layer stacks: `dense_layers` (the HF layers with a dense MLP:
0..first_k_dense-1 and mlp_only_layers, in order) and `layers` (the rest, in order), so a rule's
stack decides which HF layer indices it covers.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from efficient_dlm.models.config import ModelConfig

Array = np.ndarray


@dataclasses.dataclass(frozen=True)
class Layout:
    """to_ours(hf_view, cfg) -> view in our layout; to_hf(ours, cfg) -> HF layout."""

    to_ours: Callable[[Array, ModelConfig], Array]
    to_hf: Callable[[Array, ModelConfig], Array]


COPY = Layout(lambda w, c: w, lambda w, c: w)
# nn.Linear stores [out, in]; we store [in, out].
LINEAR = Layout(lambda w, c: w.T, lambda w, c: w.T)
# q/k/v projection [heads * head_dim, embed] -> [embed, heads, head_dim]
HEADS_IN = Layout(
    lambda w, c: w.reshape(-1, c.head_dim, w.shape[-1]).transpose(2, 0, 1),
    lambda w, c: w.transpose(1, 2, 0).reshape(-1, w.shape[0]),
)
# o projection [embed, heads * head_dim] -> [heads, head_dim, embed]
HEADS_OUT = Layout(
    lambda w, c: w.reshape(w.shape[0], -1, c.head_dim).transpose(1, 2, 0),
    lambda w, c: w.transpose(2, 0, 1).reshape(w.shape[2], -1),
)
# q/k/v bias [heads * head_dim] -> [heads, head_dim]
HEADS_BIAS = Layout(lambda w, c: w.reshape(-1, c.head_dim), lambda w, c: w.reshape(-1))


@dataclasses.dataclass(frozen=True)
class Rule:
    hf_name: str  # "model.layers.{i}.self_attn.q_proj.weight"; {i} marks a per-layer tensor
    path: tuple[str, ...]  # our parameter path in nnx.state(model)
    layout: Layout = COPY
    when: Callable[[ModelConfig], bool] = lambda cfg: True

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.hf_name

    @property
    def per_expert(self) -> bool:
        return "{j}" in self.hf_name


def _layer(name: str) -> str:
    return "model.layers.{i}." + name


def _attention_rules(stack: str, when: Callable[[ModelConfig], bool] = lambda c: True) -> tuple[Rule, ...]:
    """Norms and attention of every layer of `stack` ("layers" or "dense_layers")."""
    both = lambda extra: (lambda c: when(c) and extra(c))  # noqa: E731
    return (
        Rule(_layer("input_layernorm.weight"), (stack, "input_norm", "scale"), when=when),
        Rule(_layer("self_attn.q_proj.weight"), (stack, "attn", "q_proj"), HEADS_IN, when),
        Rule(_layer("self_attn.k_proj.weight"), (stack, "attn", "k_proj"), HEADS_IN, when),
        Rule(_layer("self_attn.v_proj.weight"), (stack, "attn", "v_proj"), HEADS_IN, when),
        Rule(_layer("self_attn.o_proj.weight"), (stack, "attn", "o_proj"), HEADS_OUT, when),
        Rule(_layer("self_attn.q_proj.bias"), (stack, "attn", "q_bias"), HEADS_BIAS, both(lambda c: c.attention_bias)),
        Rule(_layer("self_attn.k_proj.bias"), (stack, "attn", "k_bias"), HEADS_BIAS, both(lambda c: c.attention_bias)),
        Rule(_layer("self_attn.v_proj.bias"), (stack, "attn", "v_bias"), HEADS_BIAS, both(lambda c: c.attention_bias)),
        Rule(_layer("self_attn.o_proj.bias"), (stack, "attn", "o_bias"), when=both(lambda c: c.attention_out_bias)),
        Rule(_layer("self_attn.q_norm.weight"), (stack, "attn", "q_norm", "scale"), when=both(lambda c: c.qk_norm)),
        Rule(_layer("self_attn.k_norm.weight"), (stack, "attn", "k_norm", "scale"), when=both(lambda c: c.qk_norm)),
        Rule(_layer("post_attention_layernorm.weight"), (stack, "post_attn_norm", "scale"), when=when),
    )


def _mlp_rules(stack: str, prefix: str, when: Callable[[ModelConfig], bool] = lambda c: True) -> tuple[Rule, ...]:
    """A SwiGLU MLP (gate_proj / up_proj / down_proj) at HF `prefix` into our `stack` path."""
    return (
        Rule(_layer(f"{prefix}.gate_proj.weight"), (*stack, "gate_proj"), LINEAR, when),
        Rule(_layer(f"{prefix}.up_proj.weight"), (*stack, "up_proj"), LINEAR, when),
        Rule(_layer(f"{prefix}.down_proj.weight"), (*stack, "down_proj"), LINEAR, when),
    )


_OUTER_RULES: tuple[Rule, ...] = (
    Rule("model.embed_tokens.weight", ("embed_tokens",)),
    Rule("model.norm.weight", ("final_norm", "scale")),
    Rule("lm_head.weight", ("lm_head",), LINEAR, lambda c: not c.tie_word_embeddings),
)

DENSE_RULES: tuple[Rule, ...] = (
    *_OUTER_RULES,
    *_attention_rules("layers"),
    *_mlp_rules(("layers", "mlp"), "mlp"),
)

# ---- mixture-of-experts families ------------------------------------------------------------------
# Our MoE block (models/moe.py) under layers/mlp: router/weight [embed, experts], router/bias
# [experts], gate_proj / up_proj [experts, embed, mlp], down_proj [experts, mlp, embed],
# shared_expert/{gate,up,down}_proj, shared_expert_gate [embed]. HF stores one nn.Linear per
# expert ([out, in]); {j} stacks them on our experts axis.
ROUTER_IN = Layout(lambda w, c: w.T, lambda w, c: w.T)  # HF gate [experts, embed] -> [embed, experts]
GATE_VECTOR = Layout(lambda w, c: w.reshape(-1), lambda w, c: w.reshape(1, -1))  # [1, embed] -> [embed]
_MOE = ("layers", "mlp")
_has_dense_layers = lambda c: bool(c.dense_mlp_layers)  # noqa: E731
_DENSE_PREFIX_RULES = (*_attention_rules("dense_layers", _has_dense_layers), *_mlp_rules(("dense_layers", "mlp"), "mlp", _has_dense_layers))

QWEN3_MOE_RULES: tuple[Rule, ...] = (
    *_OUTER_RULES,
    *_DENSE_PREFIX_RULES,
    *_attention_rules("layers"),
    Rule(_layer("mlp.gate.weight"), (*_MOE, "router", "weight"), ROUTER_IN),
    Rule(_layer("mlp.experts.{j}.gate_proj.weight"), (*_MOE, "gate_proj"), LINEAR),
    Rule(_layer("mlp.experts.{j}.up_proj.weight"), (*_MOE, "up_proj"), LINEAR),
    Rule(_layer("mlp.experts.{j}.down_proj.weight"), (*_MOE, "down_proj"), LINEAR),
)

QWEN2_MOE_RULES: tuple[Rule, ...] = (
    *QWEN3_MOE_RULES,
    *_mlp_rules((*_MOE, "shared_expert"), "mlp.shared_expert", lambda c: c.shared_expert_intermediate_size > 0),
    Rule(_layer("mlp.shared_expert_gate.weight"), (*_MOE, "shared_expert_gate"), GATE_VECTOR, lambda c: c.shared_expert_gate),
)

MIXTRAL_RULES: tuple[Rule, ...] = (
    *_OUTER_RULES,
    *_attention_rules("layers"),
    Rule(_layer("block_sparse_moe.gate.weight"), (*_MOE, "router", "weight"), ROUTER_IN),
    Rule(_layer("block_sparse_moe.experts.{j}.w1.weight"), (*_MOE, "gate_proj"), LINEAR),
    Rule(_layer("block_sparse_moe.experts.{j}.w3.weight"), (*_MOE, "up_proj"), LINEAR),
    Rule(_layer("block_sparse_moe.experts.{j}.w2.weight"), (*_MOE, "down_proj"), LINEAR),
)

GLM4_MOE_RULES: tuple[Rule, ...] = (
    *QWEN3_MOE_RULES,
    Rule(_layer("mlp.gate.e_score_correction_bias"), (*_MOE, "router", "bias"), when=lambda c: c.router_bias),
    *_mlp_rules((*_MOE, "shared_expert"), "mlp.shared_experts", lambda c: c.shared_expert_intermediate_size > 0),
)

FAMILY_RULES: dict[str, tuple[Rule, ...]] = {
    "llama": DENSE_RULES,
    "mistral": DENSE_RULES,
    "qwen2": DENSE_RULES,
    "qwen3": DENSE_RULES,
    "qwen3_moe": QWEN3_MOE_RULES,
    "qwen2_moe": QWEN2_MOE_RULES,
    "mixtral": MIXTRAL_RULES,
    "glm4_moe": GLM4_MOE_RULES,
}

# Tensors some checkpoints carry that hold no parameters of ours.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def rules_for(cfg: ModelConfig) -> tuple[Rule, ...]:
    """The active rules for this config (family table filtered by the config's options)."""
    if cfg.model_type not in FAMILY_RULES:
        raise ValueError(f"no tensor-name table for model_type {cfg.model_type!r}")
    return tuple(rule for rule in FAMILY_RULES[cfg.model_type] if rule.when(cfg))


def layer_indices(stack: str, cfg: ModelConfig) -> tuple[int, ...]:
    """HF layer indices held by our stack `stack`, in order ("dense_layers": a MoE model's dense-MLP layers)."""
    dense = cfg.dense_mlp_layers
    if stack == "dense_layers":
        return dense
    return tuple(i for i in range(cfg.num_layers) if i not in set(dense))


def stack_shape(rule: Rule, cfg: ModelConfig) -> tuple[int, ...]:
    """Leading axes of our parameter that HF spreads over tensor names: (), (layers,) or (layers, experts)."""
    if not rule.per_layer:
        return ()
    layers = len(layer_indices(rule.path[0], cfg))
    return (layers, cfg.num_experts) if rule.per_expert else (layers,)


def named_slices(rule: Rule, cfg: ModelConfig) -> list[tuple[str, tuple[int, ...]]]:
    """(HF tensor name, index into our stacked parameter) for every tensor of a rule, in order."""
    if not rule.per_layer:
        return [(rule.hf_name, ())]
    out = []
    for pos, layer in enumerate(layer_indices(rule.path[0], cfg)):
        if rule.per_expert:
            out += [(rule.hf_name.format(i=layer, j=j), (pos, j)) for j in range(cfg.num_experts)]
        else:
            out.append((rule.hf_name.format(i=layer), (pos,)))
    return out


def hf_names(rule: Rule, cfg: ModelConfig) -> list[str]:
    """The HF tensor names a rule covers, in stacking order (layer-major, then expert)."""
    return [name for name, _ in named_slices(rule, cfg)]
