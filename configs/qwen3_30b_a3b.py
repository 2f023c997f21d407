"""Qwen3-30B-A3B (HF: Qwen/Qwen3-30B-A3B): 48 MoE layers, 128 experts, top-8 softmax router with
renormalised weights; 30.5B parameters, 3.3B active. Point init.hf_dir at the downloaded directory.
On a pod, give the mesh an expert axis (e.g. --config.mesh.expert=8) for expert parallelism."""
from efficient_dlm.config import base_config


def get_config():
    c = base_config()
    m = c.model
    m.model_type = "qwen3_moe"
    m.vocab_size = 151936
    m.hidden_size = 2048
    m.intermediate_size = 6144  # dense MLP size in HF's config; every layer is MoE here
    m.num_layers = 48
    m.num_heads = 32
    m.num_kv_heads = 4
    m.head_dim = 128
    m.qk_norm = True
    m.tie_word_embeddings = False
    m.rope_theta = 1000000.0
    m.max_position_embeddings = 40960
    m.rms_norm_eps = 1e-6
    m.bos_token_id = 151643
    m.eos_token_id = 151645
    m.num_experts = 128
    m.num_experts_per_tok = 8
    m.moe_intermediate_size = 768
    m.router_norm_topk = True
    m.dtype = "bfloat16"
    m.remat_policy = "full"
    return c
