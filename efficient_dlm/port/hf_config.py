"""Hugging Face config.json -> ModelConfig, for the older and the newer transformers formats.

Older files carry `rope_theta` + `rope_scaling` ({"type" | "rope_type", "factor", ...}) and
`torch_dtype`; transformers >= 5 writes `rope_parameters` ({"rope_type", "rope_theta", ...}) and
`dtype`. Family defaults that a config.json may omit (Qwen2's always-on q/k/v bias, Qwen3's QK-norm,
untied embeddings, the class default of max_position_embeddings) are filled in here so the rest of
the code never branches on model_type. The MoE families (qwen2_moe, qwen3_moe, mixtral, glm4_moe)
add their router / expert fields through `moe_fields`, one small function per family.
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

from efficient_dlm.diffusion.spec import DiffusionSpec
from efficient_dlm.models.config import MODEL_TYPES, ModelConfig
from efficient_dlm.port.safetensors_io import CheckpointError

# model_type prefix of our dLM exports ("edlm_qwen3"): the base family's fields plus dLM fields, and the
# flags the base family implies (qk_norm, attention_bias) written out explicitly.
DLM_PREFIX = "edlm_"
# MoE fields a dLM export's config.json carries under our ModelConfig names (its modeling file reads them).
DLM_MOE_FIELDS = (
    "num_experts", "num_experts_per_tok", "moe_intermediate_size", "first_k_dense", "mlp_only_layers",
    "shared_expert_intermediate_size",
    "shared_expert_gate", "router_score", "router_norm_topk", "router_groups", "router_topk_groups",
    "routed_scaling_factor", "router_bias", "router_aux_loss_coef", "router_z_loss_coef", "router_bias_update_rate",
)

_ROPE_FIELDS = {
    "factor": "rope_factor",
    "original_max_position_embeddings": "rope_original_max_position_embeddings",
    "low_freq_factor": "rope_low_freq_factor",
    "high_freq_factor": "rope_high_freq_factor",
    "beta_fast": "rope_beta_fast",
    "beta_slow": "rope_beta_slow",
    "mscale": "rope_mscale",
    "mscale_all_dim": "rope_mscale_all_dim",
    "attention_factor": "rope_attention_factor",
    "truncate": "rope_truncate",
}


# transformers' class defaults for keys a config.json may omit (they change RoPE for dynamic / yarn).
_MAX_POSITION_DEFAULTS = {
    "llama": 2048, "mistral": 4096 * 32, "qwen2": 32768, "qwen3": 32768,
    "qwen2_moe": 32768, "qwen3_moe": 32768, "mixtral": 4096 * 32, "glm4_moe": 131072,
}


def read_config_json(directory: str) -> dict[str, Any]:
    path = os.path.join(directory, "config.json")
    if not os.path.exists(path):
        raise CheckpointError(f"{directory}: no config.json (expected a Hugging Face model directory)")
    with open(path) as f:
        try:
            hf = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{path}: invalid JSON ({err})") from None
    if not isinstance(hf, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(hf).__name__}")
    check_value_types(hf, path)
    return hf


# config.json keys that must hold integers (token ids may also be lists of integers) or numbers.
_INT_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "head_dim", "max_position_embeddings", "sliding_window", "num_experts", "num_local_experts", "n_routed_experts",
    "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size", "first_k_dense_replace",
    "n_group", "topk_group", "max_window_layers", "block_size",
)
_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "mask_token_id")
_FLOAT_KEYS = ("rms_norm_eps", "rope_theta", "routed_scaling_factor", "router_aux_loss_coef")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_value_types(hf: Mapping[str, Any], path: str) -> None:
    """A string "2" where config.json means the integer 2 is named here, not a TypeError later."""
    for key in _INT_KEYS:
        if hf.get(key) is not None and not _is_int(hf[key]):
            raise CheckpointError(f"{path}: {key} must be an integer, got {json.dumps(hf[key])}")
    for key in _ID_KEYS:
        value = hf.get(key)
        if value is not None and not _is_int(value) and not (isinstance(value, list) and all(map(_is_int, value))):
            raise CheckpointError(f"{path}: {key} must be an integer token id (or a list of them), got {json.dumps(value)}")
    for key in _FLOAT_KEYS:
        value = hf.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise CheckpointError(f"{path}: {key} must be a number, got {json.dumps(value)}")


# Families whose transformers attention rotates part of each head, and their class default (a GLM-4.5
# config.json may omit partial_rotary_factor and mean 0.5). Elsewhere transformers cannot run a factor < 1.
_PARTIAL_ROTARY_DEFAULTS = {"glm4_moe": 0.5}


def _partial_rotary_factor(hf: Mapping[str, Any], params: Mapping[str, Any], model_type: str, dlm_export: bool) -> float:
    """rope_parameters' partial_rotary_factor, else the top-level key, else the family default (transformers' order)."""
    value = params.get("partial_rotary_factor", hf.get("partial_rotary_factor"))
    if value is None:
        value = _PARTIAL_ROTARY_DEFAULTS.get(model_type, 1.0)
    if float(value) != 1.0 and not dlm_export and model_type not in _PARTIAL_ROTARY_DEFAULTS:
        raise CheckpointError(
            f"partial_rotary_factor={value} is not supported for {model_type} (transformers rotates whole heads there); "
            f"families with partial rotary embeddings: {', '.join(_PARTIAL_ROTARY_DEFAULTS)}"
        )
    return float(value)


def rope_fields(hf: Mapping[str, Any], max_positions: int, model_type: str = "llama", dlm_export: bool = False) -> dict[str, Any]:
    """Flattens rope_parameters (new) or rope_theta + rope_scaling (old) into ModelConfig fields.

    As transformers does, llama3 and yarn default original_max_position_embeddings to
    max_position_embeddings, and yarn without a factor uses their ratio.
    """
    params = dict(hf.get("rope_parameters") or {})
    legacy = dict(hf.get("rope_scaling") or {})
    params = {**legacy, **params}
    theta = params.pop("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = params.pop("rope_type", params.pop("type", "default")) or "default"
    out: dict[str, Any] = {"rope_theta": float(theta), "rope_type": rope_type}
    out["partial_rotary_factor"] = _partial_rotary_factor(hf, params, model_type, dlm_export)
    for key, value in params.items():
        if key in _ROPE_FIELDS and value is not None:
            out[_ROPE_FIELDS[key]] = value
        elif key != "partial_rotary_factor" and value is not None:
            raise CheckpointError(f"unsupported rope parameter {key!r} for rope_type {rope_type!r}")
    if rope_type in ("llama3", "yarn"):
        original = out.setdefault("rope_original_max_position_embeddings", max_positions)
        if rope_type == "yarn" and out.get("rope_factor") is None:
            out["rope_factor"] = max_positions / original
    return out


def _default_layer_types(hf: Mapping[str, Any], model_type: str, num_layers: int) -> list[str]:
    """transformers' layer_types when config.json has none: Qwen2 / Qwen3 slide from max_window_layers
    on, Qwen2-MoE slides the even layers below it."""
    first = hf.get("max_window_layers", 28)
    if model_type == "qwen2_moe":
        slides = [bool((i + 1) % 2) and i < first for i in range(num_layers)]
    else:
        slides = [i >= first for i in range(num_layers)]
    return ["sliding_attention" if s else "full_attention" for s in slides]


def sliding_window(hf: Mapping[str, Any], model_type: str, num_layers: int, dlm_export: bool = False) -> dict[str, Any]:
    """{sliding_window, full_attention_layers} as the family's transformers class applies them.

    Mistral / Mixtral / Qwen3-MoE window every layer (their classes ignore layer_types); Qwen2, Qwen3
    and Qwen2-MoE window the layers whose layer type is sliding_attention, only with
    use_sliding_window; Llama and GLM-4.5 have no sliding window. A dLM export states both fields.
    """
    window = hf.get("sliding_window") or None
    if dlm_export:
        return dict(sliding_window=window, full_attention_layers=tuple(hf.get("full_attention_layers") or ()))
    none = dict(sliding_window=None, full_attention_layers=())
    if model_type in ("llama", "glm4_moe") or window is None:
        return none
    if model_type in ("mistral", "mixtral"):
        return dict(sliding_window=int(window), full_attention_layers=())
    if not hf.get("use_sliding_window", False):
        return none
    if model_type == "qwen3_moe":
        return dict(sliding_window=int(window), full_attention_layers=())
    layer_types = hf.get("layer_types") or _default_layer_types(hf, model_type, num_layers)
    unknown = sorted(set(layer_types) - {"full_attention", "sliding_attention"})
    if unknown or len(layer_types) != num_layers:
        raise CheckpointError(
            f"layer_types {layer_types} must list full_attention / sliding_attention for each of the {num_layers} layers"
        )
    full = tuple(i for i, kind in enumerate(layer_types) if kind == "full_attention")
    return none if len(full) == num_layers else dict(sliding_window=int(window), full_attention_layers=full)


def _first_token_id(value) -> int | None:
    if isinstance(value, list):
        return value[0] if value else None
    return value


def _dense_layers(hf: Mapping[str, Any]) -> dict[str, Any]:
    """Qwen-MoE's dense-MLP layers as transformers picks them (layer i is MoE iff i is not in
    mlp_only_layers and (i + 1) % decoder_sparse_step == 0): the leading run as first_k_dense, the
    rest as mlp_only_layers."""
    layers = hf["num_hidden_layers"]
    step = hf.get("decoder_sparse_step", 1) or 1
    dense = set(hf.get("mlp_only_layers") or []) | {i for i in range(layers) if (i + 1) % step}
    leading = 0
    while leading in dense:
        leading += 1
    return dict(first_k_dense=leading, mlp_only_layers=tuple(sorted(i for i in dense if i >= leading)))


def _qwen_moe_fields(hf: Mapping[str, Any]) -> dict[str, Any]:
    return dict(
        num_experts=hf.get("num_experts") or hf.get("num_local_experts"),
        moe_intermediate_size=hf["moe_intermediate_size"],
        **_dense_layers(hf),
        router_norm_topk=bool(hf.get("norm_topk_prob", False)),
    )


def _qwen2_moe_fields(hf: Mapping[str, Any]) -> dict[str, Any]:
    shared = hf.get("shared_expert_intermediate_size") or 0
    return dict(_qwen_moe_fields(hf), shared_expert_intermediate_size=shared, shared_expert_gate=bool(shared))


def _mixtral_fields(hf: Mapping[str, Any]) -> dict[str, Any]:
    # router_jitter_noise is a training-time input perturbation of HF's trainer; it does not change the weights.
    return dict(num_experts=hf["num_local_experts"], moe_intermediate_size=hf["intermediate_size"], router_norm_topk=True)


def _glm4_moe_fields(hf: Mapping[str, Any]) -> dict[str, Any]:
    return dict(
        num_experts=hf.get("n_routed_experts") or hf.get("num_local_experts"),
        moe_intermediate_size=hf["moe_intermediate_size"],
        first_k_dense=hf.get("first_k_dense_replace", 1),
        shared_expert_intermediate_size=hf["moe_intermediate_size"] * (hf.get("n_shared_experts") or 0),
        router_score="sigmoid",
        router_norm_topk=bool(hf.get("norm_topk_prob", True)),
        router_groups=hf.get("n_group", 1),
        router_topk_groups=hf.get("topk_group", 1),
        routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
        router_bias=True,
    )


MOE_FIELDS = {
    "qwen3_moe": _qwen_moe_fields,
    "qwen2_moe": _qwen2_moe_fields,
    "mixtral": _mixtral_fields,
    "glm4_moe": _glm4_moe_fields,
}


def moe_fields(hf: Mapping[str, Any], model_type: str) -> dict[str, Any]:
    """ModelConfig MoE fields of a MoE family's config.json ({} for dense families)."""
    family = MOE_FIELDS.get(model_type)
    if family is None:
        return {}
    fields = dict(family(hf), num_experts_per_tok=hf["num_experts_per_tok"])
    if hf.get("router_aux_loss_coef") is not None:
        fields["router_aux_loss_coef"] = float(hf["router_aux_loss_coef"])
    return fields


