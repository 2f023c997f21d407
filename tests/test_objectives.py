"""Objectives and losses against direct computations from the model's own logits."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import efficient_dlm as edlm
from efficient_dlm.diffusion.losses import token_stats
from efficient_dlm.diffusion.objectives import Objective, corrupt, loss_and_sums, predict_hidden
from efficient_dlm.models.masks import MaskSpec, visible

CFG = edlm.ModelConfig(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1,
    head_dim=16, mask_token_id=63, eos_token_id=1,
)
L, B = 16, 4


@pytest.fixture(scope="module")
def model():
    from efficient_dlm.models.decoder import abstract_model
    from flax import nnx

    model = abstract_model(CFG)  # parameters made by one compiled program (eager init is slow on CPU)
    nnx.update(model, jax.jit(lambda: nnx.state(edlm.init_model(CFG, seed=0)))())
    return model


def _batch():
    rng = np.random.default_rng(0)
    tokens = rng.integers(2, 60, (B, L)).astype(np.int32)
    seg = np.array([[1] * L, [1] * 7 + [2] * 9, [1] * 12 + [0] * 4, [1] * 3 + [2] * 13], np.int32)
    pos = np.zeros_like(seg)
    for r in range(B):
        for i in range(1, L):
            pos[r, i] = pos[r, i - 1] + 1 if seg[r, i] == seg[r, i - 1] else 0
    return {"tokens": jnp.asarray(tokens), "segment_ids": jnp.asarray(seg), "positions": jnp.asarray(pos)}


def test_clean_context_pattern_matches_direct_construction():
    """visible() for [x_t ; x_0] against docs/METHOD.md section 1 written out index by index."""
    length, block = 12, 4
    spec = MaskSpec("clean_context", block, length)
    got = np.asarray(visible(spec, jnp.arange(2 * length)[:, None], jnp.arange(2 * length)[None, :]))
    for q, k in itertools.product(range(2 * length), repeat=2):
        sq, sk = q // length, k // length
        bq, bk = (q % length) // block, (k % length) // block
        if sq == 0 and sk == 0:
            want = bq == bk  # x_t sees its own noisy block only
        elif sq == 0 and sk == 1:
            want = bk < bq  # x_t sees clean earlier blocks
        elif sq == 1 and sk == 1:
            want = bk <= bq  # x_0 is block-causal over clean blocks
        else:
            want = False  # x_0 never sees x_t
        assert got[q, k] == want, (q, k)


def test_clean_context_forward_sees_exactly_the_allowed_tokens(model):
    """Changing x_t of other blocks or x_0 of the same/later blocks leaves a block's logits unchanged;
    changing x_0 of an earlier block changes them."""
    obj = Objective("block_diffusion", 4, mask_token_id=63)
    rng = np.random.default_rng(1)
    base = rng.integers(2, 60, (1, 2 * L)).astype(np.int32)

    @jax.jit
    def logits_of(tokens):
        h, _ = predict_hidden(model, obj, corrupt_free(tokens), key=None)
        return model.logits(h)

    def x_t_logits(tokens):
        return np.asarray(logits_of(jnp.asarray(tokens)))[0, 4:8]  # block 1 of x_t

    ref = x_t_logits(base)
    for changed, should_change in [(list(range(0, 4)), False), (list(range(8, 16)), False),
                                   (list(range(L + 4, 2 * L)), False), (list(range(L, L + 4)), True)]:
        tokens = base.copy()
        tokens[0, changed] = (tokens[0, changed] + 7) % 60 + 2
        diff = np.abs(x_t_logits(tokens) - ref).max()
        assert (diff > 1e-4) == should_change, (changed, diff)


def corrupt_free(tokens):
    """An Example holding given [x_t ; x_0] tokens (no sampling), for pattern checks."""
    from efficient_dlm.diffusion.objectives import Example

    n = tokens.shape[1] // 2
    ones = jnp.ones((1, n), jnp.int32)
    zeros = jnp.zeros((1, n))
    return Example(tokens, ones, jnp.arange(n)[None], tokens[:, n:], zeros, zeros, zeros > 0)


def _direct_ce(logits, targets):
    logits = np.asarray(logits, np.float64)
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    return lse - np.take_along_axis(logits, targets[..., None], -1)[..., 0]


@pytest.mark.parametrize("kind,shift", [("block_diffusion", False), ("block_diffusion", True), ("bidirectional", False), ("ar", True)])
def test_loss_equals_direct_computation(model, kind, shift):
    obj = Objective(kind, 4, token_shift=shift and kind != "ar", mask_token_id=63)
    batch = _batch()
    attention = {"block_diffusion": "clean_context", "bidirectional": "bidirectional", "ar": "causal"}[kind]

    @jax.jit
    def run(batch):
        ex = corrupt(obj, batch, jax.random.PRNGKey(5))
        loss, aux, sums = loss_and_sums(model, obj, ex, normaliser=jnp.sum(ex.count))
        # Direct: the model on the inputs with the documented attention; rows picked below in numpy.
        logits = model(ex.inputs, attention=attention, block_size=4 if kind == "block_diffusion" else None,
                       segment_ids=ex.segment_ids, positions=ex.positions)
        return ex, loss, aux, sums, logits

    ex, loss, aux, sums, logits = run(batch)
    logits = np.asarray(logits)
    x_t, x_0 = logits[:, :L], logits[:, L:]
    if obj.shifted:
        rows = np.zeros_like(x_t)
        for i in range(1, L):
            rows[:, i] = x_0[:, i - 1] if (kind == "block_diffusion" and i % 4 == 0) else x_t[:, i - 1]
    else:
        rows = x_t
    ce = _direct_ce(rows, np.asarray(ex.targets))
    weight, count = np.asarray(ex.weight), np.asarray(ex.count)
    if kind != "ar":
        masked = np.asarray(ex.inputs)[:, :L] == 63
        np.testing.assert_array_equal(count > 0, masked)
    expected = (weight * ce).sum() / count.sum()
    np.testing.assert_allclose(float(loss), expected, rtol=2e-5)
    np.testing.assert_allclose(float(sums["ce"]), (count * ce).sum(), rtol=2e-5)
    assert float(aux) == 0.0


@pytest.mark.parametrize("complementary", [False, True])
def test_ar_weight_adds_the_causal_next_token_loss(model, complementary):
    """Joint objective (diffusion.ar_weight): loss = diffusion loss + w * mean causal CE of the clean batch,
    the causal CE computed directly from model(tokens, attention="causal") in NumPy."""
    batch, w = _batch(), 0.7
    obj = Objective("block_diffusion", 4, token_shift=True, mask_token_id=63, complementary=complementary, ar_weight=w)

    @jax.jit
    def run(batch):
        ex = corrupt(obj, batch, jax.random.PRNGKey(5))
        joint, _, sums = loss_and_sums(model, obj, ex, normaliser=jnp.maximum(jnp.sum(ex.count), 1.0))
        plain_ex = ex._replace(ar_count=None, ar_weight=None)
        plain, _, _ = loss_and_sums(model, obj, plain_ex, normaliser=jnp.maximum(jnp.sum(ex.count), 1.0))
        logits = model(batch["tokens"], attention="causal", segment_ids=batch["segment_ids"], positions=batch["positions"])
        return joint, plain, sums, logits

    joint, plain, sums, logits = run(batch)
    seg, tokens = np.asarray(batch["segment_ids"]), np.asarray(batch["tokens"])
    ce = _direct_ce(np.asarray(logits)[:, :-1], tokens[:, 1:])  # position i predicts token i + 1
    same_doc = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
    ar_mean = ce[same_doc].mean()
    np.testing.assert_allclose(float(joint), float(plain) + w * ar_mean, rtol=2e-5)
    np.testing.assert_allclose(float(sums["ar_ce"] / sums["ar_count"]), ar_mean, rtol=2e-5)
    assert float(sums["ar_count"]) == same_doc.sum()


def test_chunked_loss_equals_plain_and_padded_vocab_is_never_predicted(model):
    h = jax.random.normal(jax.random.PRNGKey(0), (B, L, CFG.hidden_size))
    targets = jax.random.randint(jax.random.PRNGKey(1), (B, L), 0, 50)
    valid = 50

    def total(params_model, chunk, z):
        stats = token_stats(params_model, h, targets, valid_vocab=valid, chunk=chunk)
        return jnp.sum(stats.ce) + z * jnp.sum(stats.lse**2), stats

    from flax import nnx

    def grad_of(chunk, z):
        graphdef, params = nnx.split(model)
        fn = lambda p: total(nnx.merge(graphdef, p), chunk, z)
        (value, stats), grads = jax.jit(jax.value_and_grad(fn, has_aux=True))(params)
        return value, stats, grads

    plain_value, plain_stats, plain_grads = grad_of(0, 1e-3)
    chunk_value, chunk_stats, chunk_grads = grad_of(4, 1e-3)
    np.testing.assert_allclose(float(chunk_value), float(plain_value), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(chunk_grads), jax.tree.leaves(plain_grads)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    # Direct reference: softmax over the valid rows only, z-loss = z * logsumexp^2.
    logits = np.asarray(jax.jit(model.logits)(h))[..., :valid]
    ce = _direct_ce(logits, np.asarray(targets))
    np.testing.assert_allclose(np.asarray(plain_stats.ce), ce, rtol=1e-5)
    lse = np.log(np.exp(logits.astype(np.float64)).sum(-1))
    np.testing.assert_allclose(float(plain_value), ce.sum() + 1e-3 * (lse**2).sum(), rtol=1e-5)
    # The tied embedding rows of padded ids receive no gradient from the loss.
    assert np.all(np.asarray(plain_grads["embed_tokens"][...])[valid:] == 0)
