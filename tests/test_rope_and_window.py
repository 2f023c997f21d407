"""Position-dependent model math: partial rotary embeddings, dynamic RoPE and sliding windows.

References: transformers (PyTorch CPU, float32) where it implements the option, else the model's own
full forward (no cache) for the KV-cache decode, and the exported PyTorch modeling for the export.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import efficient_dlm as edlm
from efficient_dlm.models.cache import KVCache
from tests.hf_factory import random_model, tiny_config, variant
from tests.test_hf_export import relative_error, write_tokenizer

VOCAB = 97


def chunked_logits(model, tokens, split: int, mode: str, block_size: int | None = None):
    """Logits of tokens[:, split:] decoded against a KV cache that holds tokens[:, :split] (prefilled under
    `mode`), each chunk at its true positions: what the samplers do."""
    batch, length = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))

    @jax.jit
    def run(tokens):
        cache = KVCache.empty(model.config, batch, split)
        _, (k, v) = model.decode(tokens[:, :split], positions[:, :split], cache, attention=mode, block_size=block_size)
        cache = cache.write(k, v, 0).replace(length=jnp.full((batch,), split, jnp.int32))
        hidden, _ = model.decode(tokens[:, split:], positions[:, split:], cache, attention=mode, block_size=block_size)
        return model.logits(hidden)

    return np.asarray(run(jnp.asarray(tokens)))


def full_logits(model, tokens, mode: str, block_size: int | None = None):
    return np.asarray(jax.jit(lambda t: model(t, attention=mode, block_size=block_size))(jnp.asarray(tokens)))


@pytest.fixture(scope="module")
def partial_rope_model():
    """head_dim 8 with partial_rotary_factor 0.75: 6 dims rotate (3 frequencies), 2 pass through."""
    return random_model(tiny_config(partial_rotary_factor=0.75, mask_token_id=VOCAB - 1, rope_theta=100.0), seed=2)


@pytest.mark.parametrize("mode", ["causal", "block"])
def test_partial_rope_decode_with_cache_equals_full_forward(partial_rope_model, mode):
    tokens = np.random.RandomState(0).randint(0, VOCAB, size=(2, 12))
    ours = chunked_logits(partial_rope_model, tokens, 8, mode, block_size=4)
    ref = full_logits(partial_rope_model, tokens, mode, block_size=4)[:, 8:]
    assert relative_error(ours, ref) <= 1e-5
    full = variant(partial_rope_model, partial_rotary_factor=1.0)  # the pass-through dims matter
    assert relative_error(full_logits(full, tokens, mode, block_size=4)[:, 8:], ref) > 1e-3


def test_partial_rope_dlm_export_runs_in_transformers_like_jax(partial_rope_model, tmp_path):
    out = str(tmp_path / "dlm")
    edlm.to_hf(partial_rope_model, out, tokenizer_dir=write_tokenizer(tmp_path / "tok"), block_size=4)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32)
    tokens = np.random.RandomState(1).randint(0, VOCAB, size=(2, 12))
    with torch.no_grad():
        ours = hf(torch.tensor(tokens)).logits.numpy()
    assert relative_error(ours, full_logits(partial_rope_model, tokens, "block", 4)) <= 1e-4
    assert edlm.from_hf(out).config == partial_rope_model.config
