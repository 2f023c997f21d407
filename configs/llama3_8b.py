"""Llama-3.1-8B (HF: meta-llama/Llama-3.1-8B) with llama3 RoPE scaling."""
from efficient_dlm.config import base_config


def get_config():
    c = base_config()
    m = c.model
    m.model_type = "llama"
    m.vocab_size = 128256
    m.hidden_size = 4096
    m.intermediate_size = 14336
    m.num_layers = 32
    m.num_heads = 32
    m.num_kv_heads = 8
    m.head_dim = 128
    m.rope_theta = 500000.0
    m.rope_type = "llama3"
    m.rope_factor = 8.0
    m.rope_low_freq_factor = 1.0
    m.rope_high_freq_factor = 4.0
    m.rope_original_max_position_embeddings = 8192
    m.max_position_embeddings = 131072
    m.rms_norm_eps = 1e-5
    m.bos_token_id = 128000
    m.eos_token_id = 128001
    m.dtype = "bfloat16"
    m.remat_policy = "full"
    return c
