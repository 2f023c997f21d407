"""The training-time attention patterns of docs/METHOD.md section 1, checked against direct definitions.

The identities that make the decode-time KV cache exact: block mode with block_size 1 is causal; the
x_0 half of the clean-context layout is block mode on x_0; an x_t block reads only its own noisy
block and the clean earlier blocks. Masks are compared with a Python double loop written from the
method text; packing is checked by running each document alone.
"""
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efficient_dlm.models.masks import MaskSpec, dense_mask
from tests.hf_factory import tiny_config

L, B = 12, 4  # stream length, block size
CFG = tiny_config()


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model


def tokens(shape, seed=0):
    return np.random.RandomState(seed).randint(0, CFG.vocab_size, size=shape).astype(np.int32)


# ---- masks against the method's definitions ----------------------------------------------------


def reference_visible(mode: str, q: int, k: int, block: int, length: int, window: int | None = None) -> bool:
    """docs/METHOD.md section 1, one (query, key) pair at a time, over physical indices; a sliding window
    hides keys `window` or more positions (not indices: x_t and x_0 share positions) before the query."""
    if window is not None and (q % length) - (k % length) >= window:
        return False
    if mode == "causal":
        return k <= q
    if mode == "bidirectional":
        return True
    if mode == "block":
        return k // block <= q // block
    s_q, s_k = q // length, k // length  # 0 = x_t half, 1 = x_0 half
    b_q, b_k = (q % length) // block, (k % length) // block
    if b_q == b_k and s_q == s_k:
        return True
    if s_q == 0 and s_k == 1 and b_k < b_q:
        return True
    return s_q == 1 and s_k == 1 and b_k <= b_q


@pytest.mark.parametrize("window", [None, 3, 6])
@pytest.mark.parametrize("mode", ["causal", "block", "bidirectional", "clean_context"])
def test_dense_mask_matches_double_loop(mode, window):
    physical = 2 * L if mode == "clean_context" else L
    segments = np.array([[1] * 8 + [2] * 4] * (2 if mode == "clean_context" else 1)).reshape(1, physical)
    mask = np.asarray(dense_mask(MaskSpec(mode, B, L, window), physical, physical, segments, segments))[0]
    expected = np.array(
        [[reference_visible(mode, q, k, B, L, window) and segments[0, q] == segments[0, k] for k in range(physical)]
         for q in range(physical)]
    )
    np.testing.assert_array_equal(mask, expected)


# ---- model-level identities ----------------------------------------------------------------------


def test_block_size_one_is_causal(model):
    x = tokens((2, L))
    np.testing.assert_allclose(model(x, attention="block", block_size=1), model(x), rtol=1e-6, atol=1e-6)


def test_clean_half_equals_block_mode_on_x0(model):
    xt, x0 = tokens((2, L), seed=1), tokens((2, L), seed=2)
    both = model(np.concatenate([xt, x0], axis=1), attention="clean_context", block_size=B)
    np.testing.assert_allclose(both[:, L:], model(x0, attention="block", block_size=B), rtol=1e-5, atol=1e-5)


def test_noisy_block_depends_only_on_itself_and_clean_past(model):
    xt, x0 = tokens((1, L), seed=1), tokens((1, L), seed=2)
    block = slice(B, 2 * B)  # the middle block
    run = nnx.jit(lambda m, a, b: m(jnp.concatenate([a, b], axis=1), attention="clean_context", block_size=B))
    base = np.asarray(run(model, xt, x0))

    def changed(xt_new, x0_new) -> tuple[bool, bool]:
        out = np.asarray(run(model, xt_new, x0_new))
        return (not np.allclose(out[:, block], base[:, block], atol=1e-6),
                not np.allclose(out[:, L:], base[:, L:], atol=1e-6))

    def perturb(x, where):
        x = x.copy()
        x[:, where] = (x[:, where] + 1) % CFG.vocab_size
        return x

    # x_t of other blocks and x_0 of the own and later blocks are invisible to the middle x_t block.
    assert changed(perturb(xt, np.r_[0:B, 2 * B:L]), x0)[0] is False
    assert changed(xt, perturb(x0, np.r_[B:L]))[0] is False
    # its own x_t block and the clean earlier block are read.
    assert changed(perturb(xt, np.r_[B + 1]), x0)[0] is True
    assert changed(xt, perturb(x0, np.r_[B - 1]))[0] is True
    # x_0 never sees x_t.
    assert changed(perturb(xt, np.r_[0:L]), x0)[1] is False


@pytest.mark.parametrize("mode", ["causal", "block", "bidirectional", "clean_context"])
def test_packed_documents_equal_documents_alone(model, mode):
    doc_a, doc_b = tokens((1, 8), seed=4), tokens((1, 4), seed=5)
    segments = np.array([[1] * 8 + [2] * 4], np.int32)
    positions = np.array([list(range(8)) + list(range(4))], np.int32)

    def run(parts, segment_ids=None, positions=None):
        if mode != "clean_context":
            return np.asarray(model(parts, attention=mode, block_size=B, segment_ids=segment_ids, positions=positions))
        noisy = (parts + 7) % CFG.vocab_size  # a distinct x_t; the x_t logits are compared
        out = model(np.concatenate([noisy, parts], axis=1), attention="clean_context", block_size=B,
                    segment_ids=segment_ids, positions=positions)
        return np.asarray(out)[:, : parts.shape[1]]

    packed = run(np.concatenate([doc_a, doc_b], axis=1), segments, positions)
    np.testing.assert_allclose(packed[:, :8], run(doc_a), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(packed[:, 8:], run(doc_b), rtol=1e-5, atol=1e-5)


def test_bad_block_sizes_are_refused(model):
    with pytest.raises(ValueError, match=r"^block_size 5 does not divide sequence length 12$"):
        model(tokens((1, L)), attention="block", block_size=5)
    with pytest.raises(ValueError, match=r"attention mode 'clean_context' needs a positive block_size, got None"):
        model(tokens((1, 2 * L)), attention="clean_context")
    with pytest.raises(ValueError, match=r"clean_context input must be \[x_t ; x_0\] of even length, got 13"):
        model(tokens((1, 13)), attention="clean_context", block_size=1)
    with pytest.raises(ValueError, match=r"unknown attention mode 'sideways'"):
        model(tokens((1, L)), attention="sideways")