# Families whose `attention_bias` also puts a bias on o_proj (transformers' Llama / Qwen3 / Qwen3-MoE attention).
_OUT_BIAS_FAMILIES = ("llama", "qwen3", "qwen3_moe")


def _attention_bias(hf: Mapping[str, Any], model_type: str) -> bool:
    """q/k/v projection biases: always in Qwen2, never in Mistral / Mixtral, else as configured."""
    if model_type == "qwen2":
        return True
    if model_type in ("mistral", "mixtral"):
        return False
    if model_type == "qwen2_moe":
        return bool(hf.get("qkv_bias", True))
    return bool(hf.get("attention_bias", False))


def _attention_out_bias(hf: Mapping[str, Any], model_type: str) -> bool:
    """The o_proj bias: `attention_bias` in the Llama / Qwen3 families, none elsewhere."""
    return model_type in _OUT_BIAS_FAMILIES and bool(hf.get("attention_bias", False))


# DiffusionSpec field -> its key in a dLM export's config.json (hf_config_out.dlm_config writes them).
SPEC_KEYS = {
    "mask_token_id": "mask_token_id", "valid_vocab_size": "valid_vocab_size", "block_size": "block_size",
    "attention": "training_attention", "token_shift": "token_shift", "strategy": "decoding_strategy",
    "threshold": "decoding_threshold", "tokens_per_step": "decoding_tokens_per_step", "factor": "decoding_factor",
    "entropy_bound": "decoding_entropy_bound",
}


