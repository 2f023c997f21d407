"""ModelConfig -> Hugging Face config.json / generation_config.json (the inverse of hf_config.py).

Two formats:
- AR: the original architecture's own config.json (model_type "qwen3", "llama", ...), so a model that
  was only ported (HF -> efficient_dlm -> HF) comes back as the same transformers model.
- dLM: the same architecture fields under model_type "edlm_<base>", plus the block-diffusion fields
  (mask token, block size, attention pattern, token shift, default decoding) and an `auto_map` to the
  modeling files shipped next to the weights (port/modeling/), loaded with trust_remote_code=True.
Fields are written in the transformers >= 5 format (`rope_parameters`, `dtype`); hf_config.py reads
both this and the older format.
"""
from __future__ import annotations

from typing import Any

from efficient_dlm.diffusion.spec import DiffusionSpec
from efficient_dlm.errors import UserError
from efficient_dlm.models.config import ModelConfig
from efficient_dlm.port.hf_config import _OUT_BIAS_FAMILIES, _ROPE_FIELDS, DLM_MOE_FIELDS, DLM_PREFIX, SPEC_KEYS

ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "glm4_moe": "Glm4MoeForCausalLM",
}
# What each family's config.json cannot express (the importer derives it from model_type). Our
# attention_bias is q/k/v bias only: Qwen2(-MoE) and GLM-4.5 have exactly that, while Llama / Qwen3
# "attention_bias" is q/k/v and o bias together (checked in check_expressible).
_SOFTMAX_ROUTER = dict(router_score="softmax", router_groups=1, router_topk_groups=1, routed_scaling_factor=1.0, router_bias=False)
_IMPLIED = {
    "llama": dict(qk_norm=False),
    "mistral": dict(qk_norm=False, attention_bias=False),
    "qwen2": dict(qk_norm=False, attention_bias=True),
    "qwen3": dict(qk_norm=True),
    "qwen3_moe": dict(qk_norm=True, shared_expert_intermediate_size=0, **_SOFTMAX_ROUTER),
    "qwen2_moe": dict(qk_norm=False, **_SOFTMAX_ROUTER),
    "mixtral": dict(qk_norm=False, attention_bias=False, router_norm_topk=True, first_k_dense=0, shared_expert_intermediate_size=0, **_SOFTMAX_ROUTER),
    "glm4_moe": dict(router_score="sigmoid", router_bias=True, shared_expert_gate=False),
}
AUTO_MAP = {
    "AutoConfig": "configuration_edlm.EdlmConfig",
    "AutoModel": "modeling_edlm.EdlmModel",
    "AutoModelForCausalLM": "modeling_edlm.EdlmForDiffusionLM",
}


def rope_parameters(cfg: ModelConfig) -> dict[str, Any]:
    out: dict[str, Any] = {"rope_type": cfg.rope_type, "rope_theta": cfg.rope_theta}
    if cfg.partial_rotary_factor != 1.0 or cfg.model_type == "glm4_moe":  # GLM's class default is 0.5: always say it
        out["partial_rotary_factor"] = cfg.partial_rotary_factor
    for hf_key, field in _ROPE_FIELDS.items():
        value = getattr(cfg, field)
        if field == "rope_truncate":  # a yarn option whose default is True: write it only when it matters
            if cfg.rope_type == "yarn" and not value:
                out[hf_key] = False
        elif value is not None:
            out[hf_key] = value
    return out


def architecture_fields(cfg: ModelConfig, dtype: str) -> dict[str, Any]:
    """The fields every family's config.json shares, in transformers' names."""
    return {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "rope_parameters": rope_parameters(cfg),
        "attention_dropout": 0.0,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
        "dtype": dtype,
        "use_cache": True,
    }


