"""Block-diffusion training and sampling of a tiny MoE model end to end (trainer with capacity routing,
then the cached sampler against the slow full-recompute reference of tests/sample_reference.py and
the exported PyTorch model)."""
import numpy as np
import torch
import transformers
from flax import nnx

import efficient_dlm as edlm
from efficient_dlm.models.moe import BIAS_PATH
from efficient_dlm.sample.api import generate
from efficient_dlm.train.loop import train
from tests.corpus import documents, write_jsonl
from tests.test_hf_export import write_tokenizer
from tests.sample_reference import reference_dlm
from tests.test_moe_configs import _recipe


def test_block_diffusion_training_of_a_tiny_moe_learns_and_balances(tmp_path):
    """Trained with capacity 0.5 on both halves, each with its own (clean_routing="capacity", as the
    100B recipe: training drops x_t and x_0 assignments), the model decodes dropless, so the JAX
    sampler, the slow reference and the exported PyTorch model give the same tokens."""
    c = _recipe("tiny_moe_train")
    c.model.capacity_factor = 0.5
    c.model.clean_routing = "capacity"
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
    export = str(tmp_path / "export")
    edlm.to_hf(model, export, tokenizer_dir=write_tokenizer(tmp_path / "tok", model.config.vocab_size), block_size=4)
    hf = transformers.AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True, dtype=torch.float32)
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        result = hf.generate(ids, attention_mask=mask, max_new_tokens=6, threshold=0.3, return_dict_in_generate=True)
    assert [list(map(int, r)) for r in result["new_tokens"]] == out.sequences
    card = open(f"{export}/README.md").read()
    assert "dropless at inference" in card and "trained with expert capacity 0.5" in card
    assert "clean context with a capacity of its own" in card