def spec_from_hf(hf: Mapping[str, Any]) -> DiffusionSpec | None:
    """The DiffusionSpec recorded in a dLM export's config.json; None for any other config.json."""
    model_type = hf.get("model_type")
    if not (isinstance(model_type, str) and model_type.startswith(DLM_PREFIX)) or hf.get("mask_token_id") is None:
        return None
    values = {field: hf[key] for field, key in SPEC_KEYS.items() if hf.get(key) is not None}
    return DiffusionSpec.from_dict(values, where="config.json")


def model_config_from_hf(hf: Mapping[str, Any], dtype: str = "float32") -> ModelConfig:
    """ModelConfig for a Llama / Mistral / Qwen2 / Qwen3 (+ MoE variants) config.json dictionary."""
    model_type = hf.get("model_type")
    dlm_export = isinstance(model_type, str) and model_type.startswith(DLM_PREFIX)
    if dlm_export:
        model_type = model_type[len(DLM_PREFIX):]
    if model_type not in MODEL_TYPES:
        raise CheckpointError(f"unsupported model_type {model_type!r}; supported: {', '.join(MODEL_TYPES)}")
    if hf.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"unsupported hidden_act {hf['hidden_act']!r}; only silu (SwiGLU) is supported")
    if hf.get("mlp_bias"):
        raise CheckpointError("mlp_bias=True is not supported")
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads") if k not in hf]
    if missing:
        raise CheckpointError(f"config.json lacks {', '.join(missing)}")
    heads = hf["num_attention_heads"]
    max_positions = hf.get("max_position_embeddings") or _MAX_POSITION_DEFAULTS[model_type]
    fields: dict[str, Any] = dict(
        model_type=model_type,
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        max_position_embeddings=max_positions,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        attention_bias=_attention_bias(hf, model_type),
        attention_out_bias=_attention_out_bias(hf, model_type),
        qk_norm=model_type in ("qwen3", "qwen3_moe") or bool(hf.get("use_qk_norm", False)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bos_token_id=_first_token_id(hf.get("bos_token_id")),
        eos_token_id=_first_token_id(hf.get("eos_token_id")),
        pad_token_id=_first_token_id(hf.get("pad_token_id")),
        mask_token_id=hf.get("mask_token_id"),
        dtype=dtype,
        param_dtype=dtype,
    )
    fields.update(rope_fields(hf, max_positions, model_type, dlm_export))
    fields.update(sliding_window(hf, model_type, hf["num_hidden_layers"], dlm_export))
    fields.update({f: hf[f] for f in DLM_MOE_FIELDS if f in hf} if dlm_export else moe_fields(hf, model_type))
    if dlm_export:
        fields.update(
            qk_norm=bool(hf["qk_norm"]), attention_bias=bool(hf["attention_bias"]),
            attention_out_bias=bool(hf.get("attention_out_bias", False)),
        )
    try:
        return ModelConfig(**fields)
    except ValueError as err:
        raise CheckpointError(f"config.json: {err}") from None
