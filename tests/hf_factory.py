"""Tiny random Hugging Face models made on the fly (the numerics oracle); never downloaded."""
from __future__ import annotations

import jax
import numpy as np
import torch
import transformers
from flax import nnx

from efficient_dlm.models.config import ModelConfig
from efficient_dlm.models.decoder import abstract_model

BASE = dict(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)

# name -> (config class, model class, overrides). Each exercises an option of the dense family.
FAMILIES = {
    "llama_llama3_rope": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                               original_max_position_embeddings=16)),
    ),
    "mistral_gqa": ("MistralConfig", "MistralForCausalLM", dict(num_attention_heads=8, num_key_value_heads=2)),
    "mistral_sliding_window": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=4)),
    # layer 0 full attention, layer 1 a window of 4 (Qwen2's max_window_layers rule)
    "qwen2_max_window_layers": (
        "Qwen2Config", "Qwen2ForCausalLM", dict(use_sliding_window=True, sliding_window=4, max_window_layers=1),
    ),
    "qwen2_bias": ("Qwen2Config", "Qwen2ForCausalLM", dict()),
    "llama_qkvo_bias": ("LlamaConfig", "LlamaForCausalLM", dict(attention_bias=True)),  # q/k/v and o_proj biases
    "qwen3_qkvo_bias": ("Qwen3Config", "Qwen3ForCausalLM", dict(attention_bias=True, head_dim=8)),
    "qwen3_qknorm_tied": ("Qwen3Config", "Qwen3ForCausalLM", dict(tie_word_embeddings=True, head_dim=8)),
    "qwen3_wide_head_dim": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=24)),
    "llama_mqa_linear_rope": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(num_key_value_heads=1, rope_scaling=dict(rope_type="linear", factor=2.0)),
    ),
    "llama_yarn_rope": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(rope_scaling=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=32)),
    ),
    "qwen2_dynamic_rope": (
        "Qwen2Config",
        "Qwen2ForCausalLM",
        dict(max_position_embeddings=8, rope_scaling=dict(rope_type="dynamic", factor=2.0)),
    ),
}


def random_hf_model(spec: tuple, seed: int = 0, base: dict = BASE, **overrides):
    """The torch model of a (config class, model class, config overrides) spec, with random (not
    default-initialised) norms and biases so every tensor matters in parity tests."""
    config_cls, model_cls, extra = spec
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(**{**base, **extra, **overrides})
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname or pname.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in pname else 0.0))
    return model


def make_hf_model(name: str, directory: str, seed: int = 0, dtype=torch.float32, **overrides):
    """Creates, saves (safetensors) and returns the torch model for family option `name`."""
    model = random_hf_model(FAMILIES[name], seed, **overrides).to(dtype)
    model.save_pretrained(directory)
    return model


def tiny_config(**changes) -> ModelConfig:
    """Our own tiny model with BASE's shapes (Qwen3 style), shared by the tests of our own code."""
    base = dict(model_type="qwen3", vocab_size=BASE["vocab_size"], hidden_size=BASE["hidden_size"],
                intermediate_size=BASE["intermediate_size"], num_layers=BASE["num_hidden_layers"],
                num_heads=BASE["num_attention_heads"], num_kv_heads=BASE["num_key_value_heads"], head_dim=8,
                qk_norm=True)
    return ModelConfig(**{**base, **changes})


def variant(model, **changes):
    """The same parameters (cast to the new param_dtype) under a config with `changes` (no new init)."""
    out = abstract_model(model.config.replace(**changes))
    dtype = out.config.weight_dtype
    nnx.update(out, jax.tree.map(lambda x: x.astype(dtype), nnx.state(model, nnx.Param)))
    return out


def random_model(cfg: ModelConfig, seed: int = 0):
    """A model with NumPy-drawn weights: N(0, 0.02), norm scales N(1, 0.1). Same structure as
    init_model, but nothing to compile (jax.random programs cost seconds per shape on a busy CPU)."""
    model = abstract_model(cfg)
    rng = np.random.RandomState(seed)

    def draw(path, leaf):
        mean, std = (1.0, 0.1) if str(path[-1]) == "scale" else (0.0, 0.02)
        return leaf.replace(jax.device_put(rng.normal(mean, std, leaf.shape).astype(np.dtype(leaf.dtype))))

    flat = [(path, draw(path, leaf)) for path, leaf in nnx.to_flat_state(nnx.state(model, nnx.Param))]
    nnx.update(model, nnx.from_flat_state(flat))
    return model
