"""A 100B "flash" MoE shaped like LLaDA2.0-flash's base, Ling-flash-2.0 (102.9B total, ~6.1B active).

The architecture of configs/moe_16b.py at d 4096: 32 layers, 32 heads / 4 KV heads of 128, one
leading dense layer (MLP 9216), 31 MoE layers of 256 experts (1024 wide), top-8 within the best 4
of 8 groups, one shared expert. Total: 102,889,697,280 parameters, exactly the BF16 parameter count
published for Ling-flash-2.0 (its F32 remainder, 7,936 = 31 x 256, is the selection bias).
Shard it with an expert axis, e.g. --config.mesh.expert=16.
"""
from efficient_dlm.config import base_config


def get_config():
    c = base_config()
    m = c.model
    m.model_type = "glm4_moe"
    m.vocab_size = 157184
    m.hidden_size = 4096
    m.num_layers = 32
    m.num_heads = 32
    m.num_kv_heads = 4
    m.head_dim = 128
    m.qk_norm = True
    m.tie_word_embeddings = False
    m.first_k_dense = 1
    m.intermediate_size = 9216  # the leading dense layer's MLP
    m.num_experts = 256
    m.num_experts_per_tok = 8
    m.moe_intermediate_size = 1024
    m.shared_expert_intermediate_size = 1024  # one shared expert
    m.router_score = "sigmoid"
    m.router_groups = 8
    m.router_topk_groups = 4
    m.router_norm_topk = True
    m.routed_scaling_factor = 2.5
    m.router_bias = True  # aux-loss-free balancing (models/moe.py update_expert_bias)
    m.rope_theta = 600000.0
    m.max_position_embeddings = 32768
    m.rms_norm_eps = 1e-6
    m.eos_token_id = 156892
    m.pad_token_id = 156892
    m.mask_token_id = 156895  # LLaDA2.0's [MASK]
    m.dtype = "bfloat16"
    m.remat_policy = "full"
    return c
