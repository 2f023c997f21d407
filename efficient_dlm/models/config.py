"""The model's architecture description: one frozen, hashable dataclass.

It is hashable because it is static structure of the NNX graph (jit caches on it) and flat because
every field must be overridable from the command line (`--config.model.rope_type=yarn`). The
`model` section of the ml_collections config is exactly `dataclasses.asdict(ModelConfig(...))`.
"""
from __future__ import annotations

import dataclasses
import numbers
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from efficient_dlm.errors import UserError

DENSE_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
MOE_FAMILIES = ("qwen2_moe", "qwen3_moe", "mixtral", "glm4_moe")
MODEL_TYPES = DENSE_FAMILIES + MOE_FAMILIES
ROUTER_SCORES = ("softmax", "sigmoid")
MOE_IMPLS = ("auto", "ragged", "gmm")
CLEAN_ROUTINGS = ("dropless", "capacity")  # training's x_0 half under capacity_factor (docs/METHOD.md section 7)
ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")
REMAT_POLICIES = ("none", "full", "dots", "dots_with_no_batch_dims", "save_qkv_proj")
ATTENTION_BACKENDS = ("auto", "xla", "splash", "pallas", "gpu")
DTYPES = ("float32", "bfloat16", "float16")
WEIGHT_QUANTIZATIONS = ("none", "int8", "fp8")
KV_QUANTIZATIONS = ("none", "int8")


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
    attention_bias: bool = False  # q/k/v projection biases (Qwen2; Llama / Qwen3 attention_bias)
    attention_out_bias: bool = False  # o_proj bias (Llama / Qwen3 / Qwen3-MoE attention_bias puts one there too)
    qk_norm: bool = False  # RMSNorm over head_dim on q and k before RoPE (Qwen3)
    tie_word_embeddings: bool = False
    sliding_window: int | None = None  # keys >= this many positions back are hidden, in every mode (models/masks.py)
    full_attention_layers: tuple[int, ...] = ()  # layers without the window (Qwen2 max_window_layers / layer_types)
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
    partial_rotary_factor: float = 1.0  # RoPE on the first int(head_dim * factor) dims of each head (GLM-4.5, Ling 2.0)
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
    # Quantized inference (models/quantize.py, models/quant_ops.py; set by `quantize_model`, recorded by a
    # quantized checkpoint). Weights: per-channel int8 / fp8 via qwix; inference only.
    quantize: str = "none"  # none | int8 | fp8: the projection weights
    quantize_activations: bool = False  # also the matmul inputs, per token, to the weights' type
    quantize_lm_head: bool = True  # the LM head (with tied embeddings: the shared table)
    quantize_embed: bool = True  # the input embedding table (per-row scales)
    quantize_kv: str = "none"  # none | int8: keys and values (per token and head), the KV cache with them
    # Mixture of experts (models/moe.py); num_experts = 0 means a dense model.
    num_experts: int = 0
    num_experts_per_tok: int = 0  # top-k
    moe_intermediate_size: int = 0  # hidden size of one routed expert
    first_k_dense: int = 0  # leading layers with a dense MLP of intermediate_size (GLM first_k_dense_replace)
    mlp_only_layers: tuple[int, ...] = ()  # further dense-MLP layers anywhere (Qwen-MoE mlp_only_layers / sparse step)
    shared_expert_intermediate_size: int = 0  # always-on shared expert(s); 0 = none
    shared_expert_gate: bool = False  # shared expert output scaled by sigmoid(x . w) (Qwen2-MoE)
    router_score: str = "softmax"  # softmax (Qwen, Mixtral) | sigmoid (DeepSeek-V3, GLM-4.5, Ling 2.0)
    router_norm_topk: bool = False  # renormalise the k selected weights to sum to 1 (HF norm_topk_prob)
    router_groups: int = 1  # experts split into groups; only the best router_topk_groups groups are eligible
    router_topk_groups: int = 1
    routed_scaling_factor: float = 1.0  # multiplies the routed experts' weights
    router_bias: bool = False  # per-expert selection bias, updated without gradients (aux-loss-free balancing)
    capacity_factor: float | None = None  # training only: expert capacity over x_t (moe_dispatch); inference is dropless
    clean_routing: str = "dropless"  # training's x_0 half: dropless (as decoding) | capacity (its own; bounded memory)
    router_aux_loss_coef: float = 0.001  # weight of the load-balancing loss in aux["moe_aux_loss"] (HF's name)
    router_z_loss_coef: float = 0.0  # weight of the router z-loss in aux["router_z_loss"]
    router_bias_update_rate: float = 0.001  # step of the aux-loss-free bias update (DeepSeek-V3's gamma)
    moe_impl: str = "auto"  # grouped matmul: ragged (jax.lax.ragged_dot), gmm (megablox), auto (ragged)

    def __post_init__(self):
        for name in ("full_attention_layers", "mlp_only_layers"):  # JSON and the CLI give lists: canonical tuples
            object.__setattr__(self, name, tuple(sorted({int(i) for i in getattr(self, name)})))
        if self.num_experts > 0:  # one spelling per architecture: a leading run of dense layers is first_k_dense
            while self.first_k_dense in self.mlp_only_layers:
                object.__setattr__(self, "first_k_dense", self.first_k_dense + 1)
            object.__setattr__(self, "mlp_only_layers", tuple(i for i in self.mlp_only_layers if i >= self.first_k_dense))
        validate(self)

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def weight_dtype(self):
        return jnp.dtype(self.param_dtype)

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def dense_mlp_layers(self) -> tuple[int, ...]:
        """Indices of a MoE model's layers with a dense MLP: the first first_k_dense and mlp_only_layers."""
        return tuple(sorted(set(range(self.first_k_dense)) | set(self.mlp_only_layers))) if self.is_moe else ()

    @property
    def num_moe_layers(self) -> int:
        """Layers with routed experts (0 for a dense model)."""
        return self.num_layers - len(self.dense_mlp_layers) if self.is_moe else 0

    @property
    def rotary_dim(self) -> int:
        """Leading dims of each head that RoPE rotates (the rest pass through), as transformers computes it."""
        return int(self.head_dim * self.partial_rotary_factor)

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
            raise UserError(f"unknown model config key(s): {', '.join(unknown)}")
        return cls(**dict(values))


