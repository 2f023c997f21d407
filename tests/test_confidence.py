"""Confidence-aware training (CAP, docs/METHOD.md section 9) against a direct NumPy computation from the
model's own logits: the entropy at masked positions whose argmax is the target, over the valid
vocabulary only, normalised by the global masked-token count; chunked and accumulated steps agree."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efficient_dlm.config import base_config, typed, validate
from efficient_dlm.diffusion.objectives import Objective, corrupt, loss_and_sums, predict_hidden
from efficient_dlm.errors import UserError
from efficient_dlm.models.config import ModelConfig
from efficient_dlm.train import step as step_lib
from tests.sample_reference import peaked_model

MASK, VALID, L, B, W = 95, 80, 16, 4, 0.5  # ids 80..95 are vocabulary padding; [MASK] = 95 is among them


@pytest.fixture(scope="module")
def model():
    return peaked_model()


def _batch() -> dict:
    rng = np.random.default_rng(0)
    tokens = rng.integers(2, VALID, (B, L)).astype(np.int32)
    seg = np.array([[1] * L, [1] * 7 + [2] * 9, [1] * 12 + [0] * 4, [1] * L], np.int32)
    pos = np.concatenate([np.arange(L)[None]] * B).astype(np.int32)
    pos[1, 7:] -= 7
    return {"tokens": jnp.asarray(tokens), "segment_ids": jnp.asarray(seg), "positions": jnp.asarray(pos)}


def _example_with_correct_targets(model, obj: Objective):
    """A corrupted batch whose targets are, at every other position, the model's own argmax over the valid
    ids (so both correct and wrong masked positions occur); targets feed only the loss, never the inputs."""
    ex = corrupt(obj, _batch(), jax.random.PRNGKey(3))
    h, _ = predict_hidden(model, obj, ex)
    best = jnp.argmax(model.logits(h)[..., :VALID], axis=-1).astype(ex.targets.dtype)
    take = (jnp.arange(L) % 2 == 0)[None, :]
    return ex._replace(targets=jnp.where(take, best, ex.targets)), model.logits(h)


def _direct(logits: np.ndarray, ex) -> tuple[float, float, float]:
    """(loss, CAP numerator, #correct masked) written out in float64 over the valid ids."""
    z = np.asarray(logits, np.float64)[..., :VALID]
    z = z - z.max(-1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(-1, keepdims=True))
    p = np.exp(log_p)
    entropy = -(p * log_p).sum(-1)
    targets, count, weight = (np.asarray(x) for x in (ex.targets, ex.count, ex.weight))
    ce = -np.take_along_axis(log_p, targets[..., None], -1)[..., 0]
    correct = (np.argmax(z, -1) == targets) & (count > 0)
    cap = (count * correct * entropy).sum()
    return ((weight * ce).sum() + W * cap) / count.sum(), cap, correct.sum()


@pytest.mark.parametrize("kind,shift", [("block_diffusion", True), ("block", False), ("bidirectional", False)])
def test_cap_term_equals_the_direct_entropy_of_masked_correct_positions(model, kind, shift):
    obj = Objective(kind, 4, token_shift=shift, mask_token_id=MASK, confidence_weight=W)

    @jax.jit
    def run():
        ex, logits = _example_with_correct_targets(model, obj)
        normaliser = jnp.sum(ex.count)
        out = [loss_and_sums(model, obj, ex, normaliser=normaliser, valid_vocab=VALID, chunk=c) for c in (0, 4)]
        return ex, logits, out

    ex, logits, ((loss, _, sums), (chunk_loss, _, chunk_sums)) = run()
    want_loss, want_cap, n_correct = _direct(logits, ex)
    assert 0 < n_correct < float(sums["count"])  # both cases occur
    np.testing.assert_allclose(float(sums["confidence"]), want_cap, rtol=2e-5)
    np.testing.assert_allclose(float(loss), want_loss, rtol=2e-5)
    np.testing.assert_allclose(float(chunk_loss), float(loss), rtol=1e-5)
    np.testing.assert_allclose(float(chunk_sums["confidence"]), float(sums["confidence"]), rtol=2e-5)
    metrics = step_lib.summarize(jax.device_get(sums))
    np.testing.assert_allclose(float(metrics["confidence_loss"]), want_cap / float(sums["count"]), rtol=2e-5)


def test_cap_gradient_accumulates_exactly_and_never_reaches_padded_ids(model):
    """Two micro-batches sum to the one-batch gradient (the term shares the global normaliser); the padded
    ids' LM-head columns get exactly zero gradient and nothing is non-finite."""
    obj = Objective("block_diffusion", 4, token_shift=True, mask_token_id=MASK, confidence_weight=W)
    graphdef, params = nnx.split(model)

    @jax.jit
    def grads(params):
        ex, _ = _example_with_correct_targets(nnx.merge(graphdef, params), obj)
        normaliser = jnp.sum(ex.count)
        out = []
        for accum in (1, 2):
            fn = jax.value_and_grad(step_lib._loss_fn(model.config, None, obj, VALID, 0, accum, 0.0, train=True), has_aux=True)
            out.append(step_lib.accumulate(fn, params, ex, normaliser, jax.random.PRNGKey(0), 0, accum))
        return out

    (one, one_sums), (two, two_sums) = grads(params)
    np.testing.assert_allclose(float(two_sums["confidence"]), float(one_sums["confidence"]), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(two), jax.tree.leaves(one)):
        assert np.all(np.isfinite(np.asarray(a)))
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5 * np.abs(np.asarray(b)).max())  # f32 sums
    head = np.asarray(one["lm_head"][...])
    assert np.all(head[:, VALID:] == 0) and np.abs(head[:, :VALID]).max() > 0


def test_cap_settings_are_validated_and_reach_the_objective():
    config = base_config()
    config.diffusion.confidence_weight = 0.25
    config.diffusion.confidence_temperature = 0.5
    cfg = ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1,
                      head_dim=16, mask_token_id=MASK)
    obj = typed(config).diffusion.make_objective(cfg.mask_token_id)
    assert (obj.confidence_weight, obj.confidence_temperature) == (0.25, 0.5)
    for key, value, objective in [("confidence_weight", -1.0, "block_diffusion"),
                                  ("confidence_temperature", 0.0, "block_diffusion"),
                                  ("confidence_weight", 0.5, "ar")]:
        bad = base_config()
        bad.diffusion.objective = objective
        bad.diffusion[key] = value
        with pytest.raises(UserError, match=f"diffusion.{key}"):
            validate(bad)

