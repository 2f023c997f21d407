"""The decoder family (dense and MoE), its attention modes, RoPE variants and KV cache."""
from efficient_dlm.models.config import ModelConfig
from efficient_dlm.models.decoder import Decoder, abstract_model, init_model

__all__ = ["Decoder", "ModelConfig", "abstract_model", "init_model"]