def _family_fields(cfg: ModelConfig) -> dict[str, Any]:
    """Family-specific switches (bias, sliding window) as transformers spells them."""
    if cfg.model_type in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe"):
        full = set(cfg.full_attention_layers) if cfg.sliding_window is not None else set(range(cfg.num_layers))
        leading = 0
        while leading in full:
            leading += 1
        fields = {
            "use_sliding_window": cfg.sliding_window is not None,
            "sliding_window": cfg.sliding_window,
            "max_window_layers": leading,  # layer_types below is what transformers reads
            "layer_types": ["full_attention" if i in full else "sliding_attention" for i in range(cfg.num_layers)],
        }
        if cfg.model_type in ("qwen3", "qwen3_moe"):
            fields["attention_bias"] = cfg.attention_bias
        if cfg.model_type == "qwen2_moe":
            fields["qkv_bias"] = cfg.attention_bias
        return fields
    if cfg.model_type in ("mistral", "mixtral"):
        return {"sliding_window": cfg.sliding_window}
    if cfg.model_type == "glm4_moe":
        return {"attention_bias": cfg.attention_bias, "use_qk_norm": cfg.qk_norm, "partial_rotary_factor": cfg.partial_rotary_factor}
    return {"attention_bias": cfg.attention_bias, "mlp_bias": False}


def _moe_fields(cfg: ModelConfig) -> dict[str, Any]:
    """Router and expert fields in the family's own names (the inverse of hf_config.moe_fields)."""
    if not cfg.is_moe:
        return {}
    common = {"num_experts_per_tok": cfg.num_experts_per_tok, "router_aux_loss_coef": cfg.router_aux_loss_coef}
    if cfg.model_type in ("qwen2_moe", "qwen3_moe"):
        fields = dict(
            num_experts=cfg.num_experts,
            moe_intermediate_size=cfg.moe_intermediate_size,
            norm_topk_prob=cfg.router_norm_topk,
            mlp_only_layers=list(cfg.dense_mlp_layers),
            decoder_sparse_step=1,
        )
        if cfg.model_type == "qwen2_moe":
            fields["shared_expert_intermediate_size"] = cfg.shared_expert_intermediate_size
        return {**common, **fields}
    if cfg.model_type == "mixtral":
        return {**common, "num_local_experts": cfg.num_experts}
    shared, size = cfg.shared_expert_intermediate_size, cfg.moe_intermediate_size
    return {  # glm4_moe
        **common,
        "n_routed_experts": cfg.num_experts,
        "n_shared_experts": shared // size,
        "moe_intermediate_size": size,
        "first_k_dense_replace": cfg.first_k_dense,
        "norm_topk_prob": cfg.router_norm_topk,
        "n_group": cfg.router_groups,
        "topk_group": cfg.router_topk_groups,
        "routed_scaling_factor": cfg.routed_scaling_factor,
    }


