"""Masking laws and the ELBO weight (docs/METHOD.md sections 2-3) against exact enumerations."""
import itertools
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
    expected = np.clip(np.ceil(np.asarray(rates) * block), 1, block)  # k = ceil(m n), n = block
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
    k = max(1, math.ceil(rate * block))
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


def _count_law(n, rate_min, rate_max):
    """P(k) for k = 1..n under the documented law: m ~ U(rate_min, rate_max), k = ceil(m n) in [1, n]."""
    cells = [(max(lo, rate_min), min(hi, rate_max)) for lo, hi in ((0.0, 1 / n), *(((k - 1) / n, k / n) for k in range(2, n + 1)))]
    return np.array([max(hi - lo, 0.0) for lo, hi in cells]) / (rate_max - rate_min)


def _subsets(n):
    return [s for k in range(1, n + 1) for s in itertools.combinations(range(n), k)]


def _weights_of(masks, eligible, block):
    """The code's ELBO weight for explicit masks (rows), as numpy."""
    fn = jax.jit(corruption.elbo_weight, static_argnums=2)
    return np.asarray(fn(jnp.asarray(masks), jnp.asarray(np.broadcast_to(eligible, masks.shape)), block))


@pytest.mark.parametrize("eligible", [[1, 1, 1, 1], [1, 0, 1, 1, 0, 1]], ids=["full", "padded"])
def test_elbo_weight_makes_the_weighted_loss_the_exact_any_order_bound(eligible):
    """Enumerate every mask S of one block with its probability under the uniform law (k uniform on
    1..n, S uniform given k) and any table CE(i | S masked): the expected weighted loss equals the
    any-order NLL bound averaged over all n! generation orders, computed independently here. A
    complementary pair gives twice the bound less the fully-masked term (counted once, not twice)."""
    eligible = np.array(eligible, bool)
    block, idx = len(eligible), np.flatnonzero(eligible)
    n = len(idx)
    rng = np.random.default_rng(0)
    ce = {s: dict(zip(s, rng.uniform(0.1, 3.0, len(s)))) for s in _subsets(n)}  # CE of token i given S masked
    bound = np.mean([sum(ce[tuple(sorted(order[j:]))][order[j]] for j in range(n)) for order in itertools.permutations(range(n))])
    law = _count_law(n, 1e-12, 1.0)
    subsets = _subsets(n)
    masks = np.zeros((len(subsets), block), bool)
    for r, s in enumerate(subsets):
        masks[r, idx[list(s)]] = True
    w = _weights_of(masks, eligible, block)
    comp = masks ^ eligible
    w_comp = _weights_of(comp, eligible, block)
    expected = pair = 0.0
    for r, s in enumerate(subsets):
        p = law[len(s) - 1] / math.comb(n, len(s))
        rest = tuple(i for i in range(n) if i not in s)
        loss = sum(w[r, idx[i]] * ce[s][i] for i in s)
        expected += p * loss
        pair += p * (loss + sum(w_comp[r, idx[i]] * ce[rest][i] for i in rest))
        assert np.all(w[r][~masks[r]] == 0) and np.all(w_comp[r][~comp[r]] == 0)
    np.testing.assert_allclose(expected, bound, rtol=1e-6)  # float32 weights
    full_mask_term = np.mean(list(ce[tuple(range(n))].values()))
    np.testing.assert_allclose(pair, 2 * bound - full_mask_term, rtol=1e-6)  # float32 weights


@pytest.mark.parametrize("masking", ["uniform", "position"])
def test_corrupt_draws_the_documented_law_and_weights_both_halves_alike(masking):
    """corrupt() against the exact law: the count k per block is uniform on 1..n (n eligible, so a
    partly padded block too), uniform masking draws every k-subset equally often, every masked token
    of both halves of a complementary pair carries n / k of its own half, and the pair covers each
    eligible token exactly once."""
    rows, length, block = 6000, 8, 4
    seg = np.ones((rows, length), np.int32)
    seg[:, -2:] = 0  # the second block has n = 2 eligible tokens
    batch = {"tokens": jnp.full((rows, length), 5, jnp.int32), "segment_ids": jnp.asarray(seg),
             "positions": jnp.broadcast_to(jnp.arange(length), (rows, length))}
    obj = Objective("block_diffusion", block, masking=masking, complementary=True, mask_token_id=1)
    ex = jax.jit(lambda b, k: corrupt(obj, b, k))(batch, jax.random.PRNGKey(3))
    masked = np.asarray(ex.inputs[:, :length]) == 1
    first, second = masked[:rows], masked[rows:]
    real = seg > 0
    np.testing.assert_array_equal(first.astype(int) + second.astype(int), real.astype(int))
    weight, count = np.asarray(ex.weight), np.asarray(ex.count)
    np.testing.assert_array_equal(count, masked.astype(np.float32))
    for b, n in ((0, 4), (1, 2)):
        cols = slice(b * block, b * block + n)
        k = masked[:, cols].sum(1)
        want = np.where(masked[:, cols], (n / np.maximum(k, 1))[:, None], 0.0)
        np.testing.assert_allclose(weight[:, cols], want, rtol=1e-6)
        law = _count_law(n, obj.rate_min, obj.rate_max)
        freq = np.bincount(k[:rows], minlength=n + 1)[1:] / rows
        assert np.all(np.abs(freq - law) <= 5 * np.sqrt(law * (1 - law) / rows)), (freq, law)
        if masking == "uniform":
            patterns = {s: np.mean(np.all(first[:, cols] == np.isin(np.arange(n), s), 1)) for s in _subsets(n)}
            for s, f in patterns.items():
                p = law[len(s) - 1] / math.comb(n, len(s))
                assert abs(f - p) <= 5 * np.sqrt(p * (1 - p) / rows), (s, f, p)


def test_bidirectional_weights_by_the_row_masked_fraction():
    """MDLM: the whole row is one block; weight = (eligible tokens of the row) / (masked in the row)."""
    rows, length = 64, 16
    seg = np.ones((rows, length), np.int32)
    seg[::2, 10:] = 0
    batch = {"tokens": jnp.full((rows, length), 5, jnp.int32), "segment_ids": jnp.asarray(seg),
             "positions": jnp.broadcast_to(jnp.arange(length), (rows, length))}
    obj = Objective("bidirectional", None, masking="uniform", mask_token_id=1)
    ex = jax.jit(lambda b, k: corrupt(obj, b, k))(batch, jax.random.PRNGKey(4))
    masked = np.asarray(ex.inputs) == 1
    n, k = (seg > 0).sum(1), masked.sum(1)
    assert np.all(k >= 1) and not masked[seg == 0].any()
    np.testing.assert_allclose(np.asarray(ex.weight), np.where(masked, (n / k)[:, None], 0.0), rtol=1e-6)


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
