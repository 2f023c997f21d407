"""Tiny random Hugging Face MoE models made on the fly (the numerics oracle for the MoE families)."""
from __future__ import annotations

import torch

from tests.hf_factory import BASE as DENSE_BASE
from tests.hf_factory import random_hf_model

BASE = {**DENSE_BASE, "intermediate_size": 48, "num_experts_per_tok": 2}  # the dense oracle's sizes

# name -> (config class, model class, overrides). Each exercises a router / layout option.
MOE_FAMILIES = {
    "qwen3_moe_norm_topk": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(num_experts=8, moe_intermediate_size=16, norm_topk_prob=True, mlp_only_layers=[0], head_dim=8),
    ),
    "qwen3_moe_plain_topk": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(num_experts=8, moe_intermediate_size=16, norm_topk_prob=False, tie_word_embeddings=True),
    ),
    "qwen2_moe_shared_gate": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        dict(num_experts=8, moe_intermediate_size=16, shared_expert_intermediate_size=24, num_experts_per_tok=3),
    ),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4, intermediate_size=24)),
    # dense, MoE, dense, MoE: one scanned (dense, MoE) group repeated twice
    "qwen3_moe_sparse_step": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(num_experts=8, moe_intermediate_size=16, decoder_sparse_step=2, num_hidden_layers=4, head_dim=8),
    ),
    # MoE, dense, MoE, and Qwen2-MoE's window rule: layer 0 (even, below max_window_layers) slides
    "qwen2_moe_dense_middle_window": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        dict(num_experts=8, moe_intermediate_size=16, shared_expert_intermediate_size=24, mlp_only_layers=[1],
             num_hidden_layers=3, use_sliding_window=True, sliding_window=4, max_window_layers=2),
    ),
    "glm4_moe_sigmoid_groups": (
        "Glm4MoeConfig",
        "Glm4MoeForCausalLM",
        dict(
            n_routed_experts=16, moe_intermediate_size=16, n_shared_experts=1, first_k_dense_replace=1,
            n_group=4, topk_group=2, num_experts_per_tok=4, routed_scaling_factor=2.5, norm_topk_prob=True,
            use_qk_norm=True, partial_rotary_factor=0.5, head_dim=8,  # GLM-4.5's partial RoPE: 4 of 8 dims rotate
        ),
    ),
}


def make_moe_hf_model(name: str, directory: str, seed: int = 0, **overrides):
    """Creates, saves (safetensors) and returns the torch model for MoE option `name`."""
    model = random_hf_model(MOE_FAMILIES[name], seed, base=BASE, **overrides)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith(("gate.weight", "shared_expert_gate.weight")):
                p.copy_(torch.randn_like(p) * 0.5)  # decisive routing: no near-ties between experts
        for bname, b in model.named_buffers():
            if bname.endswith("e_score_correction_bias"):
                b.copy_(torch.rand_like(b) * 0.2)  # the selection bias must matter in the test
    model.save_pretrained(directory)
    return model
