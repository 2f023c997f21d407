"""The building blocks of the dense decoder: RMSNorm, GQA self-attention, SwiGLU MLP, one layer.

Weights are declared with their shapes and logical axis names side by side (tunix style) and used
through einsums, so a reader sees `[embed, heads, head_dim]` where the parameter is born and the
sharding rules in parallel/rules.py place it. Parameters are stored in `param_dtype` and cast to the
compute `dtype` at use (fp32 master weights with bf16 compute). `project` (models/lora.py) runs each
weight einsum through models/quant_ops.py, which also serves weights quantized by models/quantize.py.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from efficient_dlm.models import quant_ops
from efficient_dlm.models.config import ModelConfig
from efficient_dlm.models.lora import project
from efficient_dlm.models.rope import apply_rope
from efficient_dlm.parallel.rules import constrain

_weight_init = jax.nn.initializers.normal(stddev=0.02)

# attend(q, k, v, layer_cache) -> attention output [B, T, H, D]; built by the decoder per call mode.
AttendFn = Callable[[jax.Array, jax.Array, jax.Array, object], jax.Array]


def param(rngs: nnx.Rngs, cfg: ModelConfig, shape: tuple[int, ...], axes: tuple[str, ...], init=_weight_init) -> nnx.Param:
    """A parameter of `shape` whose logical axis names are `axes` (one per dimension)."""
    assert len(shape) == len(axes), (shape, axes)
    return nnx.Param(init(rngs.params(), shape, cfg.weight_dtype), out_sharding=axes, eager_sharding=False)


def ones(key, shape, dtype):
    return jnp.ones(shape, dtype)


def zeros(key, shape, dtype):
    return jnp.zeros(shape, dtype)


class RMSNorm(nnx.Module):
    """y = scale * x / rms(x), computed in float32 and cast back, as Llama / Qwen in transformers."""

    def __init__(self, cfg: ModelConfig, dim: int, *, rngs: nnx.Rngs):
        self.eps = cfg.rms_norm_eps
        self.scale = param(rngs, cfg, (dim,), ("norm",), ones)

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = x.dtype
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(dtype) * x32.astype(dtype)


class Attention(nnx.Module):
    """Grouped-query attention with optional q/k/v bias (Qwen2), o bias (Llama / Qwen3 attention_bias)
    and per-head QK RMSNorm (Qwen3)."""

    # Each projection's einsum; models/lora.py derives an adapter's A and B from it (models/adapters.py).
    LORA_PROJECTIONS = {"q_proj": "bte,ehd->bthd", "k_proj": "bte,ehd->bthd", "v_proj": "bte,ehd->bthd",
                        "o_proj": "bthd,hde->bte"}

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        e, h, kv, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = param(rngs, cfg, (e, h, d), ("embed", "heads", "head_dim"))
        self.k_proj = param(rngs, cfg, (e, kv, d), ("embed", "kv_heads", "head_dim"))
        self.v_proj = param(rngs, cfg, (e, kv, d), ("embed", "kv_heads", "head_dim"))
        self.o_proj = param(rngs, cfg, (h, d, e), ("heads", "head_dim", "embed"))
        if cfg.attention_bias:
            self.q_bias = param(rngs, cfg, (h, d), ("heads", "head_dim"), zeros)
            self.k_bias = param(rngs, cfg, (kv, d), ("kv_heads", "head_dim"), zeros)
            self.v_bias = param(rngs, cfg, (kv, d), ("kv_heads", "head_dim"), zeros)
        if cfg.attention_out_bias:
            self.o_bias = param(rngs, cfg, (e,), ("embed",), zeros)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg, d, rngs=rngs)
            self.k_norm = RMSNorm(cfg, d, rngs=rngs)

    def project(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """q [B, T, H, D], k and v [B, T, Hkv, D] after bias, QK-norm and RoPE."""
        dt = self.cfg.compute_dtype
        eq = self.LORA_PROJECTIONS
        q, k, v = (project(self, name, eq[name], x, dt) for name in ("q_proj", "k_proj", "v_proj"))
        if self.cfg.attention_bias:
            q = q + self.q_bias[...].astype(dt)
            k = k + self.k_bias[...].astype(dt)
            v = v + self.v_bias[...].astype(dt)
        if self.cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = checkpoint_name(apply_rope(q, cos, sin), "query_proj")
        k = checkpoint_name(apply_rope(k, cos, sin), "key_proj")
        v = checkpoint_name(v, "value_proj")
        q = constrain(q, ("batch", "length", "act_heads", "head_dim"))
        k = constrain(k, ("batch", "length", "act_kv_heads", "head_dim"))
        v = constrain(v, ("batch", "length", "act_kv_heads", "head_dim"))
        return q, k, v

    def output(self, attn: jax.Array) -> jax.Array:
        dt = self.cfg.compute_dtype
        out = project(self, "o_proj", self.LORA_PROJECTIONS["o_proj"], attn, dt)
        return out + self.o_bias[...].astype(dt) if self.cfg.attention_out_bias else out


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    LORA_PROJECTIONS = {"gate_proj": "bte,em->btm", "up_proj": "bte,em->btm", "down_proj": "btm,me->bte"}

    def __init__(self, cfg: ModelConfig, intermediate_size: int, *, rngs: nnx.Rngs):
        self.cfg = cfg
        e, m = cfg.hidden_size, intermediate_size
        self.gate_proj = param(rngs, cfg, (e, m), ("embed", "mlp"))
        self.up_proj = param(rngs, cfg, (e, m), ("embed", "mlp"))
        self.down_proj = param(rngs, cfg, (m, e), ("mlp", "embed"))

    def __call__(self, x: jax.Array) -> jax.Array:
        dt = self.cfg.compute_dtype
        eq = self.LORA_PROJECTIONS
        gate = project(self, "gate_proj", eq["gate_proj"], x, dt)
        up = project(self, "up_proj", eq["up_proj"], x, dt)
        hidden = constrain(jax.nn.silu(gate) * up, ("batch", "length", "act_mlp"))
        return project(self, "down_proj", eq["down_proj"], hidden, dt)


class DecoderLayer(nnx.Module):
    """Pre-norm transformer layer. Returns the new residual stream and this layer's (k, v)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.input_norm = RMSNorm(cfg, cfg.hidden_size, rngs=rngs)
        self.attn = Attention(cfg, rngs=rngs)
        self.post_attn_norm = RMSNorm(cfg, cfg.hidden_size, rngs=rngs)
        self.mlp = MLP(cfg, cfg.intermediate_size, rngs=rngs)

    def __call__(self, x, cos, sin, attend: AttendFn, layer_cache=None):
        q, k, v = self.attn.project(self.input_norm(x), cos, sin)
        k, v, kv = quant_ops.kv_round_trip(k, v, self.attn.cfg.quantize_kv != "none")
        x = x + self.attn.output(attend(q, k, v, layer_cache))
        x = x + self.mlp(self.post_attn_norm(x))
        x = constrain(x, ("batch", "length", "act_embed"))
        return x, kv, {}
