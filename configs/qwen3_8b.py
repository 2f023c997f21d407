"""Qwen3-8B (HF: Qwen/Qwen3-8B). Point init.hf_dir at the downloaded directory."""
from efficient_dlm.config import base_config


def get_config():
    c = base_config()
    m = c.model
    m.model_type = "qwen3"
    m.vocab_size = 151936
    m.hidden_size = 4096
    m.intermediate_size = 12288
    m.num_layers = 36
    m.num_heads = 32
    m.num_kv_heads = 8
    m.head_dim = 128
    m.qk_norm = True
    m.tie_word_embeddings = False
    m.rope_theta = 1000000.0
    m.max_position_embeddings = 40960
    m.rms_norm_eps = 1e-6
    m.bos_token_id = 151643
    m.eos_token_id = 151645
    m.dtype = "bfloat16"
    m.remat_policy = "full"
    return c
