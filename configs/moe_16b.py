"""A 16B "mini" MoE shaped like LLaDA2.0-mini's base, Ling-mini-2.0 (16.26B total, ~1.4B active).

Ling 2.0 dims, from the published BailingMoeV2 / LLaDA2MoE config.json (inclusionAI/Ling-mini-2.0,
inclusionAI/LLaDA2.0-mini and LLaDA2.1-mini on the HF hub): 20 layers (num_hidden_layers), d 2048,
16 heads / 4 KV heads of head_dim 128, QK-norm (use_qk_norm), no q/k/v/o bias (use_qkv_bias,
use_bias false), half RoPE (partial_rotary_factor 0.5: rotary_dim 64 of 128, rope_theta 600000),
one leading dense layer (first_k_dense_replace 1, MLP 5120), then 19 MoE layers of 256 experts
(moe_intermediate_size 512): sigmoid router (score_function, fp32 logits), top-8 within the best 4
of 8 expert groups (n_group, topk_group), per-expert selection bias (moe_router_enable_expert_bias:
aux-loss-free balancing), renormalised weights (norm_topk_prob) x 2.5 (routed_scaling_factor), one
shared expert (num_shared_experts 1, 512 wide); RMSNorm eps 1e-6, untied embeddings, vocabulary 157184.
Total: 16,255,638,528 parameters (tests/test_moe_configs.py recounts it from the model).
Written in the glm4_moe family, whose HF layout has exactly these pieces (Glm4MoeConfig also rotates
half of each head). Deviations from Ling 2.0: q/k/v are separate projections (Ling fuses them in
query_key_value; the same function), and no multi-token-prediction head (num_nextn_predict_layers,
0 in the published checkpoints).
"""
from efficient_dlm.config import base_config


def get_config():
    c = base_config()
    m = c.model
    m.model_type = "glm4_moe"
    m.vocab_size = 157184
    m.hidden_size = 2048
    m.num_layers = 20
    m.num_heads = 16
    m.num_kv_heads = 4
    m.head_dim = 128
    m.qk_norm = True
    m.partial_rotary_factor = 0.5  # Ling 2.0's half RoPE: the first 64 of each head's 128 dims rotate
    m.tie_word_embeddings = False
    m.first_k_dense = 1
    m.intermediate_size = 5120  # the leading dense layer's MLP
    m.num_experts = 256
    m.num_experts_per_tok = 8
    m.moe_intermediate_size = 512
    m.shared_expert_intermediate_size = 512  # one shared expert
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
