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
    """P(M) over every subset M of a block's eligible positions, integrated over m on a midpoint grid."""
    rates = obj.rate_min + (np.arange(GRID) + 0.5) / GRID * (obj.rate_max - obj.rate_min)
    lam = math.log(2.0) / (obj.half_life * BLOCK)
    probs = {}
    for size in range(len(eligible) + 1):
        for members in itertools.combinations(eligible, size):
            total = 0.0
            for m in rates:
                if obj.masking == "uniform":
                    total += m**size * (1 - m) ** (len(eligible) - size)
                    continue
                k = min(max(1, int(np.round(m * BLOCK))), len(eligible))
                if k == size:
                    weights = {i: math.exp(lam * (1 - m) * (i % BLOCK)) for i in eligible}
                    total += _plackett_luce_set(members, weights)
            probs[members] = total / GRID
    return probs


def _masked_ces(model, tokens: list[int], subsets: list[tuple[int, ...]], shift: bool) -> dict[tuple[int, ...], float]:
    """Sum of CE over each subset with only its positions masked, block-causal attention (no [x_t ; x_0]);
    one batched forward for all subsets."""
    padded = -(-len(tokens) // BLOCK) * BLOCK
    x = np.zeros((len(subsets), padded), np.int32)
    x[:, : len(tokens)] = tokens
    for row, members in enumerate(subsets):
        x[row, list(members)] = MASK_ID
    segment_ids = np.broadcast_to((np.arange(padded) < len(tokens)).astype(np.int32), x.shape)  # padding: no document
    logits = np.asarray(model(x, attention="block", block_size=BLOCK, segment_ids=segment_ids), np.float64)
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    return {members: float(-sum(logp[row, i - 1 if shift else i, tokens[i]] for i in members))
            for row, members in enumerate(subsets)}


def exact_elbo(model, obj: Objective) -> float:
    """E over the training corruption of sum_blocks (E_b / |M_b|) * masked CE, by enumeration."""
    tokens = CONTEXT + CONTINUATION
    blocks = [[i for i in range(b, min(b + BLOCK, len(tokens))) if i >= len(CONTEXT)] for b in range(0, len(tokens), BLOCK)]
    probs = [_subset_probabilities(eligible, obj) for eligible in blocks]
    ces = _masked_ces(model, tokens, [m for p in probs for m in p if m], obj.token_shift)
    total = 0.0
    for eligible, block_probs in zip(blocks, probs):
        value = lambda members: len(eligible) / len(members) * ces[members] if members else 0.0
        for members, p in block_probs.items():
            rest = tuple(i for i in eligible if i not in members)
            total += p * (0.5 * (value(members) + value(rest)) if obj.complementary else value(members))
    return total


@pytest.mark.parametrize("masking,token_shift,complementary", [("position", True, True), ("uniform", False, False)])
def test_elbo_estimate_converges_to_the_exact_enumeration(peaked_model, masking, token_shift, complementary):
    obj = Objective(kind="block_diffusion", block_size=BLOCK, masking=masking, token_shift=token_shift,
                    complementary=complementary, mask_token_id=MASK_ID)
    plan = likelihood.ElboPlan(obj, copies=1)
    samples = 4096
    values = likelihood.elbo_samples(peaked_model, plan, [(CONTEXT, CONTINUATION)], samples=samples,
                                     key=jax.random.PRNGKey(0), prefix_id=0)[:, 0]
    assert values.shape == (samples // (2 if complementary else 1),)
    estimate, stderr = values.mean(), values.std(ddof=1) / math.sqrt(len(values))
    exact = exact_elbo(peaked_model, obj)
    assert values.std() > 0.05 * exact  # the masks matter: a wrong mask distribution or weight would show
    assert abs(estimate - exact) < 4 * stderr, (estimate, exact, stderr)


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