_KINDS = {"int": (numbers.Integral,), "float": (numbers.Real,), "bool": (bool, np.bool_), "str": (str,)}


def _check_types(cfg: ModelConfig) -> None:
    """Each field holds its declared kind ("2" or 2.5 for an integer field is named, not a TypeError)."""
    for field in dataclasses.fields(cfg):
        value = getattr(cfg, field.name)
        kind, _, optional = str(field.type).partition(" | ")
        if value is None and optional:
            continue
        allowed = _KINDS.get(kind)
        if allowed is None:
            continue
        if isinstance(value, (bool, np.bool_)) and kind != "bool" or not isinstance(value, allowed):
            raise UserError(f"model.{field.name} must be {'an' if kind == 'int' else 'a'} {kind}, got {value!r}")


def validate(cfg: ModelConfig) -> None:
    """Raises ValueError with one line naming the first inconsistent field."""
    _check_types(cfg)
    if cfg.model_type not in MODEL_TYPES:
        raise UserError(f"unsupported model_type {cfg.model_type!r}; supported: {', '.join(MODEL_TYPES)}")
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim"):
        if getattr(cfg, name) <= 0:
            raise UserError(f"model.{name} must be positive, got {getattr(cfg, name)}")
    if cfg.num_heads % cfg.num_kv_heads:
        raise UserError(f"model.num_heads ({cfg.num_heads}) must be a multiple of model.num_kv_heads ({cfg.num_kv_heads})")
    if cfg.rope_type not in ROPE_TYPES:
        raise UserError(f"unsupported model.rope_type {cfg.rope_type!r}; supported: {', '.join(ROPE_TYPES)}")
    if cfg.rope_type != "default" and (cfg.rope_factor is None or cfg.rope_factor <= 0):
        raise UserError(f"model.rope_type {cfg.rope_type!r} needs a positive model.rope_factor, got {cfg.rope_factor}")
    if cfg.rope_type == "llama3":
        for name in ("rope_low_freq_factor", "rope_high_freq_factor", "rope_original_max_position_embeddings"):
            if getattr(cfg, name) is None:
                raise UserError(f"model.rope_type 'llama3' needs model.{name}")
    if cfg.sliding_window is not None and cfg.sliding_window <= 0:
        raise UserError(f"model.sliding_window must be positive or None, got {cfg.sliding_window}")
    for name in ("full_attention_layers", "mlp_only_layers"):
        bad = [i for i in getattr(cfg, name) if not 0 <= i < cfg.num_layers]
        if bad:
            raise UserError(f"model.{name} holds layer {bad[0]}, outside 0..{cfg.num_layers - 1}")
    if cfg.full_attention_layers and cfg.sliding_window is None:
        raise UserError("model.full_attention_layers exempts layers from a window: set model.sliding_window too")
    if cfg.head_dim % 2:
        raise UserError(f"model.head_dim must be even for RoPE, got {cfg.head_dim}")
    if not 0 < cfg.partial_rotary_factor <= 1 or cfg.rotary_dim < 2 or cfg.rotary_dim % 2:
        raise UserError(
            f"model.partial_rotary_factor {cfg.partial_rotary_factor} must be in (0, 1] and rotate an even number "
            f"(>= 2) of the head_dim {cfg.head_dim} dims, got {cfg.rotary_dim}"
        )
    for name in ("dtype", "param_dtype"):
        if getattr(cfg, name) not in DTYPES:
            raise UserError(f"unknown model.{name} {getattr(cfg, name)!r}; choose one of {', '.join(DTYPES)}")
    if cfg.remat_policy not in REMAT_POLICIES:
        raise UserError(f"unknown model.remat_policy {cfg.remat_policy!r}; choose one of {', '.join(REMAT_POLICIES)}")
    if cfg.attention_backend not in ATTENTION_BACKENDS:
        raise UserError(
            f"unknown model.attention_backend {cfg.attention_backend!r}; choose one of {', '.join(ATTENTION_BACKENDS)}"
        )
    if cfg.mask_token_id is not None and not 0 <= cfg.mask_token_id < cfg.vocab_size:
        raise UserError(f"model.mask_token_id {cfg.mask_token_id} is outside the vocabulary (size {cfg.vocab_size})")
    for name in ("eos_token_id", "pad_token_id"):
        if cfg.mask_token_id is not None and cfg.mask_token_id == getattr(cfg, name):
            raise UserError(f"model.mask_token_id {cfg.mask_token_id} equals model.{name}; [MASK] must be a token of its own")
    _validate_moe(cfg)
    _validate_quantization(cfg)


