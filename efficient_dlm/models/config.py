"""The model's architecture description: one frozen, hashable dataclass.

It is hashable because it is static structure of the NNX graph (jit caches on it) and flat because
every field must be overridable from the command line (`--config.model.rope_type=yarn`). The
`model` section of the ml_collections config is exactly `dataclasses.asdict(ModelConfig(...))`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp

DENSE_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
MODEL_TYPES = DENSE_FAMILIES
ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")
REMAT_POLICIES = ("none", "full", "dots", "dots_with_no_batch_dims", "save_qkv_proj")
ATTENTION_BACKENDS = ("auto", "xla", "splash", "pallas", "gpu")
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Decoder-only transformer (Llama / Mistral / Qwen2 / Qwen3 family and their MoE variants)."""

    model_type: str = "qwen3"
    vocab_size: int = 256
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    attention_bias: bool = False  # q/k/v projection biases (Qwen2)
    qk_norm: bool = False  # RMSNorm over head_dim on q and k before RoPE (Qwen3)
    tie_word_embeddings: bool = False
    sliding_window: int | None = None  # causal mode only (Mistral v0.1)
    # RoPE, flattened from HF's rope_parameters / rope_scaling. None means "not set".
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_factor: float | None = None
    rope_original_max_position_embeddings: int | None = None
    rope_low_freq_factor: float | None = None  # llama3
    rope_high_freq_factor: float | None = None  # llama3
    rope_beta_fast: float | None = None  # yarn
    rope_beta_slow: float | None = None  # yarn
    rope_mscale: float | None = None  # yarn
    rope_mscale_all_dim: float | None = None  # yarn
    rope_attention_factor: float | None = None  # yarn
    rope_truncate: bool = True  # yarn
    # Special tokens. mask_token_id is what the dLM learns to fill; None for a plain AR model.
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    mask_token_id: int | None = None
    # Numerics and memory.
    dtype: str = "float32"  # activations / matmul inputs
    param_dtype: str = "float32"  # stored (master) weights
    remat_policy: str = "none"
    attention_backend: str = "auto"
    scan_layers: bool = True

    def __post_init__(self):
        validate(self)

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def weight_dtype(self):
        return jnp.dtype(self.param_dtype)

    @property
    def num_query_groups(self) -> int:
        return self.num_heads // self.num_kv_heads

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "ModelConfig":
        """Builds from a mapping (ConfigDict section or JSON), naming any unknown key."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown model config key(s): {', '.join(unknown)}")
        return cls(**dict(values))


def validate(cfg: ModelConfig) -> None:
    """Raises ValueError with one line naming the first inconsistent field."""
    if cfg.model_type not in MODEL_TYPES:
        raise ValueError(f"unsupported model_type {cfg.model_type!r}; supported: {', '.join(MODEL_TYPES)}")
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim"):
        if getattr(cfg, name) <= 0:
            raise ValueError(f"model.{name} must be positive, got {getattr(cfg, name)}")
    if cfg.num_heads % cfg.num_kv_heads:
        raise ValueError(f"model.num_heads ({cfg.num_heads}) must be a multiple of model.num_kv_heads ({cfg.num_kv_heads})")
    if cfg.rope_type not in ROPE_TYPES:
        raise ValueError(f"unsupported model.rope_type {cfg.rope_type!r}; supported: {', '.join(ROPE_TYPES)}")
    if cfg.rope_type != "default" and (cfg.rope_factor is None or cfg.rope_factor <= 0):
        raise ValueError(f"model.rope_type {cfg.rope_type!r} needs a positive model.rope_factor, got {cfg.rope_factor}")
    if cfg.rope_type == "llama3":
        for name in ("rope_low_freq_factor", "rope_high_freq_factor", "rope_original_max_position_embeddings"):
            if getattr(cfg, name) is None:
                raise ValueError(f"model.rope_type 'llama3' needs model.{name}")
    if cfg.sliding_window is not None and cfg.sliding_window <= 0:
        raise ValueError(f"model.sliding_window must be positive or None, got {cfg.sliding_window}")
    if cfg.head_dim % 2:
        raise ValueError(f"model.head_dim must be even for RoPE, got {cfg.head_dim}")
    for name in ("dtype", "param_dtype"):
        if getattr(cfg, name) not in DTYPES:
            raise ValueError(f"unknown model.{name} {getattr(cfg, name)!r}; choose one of {', '.join(DTYPES)}")
    if cfg.remat_policy not in REMAT_POLICIES:
        raise ValueError(f"unknown model.remat_policy {cfg.remat_policy!r}; choose one of {', '.join(REMAT_POLICIES)}")
    if cfg.attention_backend not in ATTENTION_BACKENDS:
        raise ValueError(
            f"unknown model.attention_backend {cfg.attention_backend!r}; choose one of {', '.join(ATTENTION_BACKENDS)}"
        )
    if cfg.mask_token_id is not None and not 0 <= cfg.mask_token_id < cfg.vocab_size:
        raise ValueError(f"model.mask_token_id {cfg.mask_token_id} is outside the vocabulary (size {cfg.vocab_size})")
