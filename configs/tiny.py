"""A tiny random Qwen3-shaped model: runs every verb on a laptop CPU in seconds (tests, smoke runs)."""
from efficient_dlm.config import base_config


def get_config():
    c = base_config()
    m = c.model
    m.model_type = "qwen3"
    m.vocab_size = 512
    m.hidden_size = 64
    m.intermediate_size = 128
    m.num_layers = 2
    m.num_heads = 4
    m.num_kv_heads = 2
    m.head_dim = 16
    m.qk_norm = True
    m.tie_word_embeddings = True
    m.max_position_embeddings = 2048
    m.eos_token_id = 1
    m.mask_token_id = 511
    return c
