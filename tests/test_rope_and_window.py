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
from efficient_dlm.sample import generate
from tests.hf_factory import make_hf_model, random_model, tiny_config, variant
from tests.sample_reference import peaked_model, reference_ar, reference_dlm
from tests.test_hf_export import relative_error, write_tokenizer

VOCAB = 97


def chunked_logits(model, tokens, split: int, mode: str, block_size: int | None = None, rope_length: int | None = None):
    """Logits of tokens[:, split:] decoded against a KV cache that holds tokens[:, :split] (prefilled under
    `mode`), each chunk at its true positions, dynamic RoPE fixed for the whole length: what the samplers do."""
    batch, length = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))

    @jax.jit
    def run(tokens):
        cache = KVCache.empty(model.config, batch, split, rope_length=length if rope_length is None else rope_length)
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


# ---- sliding window (Mistral window 4, sequences of 12) ---------------------------------------------


@pytest.fixture(scope="module")
def window_models(tmp_path_factory):
    """(transformers Mistral with sliding_window 4, our import of it as a dLM)."""
    directory = str(tmp_path_factory.mktemp("mistral_window"))
    torch_model = make_hf_model("mistral_sliding_window", directory)
    write_tokenizer(directory)
    return torch_model, edlm.from_hf(directory, mask_token_id=VOCAB - 1)


@pytest.mark.parametrize("backend", ["xla", "pallas"])
def test_sliding_window_cached_decode_matches_transformers(window_models, backend):
    torch_model, model = window_models
    tokens = np.random.RandomState(3).randint(0, VOCAB, size=(2, 12))
    with torch.no_grad():
        ref = torch_model(torch.tensor(tokens)).logits.numpy()[:, 8:]
    ours = chunked_logits(variant(model, attention_backend=backend), tokens, 8, "causal")
    assert relative_error(ours, ref) <= 1e-4
    assert relative_error(chunked_logits(variant(model, sliding_window=None), tokens, 8, "causal"), ref) > 1e-3


@pytest.mark.parametrize("backend", ["xla", "pallas"])
def test_sliding_window_block_decode_equals_full_block_forward(window_models, backend):
    _, model = window_models
    model = variant(model, attention_backend=backend)
    tokens = np.random.RandomState(4).randint(0, VOCAB, size=(2, 12))
    ref = full_logits(variant(model, attention_backend="xla"), tokens, "block", 4)[:, 8:]
    assert relative_error(chunked_logits(model, tokens, 8, "block", 4), ref) <= 1e-5
    assert relative_error(full_logits(variant(model, sliding_window=None, attention_backend="xla"), tokens, "block", 4)[:, 8:], ref) > 1e-3


def test_sliding_window_clean_context_block_equals_its_decode_step(window_models):
    """The x_t block at positions 8..11 under clean_context is the sampler's step: that block, bidirectional,
    against a cache holding the clean blocks before it; both drop keys 4 or more positions back."""
    _, model = window_models
    rng = np.random.RandomState(5)
    x0, xt = rng.randint(0, VOCAB, size=(2, 12)), rng.randint(0, VOCAB, size=(2, 12))
    ref = full_logits(model, np.concatenate([xt, x0], axis=1), "clean_context", 4)[:, 8:12]
    positions = jnp.broadcast_to(jnp.arange(12, dtype=jnp.int32), (2, 12))

    @jax.jit
    def step(x0, xt):
        cache = KVCache.empty(model.config, 2, 8)
        _, (k, v) = model.decode(x0[:, :8], positions[:, :8], cache, attention="block", block_size=4)
        cache = cache.write(k, v, 0).replace(length=jnp.full((2,), 8, jnp.int32))
        hidden, _ = model.decode(xt[:, 8:], positions[:, 8:], cache, attention="bidirectional")
        return model.logits(hidden)

    assert relative_error(np.asarray(step(x0, xt)), ref) <= 1e-5


def test_sliding_window_dlm_export_runs_in_transformers_like_jax(window_models, tmp_path):
    _, model = window_models
    out = str(tmp_path / "dlm")
    edlm.to_hf(model, out, tokenizer_dir=write_tokenizer(tmp_path / "tok"), block_size=4)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32)
    tokens = np.random.RandomState(6).randint(0, VOCAB, size=(2, 12))
    t = torch.tensor(tokens)
    with torch.no_grad():
        block = hf(t).logits.numpy()
        prefix = hf(t[:, :8], use_cache=True).past_key_values
        chunk = hf(t[:, 8:], past_key_values=prefix).logits.numpy()
        causal = hf(t, attention="causal").logits.numpy()
    expected = full_logits(model, tokens, "block", 4)
    assert relative_error(block, expected) <= 1e-4 and relative_error(chunk, expected[:, 8:]) <= 1e-4
    assert relative_error(causal, full_logits(model, tokens, "causal")) <= 1e-4
    assert edlm.from_hf(out).config == model.config


