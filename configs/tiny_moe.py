"""A tiny random MoE model (Ling 2.0 / GLM-4.5 style: sigmoid group-limited router, selection bias,
shared expert, one leading dense layer, partial RoPE): every verb runs on a laptop CPU in seconds."""
from efficient_dlm.config import sibling_recipe


def get_config():
    c = sibling_recipe(__file__, "tiny")  # the dense tiny model's sizes, vocabulary and tokens
    m = c.model
    m.model_type = "glm4_moe"
    m.num_layers = 3
    m.first_k_dense = 1
    m.num_experts = 8
    m.num_experts_per_tok = 2
    m.moe_intermediate_size = 32
    m.shared_expert_intermediate_size = 32
    m.router_score = "sigmoid"
    m.router_groups = 4
    m.router_topk_groups = 2
    m.router_norm_topk = True
    m.routed_scaling_factor = 2.5
    m.router_bias = True
    m.partial_rotary_factor = 0.5  # GLM-4.5 / Ling 2.0: RoPE on half of each head's dims
    return c