def check_expressible(cfg: ModelConfig) -> None:
    """An AR export must be readable by the family's own transformers class: no options it lacks."""
    if cfg.model_type not in ARCHITECTURES:
        raise UserError(f"no Hugging Face architecture for model_type {cfg.model_type!r}")
    for field, value in _IMPLIED[cfg.model_type].items():
        if getattr(cfg, field) != value:
            raise UserError(
                f"model.{field}={getattr(cfg, field)} cannot be expressed in a {cfg.model_type} config.json "
                f"(the family fixes it to {value}); export it as a dLM instead"
            )
    out_bias = cfg.attention_bias if cfg.model_type in _OUT_BIAS_FAMILIES else False
    if cfg.attention_out_bias != out_bias:
        raise UserError(
            f"model.attention_out_bias={cfg.attention_out_bias} with model.attention_bias={cfg.attention_bias} cannot be "
            f"expressed in a {cfg.model_type} config.json; export it as a dLM instead"
        )
    if cfg.partial_rotary_factor != 1.0 and cfg.model_type != "glm4_moe":
        raise UserError(f"model.partial_rotary_factor={cfg.partial_rotary_factor} cannot be expressed in a {cfg.model_type} "
                         "config.json (transformers rotates whole heads there); export it as a dLM instead")
    if cfg.sliding_window is not None and cfg.model_type in ("llama", "glm4_moe"):
        raise UserError(f"model.sliding_window cannot be expressed in a {cfg.model_type} config.json")
    if cfg.full_attention_layers and cfg.model_type in ("mistral", "mixtral", "qwen3_moe"):
        raise UserError(f"model.full_attention_layers cannot be expressed in a {cfg.model_type} config.json "
                         "(its transformers class windows every layer); export it as a dLM instead")
    if cfg.mlp_only_layers and cfg.model_type in ("mixtral", "glm4_moe"):
        raise UserError(f"model.mlp_only_layers cannot be expressed in a {cfg.model_type} config.json; export it as a dLM instead")
    if cfg.model_type == "qwen2_moe" and cfg.shared_expert_gate != bool(cfg.shared_expert_intermediate_size):
        raise UserError("a qwen2_moe config.json gates its shared expert exactly when it has one (model.shared_expert_gate)")
    if cfg.model_type == "mixtral" and cfg.moe_intermediate_size != cfg.intermediate_size:
        raise UserError("a mixtral config.json has one intermediate_size: model.moe_intermediate_size must equal it")
    if cfg.model_type == "glm4_moe" and cfg.shared_expert_intermediate_size % cfg.moe_intermediate_size:
        raise UserError("a glm4_moe shared expert is a whole number of experts (model.shared_expert_intermediate_size)")


def ar_config(cfg: ModelConfig, dtype: str) -> dict[str, Any]:
    """config.json of the original architecture (plus mask_token_id when one is recorded)."""
    check_expressible(cfg)
    out = {"architectures": [ARCHITECTURES[cfg.model_type]], "model_type": cfg.model_type}
    out.update(architecture_fields(cfg, dtype))
    out.update(_family_fields(cfg))
    out.update(_moe_fields(cfg))
    if cfg.mask_token_id is not None:
        out["mask_token_id"] = cfg.mask_token_id
    return dict(sorted(out.items()))


def dlm_config(cfg: ModelConfig, dlm: DiffusionSpec, dtype: str) -> dict[str, Any]:
    """config.json of the exported dLM: architecture fields, dLM fields, auto_map to our modeling code."""
    if cfg.mask_token_id is None:
        raise UserError("a dLM export needs model.mask_token_id (the [MASK] token the model was trained to fill)")
    out = {"architectures": ["EdlmForDiffusionLM"], "model_type": DLM_PREFIX + cfg.model_type, "auto_map": dict(AUTO_MAP)}
    out.update(architecture_fields(cfg, dtype))
    out.update(_family_fields(cfg))
    if cfg.is_moe:  # our names: the modeling file and hf_config read them back
        out.update({field: getattr(cfg, field) for field in DLM_MOE_FIELDS})
    out.update(
        attention_bias=cfg.attention_bias,
        attention_out_bias=cfg.attention_out_bias,
        qk_norm=cfg.qk_norm,
        sliding_window=cfg.sliding_window,  # every base family: the modeling file reads both
        full_attention_layers=list(cfg.full_attention_layers),
    )
    out.update({key: getattr(dlm, field) for field, key in SPEC_KEYS.items()})  # the DiffusionSpec
    out["attention_pattern"] = "block"  # decoding: block-causal with the exact prefix cache, whatever the training
    return dict(sorted(out.items()))


def generation_config(cfg: ModelConfig, dlm: DiffusionSpec | None) -> dict[str, Any]:
    """generation_config.json: token ids, plus the dLM's default decoding when it is one."""
    out: dict[str, Any] = {
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
    }
    if dlm is not None:
        out.update(
            do_sample=False,
            mask_token_id=cfg.mask_token_id,
            block_size=dlm.block_size,
            decoding_strategy=dlm.strategy,
            decoding_threshold=dlm.threshold,
        )
    return {k: v for k, v in out.items() if v is not None}