# ---- dynamic RoPE (max_position_embeddings 8, factor 8: sequences of 12 are rescaled) -------------------


@pytest.fixture(scope="module")
def dynamic_models(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("qwen2_dynamic"))
    torch_model = make_hf_model("qwen2_dynamic_rope", directory, rope_scaling=dict(rope_type="dynamic", factor=8.0))
    return torch_model, edlm.from_hf(directory)


def test_dynamic_rope_cached_decode_matches_transformers_on_the_whole_sequence(dynamic_models):
    """Keys cached at length 8 (unscaled by itself) and queries at 9..12 share the scale of length 12."""
    torch_model, model = dynamic_models
    tokens = np.random.RandomState(7).randint(0, VOCAB, size=(2, 12))
    with torch.no_grad():
        ref = torch_model(torch.tensor(tokens)).logits.numpy()
    assert relative_error(chunked_logits(model, tokens, 8, "causal"), ref[:, 8:]) <= 1e-4
    assert relative_error(chunked_logits(model, tokens, 8, "causal", rope_length=8), ref[:, 8:]) > 1e-4  # scale matters


def test_dynamic_rope_scale_ignores_padding(dynamic_models):
    _, model = dynamic_models
    tokens = np.random.RandomState(8).randint(0, VOCAB, size=(1, 10))
    padded = np.concatenate([tokens, np.zeros((1, 6), tokens.dtype)], axis=1)
    segments = (np.arange(16) < 10).astype(np.int32)[None]
    positions = np.where(segments == 1, np.arange(16), 40 + np.arange(16)).astype(np.int32)  # padding far out
    ours = jax.jit(lambda t, s, p: model(t, segment_ids=s, positions=p))(padded, segments, positions)
    assert relative_error(np.asarray(ours)[:, :10], full_logits(model, tokens, "causal")) <= 1e-5


def test_dynamic_rope_generation_equals_a_forward_over_its_result(dynamic_models):
    _, model = dynamic_models
    prompt = [5, 9, 14, 3, 77]
    result = generate(model, [prompt], max_new_tokens=7, strategy="ar", return_logits=True, stop_tokens=[])
    sequence = np.array([prompt + list(result.sequences[0])])  # sequences hold the generated tokens
    assert sequence.shape == (1, 12)
    assert relative_error(result.logits[0], full_logits(model, sequence, "causal")[0, 4:11]) <= 1e-4


def test_per_layer_window_decode_and_export_match_transformers(tmp_path):
    """Qwen2's max_window_layers 1: layer 0 attends fully, layer 1 within 4 positions (12 tokens)."""
    directory = str(tmp_path / "src")
    torch_model = make_hf_model("qwen2_max_window_layers", directory)
    model = edlm.from_hf(directory, mask_token_id=VOCAB - 1)
    assert (model.config.sliding_window, model.config.full_attention_layers) == (4, (0,))
    tokens = np.random.RandomState(9).randint(0, VOCAB, size=(2, 12))
    with torch.no_grad():
        ref = torch_model(torch.tensor(tokens)).logits.numpy()
    assert relative_error(chunked_logits(model, tokens, 8, "causal"), ref[:, 8:]) <= 1e-4
    out = str(tmp_path / "dlm")
    edlm.to_hf(model, out, tokenizer_dir=write_tokenizer(tmp_path / "tok"), block_size=4)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32)
    with torch.no_grad():
        prefix = hf(torch.tensor(tokens[:, :8]), use_cache=True).past_key_values
        chunk = hf(torch.tensor(tokens[:, 8:]), past_key_values=prefix).logits.numpy()
    assert relative_error(chunk, full_logits(model, tokens, "block", 4)[:, 8:]) <= 1e-4
    assert edlm.from_hf(out).config == model.config


def test_samplers_with_a_window_equal_full_recompute():
    """The block-diffusion and AR samplers on a window of 3 (inside a block of 4, prompts up to 9 tokens)
    against the slow references that recompute every step with the full forward."""
    model = variant(peaked_model(), sliding_window=3)
    prompts = [[7, 3, 11, 42, 5, 17, 60, 2, 33], [50, 6]]
    result = generate(model, prompts, max_new_tokens=8, block_size=4, threshold=0.5, return_logits=True, stop_tokens=[])
    ar = generate(model, prompts, max_new_tokens=8, strategy="ar", return_logits=True, stop_tokens=[])
    for row, prompt in enumerate(prompts):
        tokens, logits, _ = reference_dlm(model, prompt, block=4, max_new=8, strategy="threshold", threshold=0.5)
        assert result.sequences[row] == tokens
        assert relative_error(result.logits[row, : len(tokens)], logits) <= 1e-5
        tokens, logits = reference_ar(model, prompt, max_new=8)
        assert ar.sequences[row] == tokens and relative_error(ar.logits[row], logits) <= 1e-5
