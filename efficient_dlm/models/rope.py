"""Rotary position embeddings with the rope_scaling variants of Hugging Face checkpoints.

The inverse-frequency formulas follow `transformers.modeling_rope_utils` exactly (that is what the
parity tests check), computed in float32 NumPy at trace time as transformers does in torch, except
for `dynamic`, whose base depends on the sequence length and is therefore computed on device.

Dynamic NTK scaling reads one length per row, `rope_length`, never the chunk's largest position:
transformers rescales from max(position_ids) + 1 of each forward call, so padding positions and, in
cached generation, the growth of the sequence change the frequencies between a key's write and a
later query's read. Here a training or scoring forward uses the row's longest real position + 1
(padding excluded), and a generation fixes the row's final length (prompt + max_new_tokens) in its
KV cache (models/cache.py), so cached keys and every later query share one set of frequencies and a
cached generation computes what a forward over its finished sequence would. Partial rotary embeddings (`partial_rotary_factor` < 1, GLM-4.5 / Ling 2.0) rotate only the
first `cfg.rotary_dim` dims of each head, with the frequencies of a head of that size, and pass the
rest through unchanged (transformers' Glm4Moe `apply_rotary_pos_emb`, rotate_half convention).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from efficient_dlm.models.config import ModelConfig


def _base_inv_freq(dim: int, base: float) -> np.ndarray:
    return 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))


def _llama3_inv_freq(cfg: ModelConfig, inv_freq: np.ndarray) -> np.ndarray:
    factor, low, high = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    old_len = cfg.rope_original_max_position_embeddings
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(cfg: ModelConfig, dim: int) -> tuple[np.ndarray, float]:
    base, factor = cfg.rope_theta, cfg.rope_factor
    orig = cfg.rope_original_max_position_embeddings or cfg.max_position_embeddings
    attention_factor = cfg.rope_attention_factor
    if attention_factor is None:
        if cfg.rope_mscale and cfg.rope_mscale_all_dim:
            attention_factor = _yarn_mscale(factor, cfg.rope_mscale) / _yarn_mscale(factor, cfg.rope_mscale_all_dim)
        else:
            attention_factor = _yarn_mscale(factor)
    beta_fast, beta_slow = cfg.rope_beta_fast or 32, cfg.rope_beta_slow or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if cfg.rope_truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (np.arange(0, dim, 2, dtype=np.float32) / dim)
    extrapolation_weight = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation_weight) + (1.0 / pos_freqs) * extrapolation_weight
    return inv_freq.astype(np.float32), float(attention_factor)


def inv_frequencies(cfg: ModelConfig, rope_length: jax.Array | None = None) -> tuple[jax.Array, float]:
    """Returns (inv_freq [rotary_dim // 2], or [batch, rotary_dim // 2] for `dynamic`, attention_factor).

    `rope_length` ([batch] int, traced) is only read by `dynamic`, which, like HF, rescales the base
    when the sequence length exceeds max_position_embeddings and uses plain RoPE otherwise.
    """
    dim = cfg.rotary_dim
    if cfg.rope_type == "default":
        return jnp.asarray(_base_inv_freq(dim, cfg.rope_theta)), 1.0
    if cfg.rope_type == "linear":
        return jnp.asarray(_base_inv_freq(dim, cfg.rope_theta) / cfg.rope_factor), 1.0
    if cfg.rope_type == "llama3":
        return jnp.asarray(_llama3_inv_freq(cfg, _base_inv_freq(dim, cfg.rope_theta))), 1.0
    if cfg.rope_type == "yarn":
        inv_freq, attention_factor = _yarn(cfg, dim)
        return jnp.asarray(inv_freq), attention_factor
    if cfg.rope_type == "dynamic":
        plain = jnp.asarray(_base_inv_freq(dim, cfg.rope_theta))
        if rope_length is None:
            return plain, 1.0
        seq_len = jnp.asarray(rope_length, jnp.float32)[:, None]
        limit = float(cfg.max_position_embeddings)
        factor = cfg.rope_factor
        base = cfg.rope_theta * ((factor * jnp.maximum(seq_len, limit) / limit) - (factor - 1)) ** (dim / (dim - 2))
        scaled = 1.0 / (base ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
        return jnp.where(seq_len > limit, scaled, plain), 1.0
    raise ValueError(f"unsupported rope_type {cfg.rope_type!r}")


def rope_tables(cfg: ModelConfig, positions: jax.Array, rope_length: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """cos and sin tables [batch, length, rotary_dim] in float32 for integer `positions` [batch, length].

    `rope_length` [batch]: the sequence length each row's dynamic scale is computed for (module
    docstring); a dynamic config needs it, other rope types ignore it.
    """
    if cfg.rope_type == "dynamic" and rope_length is None:
        raise ValueError("dynamic RoPE needs rope_length, the row's sequence length (see models/rope.py)")
    inv_freq, attention_factor = inv_frequencies(cfg, rope_length)
    if inv_freq.ndim == 2:
        inv_freq = inv_freq[:, None, :]  # per row
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles) * attention_factor, jnp.sin(angles) * attention_factor


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates the first cos.shape[-1] dims of x [batch, length, heads, head_dim] (HF's rotate_half
    convention) in float32; the remaining dims pass through."""
    dtype = x.dtype
    x = x.astype(jnp.float32)
    dim = cos.shape[-1]
    x_rot, x_pass = x[..., :dim], x[..., dim:]
    half = dim // 2
    rotated = jnp.concatenate([-x_rot[..., half:], x_rot[..., :half]], axis=-1)
    out = x_rot * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    if x_pass.shape[-1]:
        out = jnp.concatenate([out, x_pass], axis=-1)
    return out.astype(dtype)