def _validate_quantization(cfg: ModelConfig) -> None:
    if cfg.quantize not in WEIGHT_QUANTIZATIONS:
        raise UserError(f"unknown model.quantize {cfg.quantize!r}; choose one of {', '.join(WEIGHT_QUANTIZATIONS)}")
    if cfg.quantize_kv not in KV_QUANTIZATIONS:
        raise UserError(f"unknown model.quantize_kv {cfg.quantize_kv!r}; choose one of {', '.join(KV_QUANTIZATIONS)}")
    if cfg.quantize_activations and cfg.quantize == "none":
        raise UserError("model.quantize_activations quantizes matmul inputs to the weights' type: set model.quantize too")
    if cfg.quantize_activations and cfg.is_moe:
        raise UserError("model.quantize_activations is not supported for MoE models (the routed experts run weight-only)")
    if cfg.quantize != "none" and cfg.tie_word_embeddings and cfg.quantize_lm_head != cfg.quantize_embed:
        raise UserError(
            "model.quantize_lm_head and model.quantize_embed must agree for a model with tied embeddings "
            "(one table serves both)"
        )


def _validate_moe(cfg: ModelConfig) -> None:
    if cfg.model_type in DENSE_FAMILIES:
        if cfg.num_experts or cfg.first_k_dense or cfg.mlp_only_layers:
            raise UserError(
                f"model.num_experts, model.first_k_dense and model.mlp_only_layers must be unset for the dense "
                f"model_type {cfg.model_type!r} (MoE families: {', '.join(MOE_FAMILIES)})"
            )
        return
    if cfg.num_experts <= 0:
        raise UserError(f"model.num_experts must be positive for the MoE model_type {cfg.model_type!r}")
    if not 0 < cfg.num_experts_per_tok <= cfg.num_experts:
        raise UserError(f"model.num_experts_per_tok must be in 1..{cfg.num_experts}, got {cfg.num_experts_per_tok}")
    if cfg.moe_intermediate_size <= 0:
        raise UserError(f"model.moe_intermediate_size must be positive, got {cfg.moe_intermediate_size}")
    if cfg.num_moe_layers <= 0:
        raise UserError(
            f"model.first_k_dense ({cfg.first_k_dense}) and model.mlp_only_layers leave no MoE layer of {cfg.num_layers}"
        )
    if not 0 <= cfg.first_k_dense < cfg.num_layers:
        raise UserError(f"model.first_k_dense must be in 0..{cfg.num_layers - 1} (at least one MoE layer), got {cfg.first_k_dense}")
    if cfg.shared_expert_intermediate_size < 0:
        raise UserError(f"model.shared_expert_intermediate_size must be >= 0, got {cfg.shared_expert_intermediate_size}")
    if cfg.shared_expert_gate and not cfg.shared_expert_intermediate_size:
        raise UserError("model.shared_expert_gate needs a shared expert (model.shared_expert_intermediate_size > 0)")
    if cfg.router_score not in ROUTER_SCORES:
        raise UserError(f"unknown model.router_score {cfg.router_score!r}; choose one of {', '.join(ROUTER_SCORES)}")
    if cfg.router_groups <= 0 or cfg.num_experts % cfg.router_groups:
        raise UserError(f"model.router_groups ({cfg.router_groups}) must divide model.num_experts ({cfg.num_experts})")
    if not 0 < cfg.router_topk_groups <= cfg.router_groups:
        raise UserError(f"model.router_topk_groups must be in 1..{cfg.router_groups}, got {cfg.router_topk_groups}")
    eligible = cfg.router_topk_groups * (cfg.num_experts // cfg.router_groups)
    if cfg.num_experts_per_tok > eligible:
        raise UserError(
            f"model.num_experts_per_tok ({cfg.num_experts_per_tok}) exceeds the {eligible} experts in "
            f"model.router_topk_groups ({cfg.router_topk_groups}) groups"
        )
    if cfg.capacity_factor is not None and cfg.capacity_factor <= 0:
        raise UserError(f"model.capacity_factor must be positive (or unset for dropless routing), got {cfg.capacity_factor}")
    if cfg.clean_routing not in CLEAN_ROUTINGS:
        raise UserError(f"unknown model.clean_routing {cfg.clean_routing!r}; choose one of {', '.join(CLEAN_ROUTINGS)}")
    for name in ("router_aux_loss_coef", "router_z_loss_coef", "router_bias_update_rate"):
        if getattr(cfg, name) < 0:
            raise UserError(f"model.{name} must be >= 0, got {getattr(cfg, name)}")
    if cfg.moe_impl not in MOE_IMPLS:
        raise UserError(f"unknown model.moe_impl {cfg.moe_impl!r}; choose one of {', '.join(MOE_IMPLS)}")
