"""Trajectory self-distillation (opd.target=self, docs/METHOD.md section 13) and CAP in OPD (section 9): the
student's training example from a hand-made trajectory against a slow pure-Python reference, and both OPD
losses (self CE, teacher KL, each + CAP) against NumPy from the model's own logits on a real rollout."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict

from efficient_dlm.config import base_config, typed
from efficient_dlm.diffusion.objectives import Objective, predict_hidden
from efficient_dlm.diffusion.opd import Trajectory, student_example
from efficient_dlm.train import opd as opd_lib
from efficient_dlm.train.state import split_model
from tests.hf_factory import variant
from tests.sample_reference import peaked_model
from tests.test_opd import BLOCK, MASK, PROMPTS, _batch

W = 0.5  # diffusion.confidence_weight


@pytest.fixture(scope="module")
def model():
    return peaked_model()

# Two rows of width 12 (blocks of 4). Row 0: prompt 0..2, outputs 3..11, the kept output ends at 9 (a stop
# token), 10 and 11 committed after it. Row 1: prompt 0..4, outputs 5..11, all kept. -1: prompt.
STEPS = [[-1, -1, -1, 0, 1, 1, 3, 2, 4, 5, 4, 6],
         [-1, -1, -1, -1, -1, 0, 1, 0, 2, 3, 2, 2]]
PROMPT_LENGTHS, LENGTHS = [3, 5], [7, 7]


def _trajectory() -> Trajectory:
    tokens = np.random.default_rng(0).integers(2, MASK, (2, 12)).astype(np.int32)
    return Trajectory(jnp.asarray(tokens), jnp.asarray(STEPS, jnp.int32), jnp.asarray(PROMPT_LENGTHS),
                      jnp.asarray(LENGTHS), jnp.asarray([12, 12]))


def _reference(tokens: np.ndarray, chosen: list[list[int]]):
    """x_t, trained positions and targets written out position by position: a position is visible when it is
    a prompt token or was committed before its group's chosen step; it is trained when it is kept output,
    still [MASK], and in a block that ran the chosen step; its target is the trajectory's final token."""
    x_t, trained = tokens.copy(), np.zeros(tokens.shape, bool)
    for b in range(2):
        for j in range(12):
            s, c = STEPS[b][j], chosen[b][j]
            visible = j < PROMPT_LENGTHS[b] or 0 <= s < c
            if not visible:
                x_t[b, j] = MASK
            block = range(j // BLOCK * BLOCK, j // BLOCK * BLOCK + BLOCK)
            ran_here = c >= 0 and any(STEPS[b][k] == c for k in block)
            kept = PROMPT_LENGTHS[b] <= j < PROMPT_LENGTHS[b] + LENGTHS[b]
            trained[b, j] = kept and not visible and ran_here
    return x_t, trained


@pytest.mark.parametrize("chosen", [
    [[2] * 12, [3] * 12],  # states=sequence: one step per row
    [[0] * 4 + [2] * 4 + [5] * 4, [-1] * 4 + [1] * 4 + [2] * 4],  # states=block: one step per block
])
def test_student_example_of_a_hand_made_trajectory_matches_the_slow_reference(chosen):
    traj = _trajectory()
    obj = Objective("block_diffusion", BLOCK, mask_token_id=MASK)
    ex = student_example(traj, jnp.asarray(chosen, jnp.int32), obj)
    tokens = np.asarray(traj.tokens)
    x_t, trained = _reference(tokens, chosen)
    np.testing.assert_array_equal(np.asarray(ex.inputs), np.concatenate([x_t, tokens], axis=1))  # [x_t ; x_0]
    np.testing.assert_array_equal(np.asarray(ex.targets), tokens)  # the trajectory's final tokens
    np.testing.assert_array_equal(np.asarray(ex.weight), trained.astype(np.float32))
    np.testing.assert_array_equal(np.asarray(ex.count), trained.astype(np.float32))
    np.testing.assert_array_equal(np.asarray(ex.positions), np.tile(np.arange(12), (2, 1)))
    np.testing.assert_array_equal(np.asarray(ex.segment_ids), np.ones((2, 12), np.int32))
    assert trained.sum() >= 3  # the reference is not vacuous


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_opd_losses_self_ce_and_teacher_kl_each_plus_cap_match_numpy(model):
    """One greedy rollout (block 4, one token per step); on its chosen states the self target's loss is
    (sum CE toward the trajectory + W sum [argmax == token] H) / count and the teacher target's is
    (sum KL(teacher || student) + W sum [argmax == teacher argmax] H) / count."""
    config = base_config()
    config.diffusion.confidence_weight = W
    config.opd.update(dict(block_size=BLOCK, strategy="topk", steps_per_block=BLOCK, states="block", top_k=0))
    teacher = variant(model, mask_token_id=None)
    self_config = ConfigDict(config.to_dict())
    self_config.opd.target = "self"
    teacher_parts = opd_lib._parts(typed(config), model.config, teacher.config, 8)
    self_parts = opd_lib._parts(typed(self_config), model.config, None, 8)
    params, teacher_params = split_model(model)[1], split_model(teacher)[1]

    @jax.jit
    def run(batch):
        ex, h_t, _ = opd_lib._states_and_teacher(teacher_parts, params, teacher_params, batch, jax.random.PRNGKey(1))
        normaliser = jnp.sum(ex.count)
        self_out = opd_lib._loss_fn(self_parts, None)(params, (ex, None), normaliser, None, 0)
        teacher_out = opd_lib._loss_fn(teacher_parts, teacher_params)(params, (ex, h_t), normaliser, None, 0)
        h, _ = predict_hidden(model, teacher_parts.objective, ex)
        return ex, self_out, teacher_out, model.logits(h), teacher.logits(h_t)

    ex, (self_loss, self_sums), (kd_loss, kd_sums), logits, teacher_logits = run(_batch(PROMPTS))
    count, targets = np.asarray(ex.count), np.asarray(ex.targets)
    log_q = _log_softmax(logits)
    entropy = -(np.exp(log_q) * log_q).sum(-1)
    ce = -np.take_along_axis(log_q, targets[..., None], -1)[..., 0]
    correct = np.argmax(log_q, -1) == targets
    assert (count * correct).sum() > 0 and count.sum() > (count * correct).sum()
    want = ((count * ce).sum() + W * (count * correct * entropy).sum()) / count.sum()
    np.testing.assert_allclose(float(self_sums["loss"]), want, rtol=2e-5)
    np.testing.assert_allclose(float(self_sums["correct"]), (count * correct).sum())
    log_p = _log_softmax(teacher_logits)
    kl = (np.exp(log_p) * (log_p - log_q)).sum(-1)
    agree = np.argmax(log_q, -1) == np.argmax(log_p, -1)
    want = ((count * kl).sum() + W * (count * agree * entropy).sum()) / count.sum()
    np.testing.assert_allclose(float(kd_sums["loss"]), want, rtol=2e-5)
    metrics = opd_lib.summarize({**jax.device_get(self_sums), "generated": 1.0, "row_forwards": 1.0})
    assert {"trajectory_nll", "trajectory_accuracy", "confidence_loss"} <= set(metrics) and "kl" not in metrics
