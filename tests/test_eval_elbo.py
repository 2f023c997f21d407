"""The dLM log-likelihood estimator (efficient_dlm/eval/likelihood.py) against an exact enumeration.

The reference is computed independently of `corrupt` and the clean-context layout: for every block of
the continuation it enumerates every subset M of the block's eligible tokens, its probability under
the training corruption (per-block rate m ~ U(rate_min, rate_max) integrated numerically; uniform:
Bernoulli(m) per token; position-dependent: k = max(1, round(m B)) tokens drawn without replacement
with weights exp(lambda (1 - m) i), the Plackett-Luce probability of the set), and the masked CE of M
from a block-causal forward in which only that block is masked (METHOD.md: what clean context sees).
The Monte Carlo estimate must lie within 4 standard errors of the exact expectation.
"""
import itertools
import math

import jax
import numpy as np
import pytest
from flax import nnx

from efficient_dlm.diffusion.objectives import Objective
from efficient_dlm.eval import likelihood
from tests.hf_factory import random_model, tiny_config

BLOCK = 4
MASK_ID = 96
CONTEXT = [5, 17, 33]  # the first block holds the context and one continuation token
CONTINUATION = [41, 8, 60, 23, 77, 12]  # blocks: {3}, {4, 5, 6, 7}, {8}
GRID = 4000  # midpoint rule over the rate m (error O(1/GRID) at the jumps of k)


@pytest.fixture(scope="module")
def peaked_model():
    """A tiny random model with large weights, so its predictions depend strongly on which tokens are masked."""
    model = random_model(tiny_config(mask_token_id=MASK_ID), seed=3)
    params = nnx.state(model, nnx.Param)
    scaled = jax.tree_util.tree_map_with_path(lambda p, x: x if "scale" in jax.tree_util.keystr(p) else x * 12.0, params)
    nnx.update(model, scaled)
    return model


def _plackett_luce_set(members: tuple[int, ...], weights: dict[int, float]) -> float:
    """P(the first |members| draws without replacement, proportional to weights, are exactly `members`)."""
    total = sum(weights.values())
    prob = 0.0
    for order in itertools.permutations(members):
        p, left = 1.0, total
        for i in order:
            p *= weights[i] / left
            left -= weights[i]
        prob += p
    return prob


def _subset_probabilities(eligible: list[int], obj: Objective) -> dict[tuple[int, ...], float]:
    """P(M) over the non-empty subsets M of a block's eligible positions under the training law
    (docs/METHOD.md section 2: k = min(n, max(1, ceil(m n))), weights exp(lambda (1 - m) i)), integrated
    over m ~ U(rate_min, rate_max) on a midpoint grid."""
    n = len(eligible)
    rates = obj.rate_min + (np.arange(GRID) + 0.5) / GRID * (obj.rate_max - obj.rate_min)
    lam = math.log(2.0) / (obj.half_life * BLOCK)
    probs = {m: 0.0 for size in range(1, n + 1) for m in itertools.combinations(eligible, size)}
    for m in rates:
        k = min(n, max(1, math.ceil(m * n)))
        weights = {i: math.exp(lam * (1 - m) * (i % BLOCK)) if obj.masking == "position" else 1.0 for i in eligible}
        for members in itertools.combinations(eligible, k):
            probs[members] += _plackett_luce_set(members, weights) / GRID
    return probs


