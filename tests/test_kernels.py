"""Pallas kernels (interpret mode on CPU) against the XLA references of the model code.

Shapes are small but chosen so tiles are skipped, lengths are not tile multiples, block sizes do not
divide the tile, and cache prefixes are ragged (including empty). Inputs are random, never zeros.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficient_dlm.models import kernel_dispatch
from efficient_dlm.models.attention import cached_attention, xla_attention
from efficient_dlm.models.config import ModelConfig
from efficient_dlm.models.cache import KVCache
from efficient_dlm.models.decoder import init_model
from efficient_dlm.models.masks import MaskSpec, dense_mask
from pallas_kernels import decode_attention as decode_lib


def _normal(rng, *shape):
    return jnp.asarray(rng.normal(size=shape), jnp.float32)


def _segments(rng, batch, length, documents):
    return jnp.asarray(np.sort(rng.integers(0, documents, size=(batch, length)), axis=1), jnp.int32)


@pytest.mark.parametrize(
    "spec,length,heads,kv_heads,documents",
    [
        (MaskSpec("clean_context", 12, 132), 264, 4, 2, 3),  # 2L = 264 -> 3 x 3 tiles of 128, empty ones skipped
        (MaskSpec("block", 12, 204, sliding_window=30), 204, 2, 2, None),  # no segment ids: padding gets its own segment
        (MaskSpec("causal", sliding_window=50), 150, 4, 1, 2),  # MQA
    ],
    ids=["clean_context", "block_window", "causal_window"],
)
def test_training_attention_matches_xla_forward_and_gradients(spec, length, heads, kv_heads, documents):
    rng = np.random.default_rng(length)
    q = _normal(rng, 2, length, heads, 16)
    k, v = _normal(rng, 2, length, kv_heads, 16), _normal(rng, 2, length, kv_heads, 16)
    cotangent = _normal(rng, 2, length, heads, 16)
    segments = None if documents is None else _segments(rng, 2, length, documents)

    def reference(q, k, v):
        return xla_attention(q, k, v, dense_mask(spec, length, length, segments, segments))

    def kernel(q, k, v):
        return kernel_dispatch.training_attention(q, k, v, spec, segments, "splash")

    def out_and_grads(fn):
        out, vjp = jax.vjp(fn, q, k, v)
        return out, vjp(cotangent)

    ref_out, ref_grads = out_and_grads(reference)
    out, grads = jax.jit(lambda: out_and_grads(kernel))()
    assert float(jnp.abs(out - ref_out).max()) <= 1e-5
    for got, want in zip(grads, ref_grads):
        assert float(jnp.abs(got - want).max()) <= 1e-4


@pytest.mark.parametrize(
    "mode,width,heads,kv_heads,slots,window",
    [("bidirectional", 5, 4, 2, 44, None), ("block", 6, 3, 1, 30, 9)],
)
def test_decode_attention_matches_xla_with_ragged_prefixes(mode, width, heads, kv_heads, slots, window):
    rng = np.random.default_rng(slots)
    batch, dim = 4, 8
    q = _normal(rng, batch, width, heads, dim)
    k, v = _normal(rng, batch, width, kv_heads, dim), _normal(rng, batch, width, kv_heads, dim)
    cache_k, cache_v = _normal(rng, batch, slots, kv_heads, dim), _normal(rng, batch, slots, kv_heads, dim)
    start = jnp.array([0, 2, 5, 7], jnp.int32)  # row 3: empty cache; row 0: whole cache
    length = jnp.array([slots, slots - 9, 17, 7], jnp.int32)
    positions = length[:, None] + jnp.arange(width, dtype=jnp.int32)[None]
    block = 3 if mode == "block" else None
    args = (q, k, v, cache_k, cache_v, start, length, positions, mode, block)
    ref = cached_attention(*args, sliding_window=window)
    poisoned = cache_v.at[1, :2].set(jnp.nan).at[3].set(jnp.inf)  # slots outside [start, length) must not leak
    args = (q, k, v, cache_k, poisoned, start, length, positions)
    out = jax.jit(lambda *a: kernel_dispatch.decode_attention(*a, mode, block, "pallas", window))(*args)
    assert float(jnp.abs(out - ref).max()) <= 1e-5


def test_lm_head_confidence_matches_softmax_of_full_logits():
    rng = np.random.default_rng(0)
    hidden, w_out = _normal(rng, 3, 7, 32), _normal(rng, 32, 300)  # 21 rows, vocab 300: partial tiles
    w_out = w_out.at[:, 260].set(w_out[:, 5])  # exact ties: the first index must win, as argmax
    allowed = np.ones(300, bool)
    allowed[[0, 299]] = False  # e.g. the [MASK] id and vocabulary padding
    for temperature, backend in ((0.6, "pallas"), (0.6, "xla"), (1.0, "xla")):
        logits = np.asarray(hidden, np.float64) @ np.asarray(w_out, np.float64) / temperature
        logits[..., ~allowed] = -np.inf
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        entropy = -(probs * np.log(np.where(probs > 0, probs, 1.0))).sum(-1)
        max_prob, token, ent = jax.jit(  # temperature traced, as the sampler's knob
            lambda h, w, t: kernel_dispatch.lm_head_confidence(h, w, temperature=t, with_entropy=True, allowed=allowed, backend=backend)
        )(hidden, w_out, jnp.float32(temperature))
        np.testing.assert_allclose(max_prob, probs.max(-1), atol=1e-5)
        np.testing.assert_array_equal(token, logits.argmax(-1))
        np.testing.assert_allclose(ent, entropy, atol=1e-5)
    _, _, none = kernel_dispatch.lm_head_confidence(hidden, w_out, backend="pallas")
    assert none is None
    with pytest.raises(ValueError, match="temperature must be positive"):
        kernel_dispatch.lm_head_confidence(hidden, w_out, temperature=0.0, backend="pallas")


def test_model_logits_with_kernels_equal_xla():
    """A tiny model end to end: clean-context training forward and a cached decode step."""
    cfg = ModelConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)
    rng = np.random.default_rng(1)
    tokens = jnp.asarray(rng.integers(0, 128, size=(2, 48)), jnp.int32)  # [x_t ; x_0], L = 24
    segments = _segments(rng, 2, 24, 2)
    cache = KVCache.empty(cfg, batch=2, size=20)
    cache = cache.replace(k=_normal(rng, *cache.k.shape), v=_normal(rng, *cache.v.shape),
                          start=jnp.array([0, 3], jnp.int32), length=jnp.array([12, 9], jnp.int32))
    chunk = tokens[:, :4]
    positions = cache.length[:, None] + jnp.arange(4, dtype=jnp.int32)

    def run(backend):
        model = init_model(cfg.replace(attention_backend=backend), seed=0)
        train = model(tokens, attention="clean_context", block_size=4, segment_ids=segments)
        hidden, _ = model.decode(chunk, positions, cache, attention="bidirectional")
        return train, model.logits(hidden)

    # "pallas" selects the same kernels as "splash" (see describe); one program compiles both models.
    (ref_train, ref_decode), (train, decode) = jax.jit(lambda: (run("xla"), run("splash")))()
    assert float(jnp.abs(train - ref_train).max()) <= 1e-5
    assert float(jnp.abs(decode - ref_decode).max()) <= 1e-5


def test_describe_names_the_kernels():
    assert kernel_dispatch.describe("xla") == {"training": "xla", "decode": "xla", "lm_head": "xla"}
    chosen = kernel_dispatch.describe("splash")
    assert kernel_dispatch.describe("pallas") == chosen
    assert chosen["training"].startswith("splash attention") and "interpret" in chosen["decode"]
    assert kernel_dispatch.describe("auto")["training"] == "xla"  # CPU


def test_gpu_backend_uses_the_library_kernel_with_the_same_result():
    """On CPU, jax.nn.dot_product_attention runs its XLA implementation: same mask, same numbers."""
    rng = np.random.default_rng(3)
    spec = MaskSpec("clean_context", 4, 12)
    q, k, v = _normal(rng, 2, 24, 4, 8), _normal(rng, 2, 24, 2, 8), _normal(rng, 2, 24, 2, 8)
    segments = _segments(rng, 2, 24, 2)
    decode_args = (q[:, :4], k[:, :4], v[:, :4], k, v, jnp.array([0, 2]), jnp.array([24, 9]), jnp.tile(jnp.arange(24, 28), (2, 1)))

    def both(backend):
        return (
            kernel_dispatch.training_attention(q, k, v, spec, segments, backend)
            if backend == "gpu"
            else xla_attention(q, k, v, dense_mask(spec, 24, 24, segments, segments)),
            kernel_dispatch.decode_attention(*decode_args, "bidirectional", None, backend),
        )

    (out, decode), (ref, ref_decode) = jax.jit(lambda: (both("gpu"), both("xla")))()
    assert float(jnp.abs(out - ref).max()) <= 1e-5
    np.testing.assert_array_equal(decode, ref_decode)


@pytest.mark.parametrize("mode", ["causal", "block"])
def test_decode_attention_tiles_a_long_prefill(mode):
    """A 200-token prefill: queries in row tiles, own keys padded to 256 in two 128-key tiles, and a
    ragged cache; the visibility comes from positions inside the kernel, as the XLA reference's."""
    rng = np.random.default_rng(7)
    batch, width, heads, kv_heads, dim, slots = 2, 200, 4, 2, 8, 32
    q = _normal(rng, batch, width, heads, dim)
    k, v = _normal(rng, batch, width, kv_heads, dim), _normal(rng, batch, width, kv_heads, dim)
    cache_k, cache_v = _normal(rng, batch, slots, kv_heads, dim), _normal(rng, batch, slots, kv_heads, dim)
    start, length = jnp.array([0, 5], jnp.int32), jnp.array([0, 20], jnp.int32)  # row 0: empty cache
    positions = length[:, None] + jnp.arange(width, dtype=jnp.int32)[None]
    positions = positions.at[1, :3].set(10_000)  # left padding: a position beyond every real one
    block = 8 if mode == "block" else None
    ref = cached_attention(q, k, v, cache_k, cache_v, start, length, positions, mode, block)
    out = jax.jit(
        lambda *a: decode_lib.decode_attention(*a, mode=mode, block_size=block, max_tile=128, interpret=True)
    )(q, k, v, cache_k, cache_v, start, length, positions)
    assert float(jnp.abs(out - ref).max()) <= 1e-5
