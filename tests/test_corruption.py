"""Masking statistics (METHOD.md section 2) against direct computations."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficient_dlm.diffusion import corruption
from efficient_dlm.diffusion.objectives import Objective, corrupt


def _position_mask(key, rates, eligible, block, half_life=0.25):
    return jax.jit(corruption.position_dependent_mask, static_argnums=(3, 4))(key, rates, eligible, block, half_life)


def test_exact_k_per_block_and_clipped_rates():
    batch, length, block = 16, 64, 16
    rates = corruption.block_rates(jax.random.PRNGKey(0), batch, length // block, 0.2, 0.7)
    assert float(rates.min()) >= 0.2 and float(rates.max()) <= 0.7
    mask = _position_mask(jax.random.PRNGKey(1), rates, jnp.ones((batch, length), bool), block)
    per_block = np.asarray(mask).reshape(batch, -1, block).sum(-1)
    expected = np.maximum(1, np.round(np.asarray(rates) * block))
    np.testing.assert_array_equal(per_block, expected)


def _sequential_weighted_sample(rng, weights, k, draws):
    """Reference: k draws one at a time, each proportional to the remaining weights."""
    counts = np.zeros(len(weights))
    for _ in range(draws):
        w = weights.copy()
        for _ in range(k):
            i = rng.choice(len(w), p=w / w.sum())
            counts[i] += 1
            w[i] = 0.0
    return counts / draws


@pytest.mark.parametrize("rate", [1 / 16, 0.375])
def test_position_bias_matches_weighted_sampling_without_replacement(rate):
    block, half_life, draws = 16, 0.25, 4000
    lam = math.log(2) / (half_life * block)
    weights = np.exp(lam * (1 - rate) * np.arange(block))
    k = max(1, round(rate * block))
    rates = jnp.full((draws, 1), rate, jnp.float32)
    mask = _position_mask(jax.random.PRNGKey(2), rates, jnp.ones((draws, block), bool), block, half_life)
    freq = np.asarray(mask).mean(0)
    if k == 1:
        reference = weights / weights.sum()  # exact inclusion probability for one draw
    else:
        reference = _sequential_weighted_sample(np.random.default_rng(0), weights, k, 1500)
    tolerance = 5 * np.sqrt(reference * (1 - reference) * (1 / draws + (0 if k == 1 else 1 / 1500)))
    assert np.all(np.abs(freq - reference) <= tolerance + 1e-3), (freq, reference)
    assert freq[-1] > freq[0]  # later positions are masked more often at small rates


def test_uniform_masking_rate_and_complementary_pairs_cover_every_token_once():
    batch, length = 64, 32
    tokens = jnp.arange(batch * length, dtype=jnp.int32).reshape(batch, length) % 50 + 2
    segment_ids = jnp.ones((batch, length), jnp.int32).at[:, -4:].set(0)  # 4 padding tokens per row
    batch_dict = {"tokens": tokens, "segment_ids": segment_ids, "positions": jnp.broadcast_to(jnp.arange(length), (batch, length))}
    obj = Objective("block_diffusion", 8, masking="uniform", complementary=True, mask_token_id=1)
    ex = jax.jit(lambda b, k: corrupt(obj, b, k))(batch_dict, jax.random.PRNGKey(3))
    x_t = np.asarray(ex.inputs[:, :length])
    masked = x_t == 1
    np.testing.assert_array_equal(np.asarray(ex.inputs[:, length:]), np.tile(np.asarray(tokens), (2, 1)))
    first, second = masked[:batch], masked[batch:]
    real = np.asarray(segment_ids) > 0
    np.testing.assert_array_equal(first.astype(int) + second.astype(int), real.astype(int))
    # ELBO weight 1/m on masked tokens; the complement's rate is its masked fraction of the block.
    weight, count = np.asarray(ex.weight), np.asarray(ex.count)
    np.testing.assert_array_equal(count, masked.astype(np.float32))
    assert np.all(weight[masked] >= 1.0) and np.all(weight[~masked] == 0)
    # Uniform: one rate per block (equal weights inside a block); m ~ U(1e-3, 1) masks half on average.
    for row in range(batch):
        for b in range(length // 8):
            w = weight[row, b * 8:(b + 1) * 8][first[row, b * 8:(b + 1) * 8]]
            assert np.allclose(w, w[0]) if len(w) else True
    assert abs(first[real].mean() - 0.5) < 0.08


def test_token_shift_never_masks_document_starts_and_ar_weights():
    tokens = jnp.arange(2, 34, dtype=jnp.int32)[None]
    seg = jnp.array([[1] * 10 + [2] * 14 + [0] * 8], jnp.int32)
    pos = jnp.array([list(range(10)) + list(range(14)) + list(range(8))], jnp.int32)
    b = {"tokens": jnp.tile(tokens, (256, 1)), "segment_ids": jnp.tile(seg, (256, 1)), "positions": jnp.tile(pos, (256, 1))}
    obj = Objective("block", 8, token_shift=True, rate_min=0.9, mask_token_id=1)
    ex = jax.jit(lambda b, k: corrupt(obj, b, k))(b, jax.random.PRNGKey(4))
    masked = np.asarray(ex.inputs) == 1
    assert not masked[:, [0, 10]].any() and not masked[:, 24:].any()
    assert masked[:, 1:10].mean() > 0.8
    ar = jax.jit(lambda b: corrupt(Objective("ar", None), b, None))(b)
    expected = np.array([0] + [1] * 9 + [0] + [1] * 13 + [0] * 8, np.float32)
    np.testing.assert_array_equal(np.asarray(ar.count)[0], expected)
    np.testing.assert_array_equal(np.asarray(ar.inputs), np.asarray(b["tokens"]))


def test_mask_embedding_noise_only_on_masks_and_only_early():
    emb = jnp.zeros((2, 4, 8))
    noised = jnp.array([[True, False, True, False], [False] * 4])
    noise = jax.jit(lambda step: corruption.mask_embedding_noise(jax.random.PRNGKey(0), emb, noised, 0.5, step, 10))
    out = np.asarray(noise(jnp.asarray(3)))
    assert np.all(out[~np.asarray(noised)] == 0) and np.all(np.abs(out[np.asarray(noised)]).sum(-1) > 0)
    assert np.all(np.asarray(noise(jnp.asarray(10))) == 0)