def _masked_ces(model, subsets: list[tuple[int, ...]], shift: bool) -> dict[tuple[int, ...], dict[int, float]]:
    """CE of each position of each subset with only that subset masked, block-causal attention (no
    [x_t ; x_0]: what the clean-context pattern shows a block); one batched forward for all subsets."""
    tokens = CONTEXT + CONTINUATION
    padded = -(-len(tokens) // BLOCK) * BLOCK
    x = np.zeros((len(subsets), padded), np.int32)
    x[:, : len(tokens)] = tokens
    for row, members in enumerate(subsets):
        x[row, list(members)] = MASK_ID
    segment_ids = np.broadcast_to((np.arange(padded) < len(tokens)).astype(np.int32), x.shape)  # padding: no document
    logits = np.asarray(model(x, attention="block", block_size=BLOCK, segment_ids=segment_ids), np.float64)
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    return {members: {i: -logp[row, i - 1 if shift else i, tokens[i]] for i in members}
            for row, members in enumerate(subsets)}


def _blocks() -> list[list[int]]:
    """Eligible (continuation) positions of each block; the context stays clean."""
    length = len(CONTEXT + CONTINUATION)
    return [[i for i in range(b, min(b + BLOCK, length)) if i >= len(CONTEXT)] for b in range(0, length, BLOCK)]


def expected_training_loss(model, obj: Objective) -> float:
    """E over the training law of sum_blocks (n_b / |M_b|) * masked CE, by enumerating every mask."""
    probs = [_subset_probabilities(eligible, obj) for eligible in _blocks()]
    ces = _masked_ces(model, [m for p in probs for m in p], obj.token_shift)
    return sum(len(eligible) / len(m) * sum(ces[m].values()) * p
               for eligible, block in zip(_blocks(), probs) for m, p in block.items())


def any_order_bound(model, shift: bool) -> float:
    """sum_blocks E_sigma sum_j -log p(x_sigma_j | the block's tokens before j in sigma revealed): the average,
    over every order of revealing each block's tokens one at a time, of the order's NLL (METHOD.md section 3)."""
    orders = [list(itertools.permutations(eligible)) for eligible in _blocks()]
    subsets = sorted({tuple(sorted(o[j:])) for block in orders for o in block for j in range(len(o))})
    ces = _masked_ces(model, subsets, shift)
    return sum(sum(ces[tuple(sorted(o[j:]))][o[j]] for j in range(len(o))) / len(block) for block in orders for o in block)


def _estimate(model, obj: Objective, samples: int) -> tuple[float, float, int]:
    values = likelihood.elbo_samples(model, likelihood.ElboPlan(obj, copies=1), [(CONTEXT, CONTINUATION)],
                                     samples=samples, key=jax.random.PRNGKey(0), prefix_id=0)[:, 0]
    return values.mean(), values.std(ddof=1) / math.sqrt(len(values)), len(values)


def test_training_law_estimate_converges_to_the_exact_enumeration(peaked_model):
    """masking=train: position-dependent masks with token shift, as the demo trains."""
    obj = Objective(kind="block_diffusion", block_size=BLOCK, masking="position", token_shift=True, mask_token_id=MASK_ID)
    estimate, stderr, count = _estimate(peaked_model, obj, 4096)
    exact = expected_training_loss(peaked_model, obj)
    assert count == 4096 and stderr * math.sqrt(count) > 0.05 * exact  # the masks matter
    assert abs(estimate - exact) < 4 * stderr, (estimate, exact, stderr)


@pytest.mark.parametrize("complementary", [False, True])
def test_uniform_estimate_converges_to_the_any_order_bound(peaked_model, complementary):
    """The default ELBO (uniform masking, rates (1e-6, 1)); complementary pairs plus their fully-masked term."""
    obj = Objective(kind="block_diffusion", block_size=BLOCK, masking="uniform", rate_min=1e-6, rate_max=1.0,
                    complementary=complementary, mask_token_id=MASK_ID)
    estimate, stderr, count = _estimate(peaked_model, obj, 4096)
    bound = any_order_bound(peaked_model, shift=False)
    assert count == (2048 if complementary else 4096)
    assert abs(estimate - bound) < 4 * stderr, (estimate, bound, stderr)


def test_dlm_loglikelihood_is_minus_the_elbo_with_its_standard_error(peaked_model):
    """Batched requests (padding rows included) give each request its own estimate, reproducible from the seed."""
    obj = Objective(kind="block_diffusion", block_size=BLOCK, masking="uniform", mask_token_id=MASK_ID)
    plan = likelihood.ElboPlan(obj, copies=1)
    requests = [(CONTEXT, CONTINUATION), ([9, 9], [4, 5, 6]), (CONTEXT, CONTINUATION)]
    kwargs = dict(batch_size=2, samples=64, seed=1, prefix_id=0, samples_per_call=32)
    first = likelihood.dlm_loglikelihood(peaked_model, plan, requests, **kwargs)
    again = likelihood.dlm_loglikelihood(peaked_model, plan, requests, **kwargs)
    np.testing.assert_array_equal(first.logprob, again.logprob)
    assert np.all(first.logprob < 0) and np.all(first.stderr > 0)
    # the same request in another batch position with another key: an independent draw of the same estimator
    assert abs(first.logprob[0] - first.logprob[2]) < 4 * math.hypot(first.stderr[0], first.stderr[2])
