"""Post-training quantization of a Decoder for inference: per-channel int8 / fp8 weights, optionally int8
activations and an int8 KV cache, on qwix.

Why not qwix's model-level PTQ (`qwix.quantize_model` with a `PtqProvider`): it intercepts jnp.einsum
during a first call and swaps the matched nnx.Param of the *current* module for a quantized one. Our
layers are stacked along a leading "layers" axis and run inside `lax.scan` over per-layer copies made
by nnx.merge, so the parameter it finds in the scan body has no layers axis (qwix asserts on the
sharding metadata: shape (E, H, D) vs ('layers', 'embed', 'heads', 'head_dim')) and a replacement made
there would never reach the stacked model. So this module quantizes the stacked parameters directly
with `qwix.quantize` and stores each `QArray` as its nnx.Param's value: orbax saves and restores it,
the sharding rules lay out its values and scales (parallel/sharding.py), and the layers compute with
qwix through models/quant_ops.py.

Scales are per output channel: one per index of every axis a weight is not contracted over in its
einsum (the `CONTRACTED` table below), so per layer, per expert, per head and feature. The embedding
table [vocab, embed] gets one scale per row, which is per channel for the (tied) LM head as well.
Norms, biases, the router and the shared-expert gate stay float (tiny, and routing is sensitive).
"""
from __future__ import annotations

import dataclasses

import jax
import qwix
from flax import nnx

from efficient_dlm.errors import UserError
from efficient_dlm.models.config import KV_QUANTIZATIONS, WEIGHT_QUANTIZATIONS, ModelConfig
from efficient_dlm.models.decoder import MODEL_STATE, abstract_model
from efficient_dlm.models.quant_ops import QTYPES, SCALE_DTYPE, is_quantized
from efficient_dlm.models.routers import ExpertBias

# Quantized weights by parameter name -> the logical axes their einsum contracts (models/layers.py, moe.py, decoder.py).
CONTRACTED = {
    "q_proj": ("embed",), "k_proj": ("embed",), "v_proj": ("embed",), "o_proj": ("heads", "head_dim"),
    "gate_proj": ("embed",), "up_proj": ("embed",), "down_proj": ("mlp",),
    "lm_head": ("embed",), "embed_tokens": ("embed",),
}
FIELDS = ("quantize", "quantize_activations", "quantize_lm_head", "quantize_embed", "quantize_kv")


@dataclasses.dataclass(frozen=True)
class Quantization:
    """What to quantize (the ModelConfig fields of the same names, docs/METHOD.md section on quantization)."""

    quantize: str = "none"
    quantize_activations: bool = False
    quantize_lm_head: bool = True
    quantize_embed: bool = True
    quantize_kv: str = "none"

    @classmethod
    def of(cls, cfg: ModelConfig) -> "Quantization":
        return cls(**{name: getattr(cfg, name) for name in FIELDS})

    @property
    def active(self) -> bool:
        return self.quantize != "none" or self.quantize_kv != "none"

    def describe(self) -> str:
        if not self.active:
            return "none"
        parts = [f"weights {self.quantize}" + (" + activations" if self.quantize_activations else "")] if self.quantize != "none" else []
        if self.quantize != "none":
            parts.append("lm_head " + ("quantized" if self.quantize_lm_head else "float"))
            parts.append("embed " + ("quantized" if self.quantize_embed else "float"))
        if self.quantize_kv != "none":
            parts.append(f"kv {self.quantize_kv}")
        return ", ".join(parts)


def check_quantization(q: Quantization, where: str | None = None) -> None:
    """One line naming the bad key (`where.key` for a config section, the argument name otherwise)."""
    key = (lambda name: f"{where}.{name}") if where else (lambda name: name)  # noqa: E731
    if q.quantize not in WEIGHT_QUANTIZATIONS:
        raise UserError(f"{key('quantize')} must be one of {', '.join(WEIGHT_QUANTIZATIONS)}, got {q.quantize!r}")
    if q.quantize_kv not in KV_QUANTIZATIONS:
        raise UserError(f"{key('quantize_kv')} must be one of {', '.join(KV_QUANTIZATIONS)}, got {q.quantize_kv!r}")
    for name in ("quantize_activations", "quantize_lm_head", "quantize_embed"):
        if not isinstance(getattr(q, name), bool):
            raise UserError(f"{key(name)} must be true or false, got {getattr(q, name)!r}")
    if q.quantize_activations and q.quantize == "none":
        raise UserError(f"{key('quantize_activations')} quantizes matmul inputs to the weights' type: set {key('quantize')} too")


