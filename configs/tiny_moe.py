"""A tiny random MoE model (Ling 2.0 / GLM-4.5 style: sigmoid group-limited router, selection bias,
shared expert, one leading dense layer): every verb runs on a laptop CPU in seconds."""
from efficient_dlm.config import base_config


def get_config():
    c = base_config()
    m = c.model
    m.model_type = "glm4_moe"
    m.vocab_size = 512
    m.hidden_size = 64
    m.intermediate_size = 128
    m.num_layers = 3
    m.num_heads = 4
    m.num_kv_heads = 2
    m.head_dim = 16
    m.qk_norm = True
    m.tie_word_embeddings = True
    m.max_position_embeddings = 2048
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
    m.eos_token_id = 1
    m.mask_token_id = 511
    return c
