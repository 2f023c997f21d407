"""Block-diffusion training and sampling of a tiny MoE model end to end (trainer, then the cached
sampler against the slow full-recompute reference of tests/sample_reference.py)."""
import numpy as np
from flax import nnx

import efficient_dlm as edlm
from efficient_dlm.models.moe import BIAS_PATH
from efficient_dlm.sample.api import generate
from efficient_dlm.train.loop import train
from tests.corpus import documents, write_jsonl
from tests.sample_reference import reference_dlm
from tests.test_moe_configs import _recipe


def test_block_diffusion_training_of_a_tiny_moe_learns_and_balances(tmp_path):
    c = _recipe("tiny_moe_train")
    c.data.train_files = write_jsonl(tmp_path / "train.jsonl", documents(300, 1))
    c.data.eval_files = ""
    c.data.update(seq_len=32, num_threads=1)
    c.diffusion.block_size = 4
    c.model.update(first_k_dense=0, num_layers=1)  # one stack to compile (dense prefixes: test_moe_parity)
    c.train.update(dict(steps=8, batch_size=4, learning_rate=3e-3, warmup_steps=2, save_every=8, eval_every=0,
                        log_every=1, progress=False))
    c.run_dir = str(tmp_path / "run")
    result = train(c)
    history = result.history
    nll = [h["nll"] for h in history]
    assert np.mean(nll[-3:]) < np.mean(nll[:3]) - 0.3, nll
    assert all(0 < h["aux_loss"] < 1 and h["expert_load_max"] >= 1 >= h["expert_load_min"] for h in history)
    # The selection bias moved by +-rate per step (never by the optimizer) and was checkpointed.
    rate, steps = c.model.router_bias_update_rate, c.train.steps
    bias = np.asarray(dict(nnx.to_flat_state(result.state.params))[BIAS_PATH][...])
    moves = bias / rate
    assert np.abs(bias).max() > 0 and np.allclose(moves, np.round(moves), atol=1e-3) and np.abs(moves).max() <= steps
    np.testing.assert_array_equal(np.asarray(edlm.load(result.run_dir).layers.mlp.router.bias[...]), bias)

    # The trained MoE model samples with the cached jitted program exactly as the slow reference decodes.
    model = edlm.load(result.run_dir)
    prompts = [[5, 9, 13, 2, 7], [11, 3]]
    out = generate(model, prompts, max_new_tokens=6, block_size=4, strategy="threshold", threshold=0.3)
    for row, prompt in enumerate(prompts):
        tokens, _, steps = reference_dlm(model, prompt, block=4, max_new=6, strategy="threshold", threshold=0.3)
        assert out.sequences[row] == tokens
        assert out.row_forwards[row] == steps