def _quantized_names(cfg: ModelConfig) -> set[str]:
    names = set(CONTRACTED) - {"lm_head", "embed_tokens"}
    if cfg.quantize_lm_head:
        names.add("embed_tokens" if cfg.tie_word_embeddings else "lm_head")
    if cfg.quantize_embed:
        names.add("embed_tokens")
    return names


def quantize_weight(value: jax.Array, logical_axes: tuple[str, ...], name: str, qtype) -> qwix.QArray:
    """qwix per-channel quantization: a scale (float32) per index of every non-contracted axis."""
    channels = tuple(i for i, axis in enumerate(logical_axes) if axis not in CONTRACTED[name])
    return qwix.quantize(value, qtype, channelwise_axes=channels, scale_dtype=SCALE_DTYPE)


def quantize_params(params: nnx.State, cfg: ModelConfig) -> nnx.State:
    """The nnx.Param state with the weights `cfg` quantizes replaced by QArrays (a pure function: jit it,
    or eval_shape it for the abstract structure of a quantized checkpoint)."""
    if cfg.quantize == "none":
        return params
    qtype, names = QTYPES[cfg.quantize], _quantized_names(cfg)
    out = []
    for path, variable in nnx.to_flat_state(params):
        value = variable.get_value()
        if path[-1] in names and not is_quantized(value):
            variable = variable.replace(quantize_weight(value, variable.get_metadata()["out_sharding"], path[-1], qtype))
        out.append((path, variable))
    return nnx.from_flat_state(out)


def quantized_config(cfg: ModelConfig, q: Quantization) -> ModelConfig:
    """cfg with quantization `q`, refusing to change an existing quantization (its float weights are gone)."""
    check_quantization(q)
    current = Quantization.of(cfg)
    stored = ("quantize", "quantize_lm_head", "quantize_embed")  # what the weights are; the rest is computation
    if current.quantize != "none" and any(getattr(current, name) != getattr(q, name) for name in stored):
        raise UserError(
            f"the model's weights are already quantized ({current.describe()}); they cannot be re-quantized as "
            f"{q.describe()} (quantize the float checkpoint instead)"
        )
    return cfg.replace(**dataclasses.asdict(q))


def quantize_with(model, q: Quantization):
    """A new Decoder: `model`'s weights quantized per `q` (qwix, per channel), its config recording `q`,
    its DiffusionSpec (`spec`) carried over. The float model is left as it is. An abstract model
    (ShapeDtypeStruct leaves, for `edlm aot`) gives the abstract quantized model."""
    cfg = quantized_config(model.config, q)
    if cfg == model.config:
        return model
    params = nnx.state(model, nnx.Param)
    if model.config.quantize == "none":  # (already quantized weights: only the computation settings change)
        abstract = any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(params))
        quantized = lambda p: quantize_params(p, cfg)  # noqa: E731
        params = jax.eval_shape(quantized, params) if abstract else jax.jit(quantized)(params)
    fresh = abstract_model(cfg)
    nnx.update(fresh, params, nnx.state(model, ExpertBias))
    if hasattr(model, "spec"):
        fresh.spec = model.spec
    return fresh


def quantize_model(model, quantize: str | None = None, quantize_activations: bool = False,
                       quantize_lm_head: bool = True, quantize_embed: bool = True, quantize_kv: str | None = None):
    """`model` quantized as asked: quantize (weights) / quantize_kv None keep the model's own setting, so
    an already quantized model passes unchanged; the other keys apply with new quantized weights."""
    if quantize is None and quantize_kv is None:
        return model
    current = Quantization.of(model.config)
    if quantize is None:
        q = dataclasses.replace(current, quantize_kv=quantize_kv)
    else:
        q = Quantization(quantize, quantize_activations, quantize_lm_head, quantize_embed,
                         current.quantize_kv if quantize_kv is None else quantize_kv)
    return quantize_with(model, q)


def abstract_quantized_state(cfg: ModelConfig) -> tuple[nnx.Module, nnx.State]:
    """(abstract Decoder of a quantized `cfg`, its MODEL_STATE with ShapeDtypeStruct leaves): the restore
    target of a quantized checkpoint, so loading one never materialises the float weights."""
    model = abstract_model(cfg)
    params = jax.eval_shape(lambda p: quantize_params(p, cfg), nnx.state(model, nnx.Param))
    nnx.update(model, params)
    return model, nnx.state(model, MODEL_STATE)
