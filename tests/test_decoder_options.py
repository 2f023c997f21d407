"""Memory and compile options change nothing numerically: unrolled layers and every remat policy
give the default's logits and gradients (the default, scanned without remat, is the reference)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efficient_dlm.models.config import REMAT_POLICIES
from efficient_dlm.models.decoder import abstract_model
from tests.hf_factory import tiny_config, variant

CFG = tiny_config()
TOKENS = np.random.RandomState(0).randint(0, CFG.vocab_size, size=(2, 8)).astype(np.int32)


@nnx.jit
def loss_and_grads(model):
    def loss(m):
        logits = m(TOKENS, attention="block", block_size=4)
        return -jnp.mean(jax.nn.log_softmax(logits)[..., 0]), logits

    (value, logits), grads = nnx.value_and_grad(loss, has_aux=True)(model)
    return value, logits, nnx.state(grads, nnx.Param)


@pytest.fixture(scope="module")
def reference(tiny_model):
    assert tiny_model.config.scan_layers and tiny_model.config.remat_policy == "none"
    return loss_and_grads(tiny_model)


# Every remat policy is applied (test_options_shape_the_program); these check its numerics, scanned
# and unrolled. Each variant costs a forward+backward compile, so the remaining pairs are left out.
VARIANTS = [
    dict(scan_layers=False),
    dict(remat_policy="full"),
    dict(remat_policy="save_qkv_proj"),
    dict(scan_layers=False, remat_policy="dots_with_no_batch_dims"),
]


@pytest.mark.parametrize("changes", VARIANTS, ids=str)
def test_option_keeps_logits_and_grads(tiny_model, reference, changes):
    value, logits, grads = reference
    value2, logits2, grads2 = loss_and_grads(variant(tiny_model, **changes))
    np.testing.assert_allclose(logits2, logits, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(value2, value, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), grads2, grads)


@pytest.mark.parametrize("policy", REMAT_POLICIES)
@pytest.mark.parametrize("scan", [True, False])
def test_options_shape_the_program(policy, scan):
    """Each layer runs under remat exactly when a policy is set; scanning leaves one scan for all layers."""
    graphdef, state = nnx.split(abstract_model(CFG.replace(remat_policy=policy, scan_layers=scan)))
    jaxpr = str(jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(TOKENS))(state))
    assert jaxpr.count("remat") == (0 if policy == "none" else 1 if scan else CFG.num_layers)
    assert jaxpr.count("scan") == (1 if scan else 0)
