"""Hugging Face tensor names <-> our parameter paths, one readable table per model family.

Each rule says: this HF tensor (with `{i}` for the layer index) is that parameter of ours, seen
through this layout change. Layouts are pure views (reshape + transpose), so an importer can apply
them to a memory-mapped tensor and read only the slice a device needs; `to_hf` is the exact inverse
used by export. Per-layer rules fill the stacked "layers" axis of our parameters.
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


def _layer(name: str) -> str:
    return "model.layers.{i}." + name


DENSE_RULES: tuple[Rule, ...] = (
    Rule("model.embed_tokens.weight", ("embed_tokens",)),
    Rule(_layer("input_layernorm.weight"), ("layers", "input_norm", "scale")),
    Rule(_layer("self_attn.q_proj.weight"), ("layers", "attn", "q_proj"), HEADS_IN),
    Rule(_layer("self_attn.k_proj.weight"), ("layers", "attn", "k_proj"), HEADS_IN),
    Rule(_layer("self_attn.v_proj.weight"), ("layers", "attn", "v_proj"), HEADS_IN),
    Rule(_layer("self_attn.o_proj.weight"), ("layers", "attn", "o_proj"), HEADS_OUT),
    Rule(_layer("self_attn.q_proj.bias"), ("layers", "attn", "q_bias"), HEADS_BIAS, lambda c: c.attention_bias),
    Rule(_layer("self_attn.k_proj.bias"), ("layers", "attn", "k_bias"), HEADS_BIAS, lambda c: c.attention_bias),
    Rule(_layer("self_attn.v_proj.bias"), ("layers", "attn", "v_bias"), HEADS_BIAS, lambda c: c.attention_bias),
    Rule(_layer("self_attn.q_norm.weight"), ("layers", "attn", "q_norm", "scale"), when=lambda c: c.qk_norm),
    Rule(_layer("self_attn.k_norm.weight"), ("layers", "attn", "k_norm", "scale"), when=lambda c: c.qk_norm),
    Rule(_layer("post_attention_layernorm.weight"), ("layers", "post_attn_norm", "scale")),
    Rule(_layer("mlp.gate_proj.weight"), ("layers", "mlp", "gate_proj"), LINEAR),
    Rule(_layer("mlp.up_proj.weight"), ("layers", "mlp", "up_proj"), LINEAR),
    Rule(_layer("mlp.down_proj.weight"), ("layers", "mlp", "down_proj"), LINEAR),
    Rule("model.norm.weight", ("final_norm", "scale")),
    Rule("lm_head.weight", ("lm_head",), LINEAR, lambda c: not c.tie_word_embeddings),
)

FAMILY_RULES: dict[str, tuple[Rule, ...]] = {
    "llama": DENSE_RULES,
    "mistral": DENSE_RULES,
    "qwen2": DENSE_RULES,
    "qwen3": DENSE_RULES,
}

# Tensors some checkpoints carry that hold no parameters of ours.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def rules_for(cfg: ModelConfig) -> tuple[Rule, ...]:
    """The active rules for this config (family table filtered by the config's options)."""
    if cfg.model_type not in FAMILY_RULES:
        raise ValueError(f"no tensor-name table for model_type {cfg.model_type!r}")
    return tuple(rule for rule in FAMILY_RULES[cfg.model_type] if rule.when(cfg))


def hf_names(rule: Rule, cfg: ModelConfig) -> list[str]:
    """The HF tensor names a rule covers, in layer order."""
    if not rule.per_layer:
        return [rule.hf_name]
    return [rule.hf_name.format(i=i) for i in range(cfg.num_layers)]
