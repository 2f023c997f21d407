"""MoE recipes (sizes against published counts), config validation, and the CLI import of a MoE model."""
import importlib.util
import os

import jax
import numpy as np
import pytest
from flax import nnx

import efficient_dlm as edlm
from efficient_dlm import cli
from efficient_dlm.config import model_config
from efficient_dlm.models.config import ModelConfig
from efficient_dlm.models.decoder import abstract_model
from tests.hf_moe_factory import make_moe_hf_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _recipe(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def _expected_params(c: ModelConfig) -> int:
    """Parameter count from the architecture, written out independently of the model code."""
    d, heads, kv, hd = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
    attention = d * hd * (2 * heads + 2 * kv) + (2 * hd if c.qk_norm else 0) + 2 * d
    moe = c.num_experts * (3 * d * c.moe_intermediate_size + d) + 3 * d * c.shared_expert_intermediate_size
    embeddings = c.vocab_size * d * (1 if c.tie_word_embeddings else 2)
    return embeddings + d + c.num_layers * attention + c.first_k_dense * 3 * d * c.intermediate_size + c.num_moe_layers * moe


# Published totals: Qwen3-30B-A3B's safetensors, and Ling-flash-2.0's BF16 count (LLaDA2.0-flash's base).
@pytest.mark.parametrize(
    "recipe,published",
    [("qwen3_30b_a3b", 30_532_122_624), ("moe_16b", None), ("moe_100b", 102_889_697_280), ("tiny_moe", None)],
)
def test_moe_recipes_build_with_the_expected_parameter_count(recipe, published):
    cfg = model_config(_recipe(recipe))
    params = nnx.state(abstract_model(cfg), nnx.Param)
    total = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params))
    assert total == _expected_params(cfg)
    if published is not None:
        assert total == published
    if recipe == "moe_16b":
        assert 16e9 < total < 16.5e9


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(num_experts=0), "model.num_experts must be positive"),
        (dict(num_experts_per_tok=9), r"model.num_experts_per_tok must be in 1..8"),
        (dict(router_groups=3), r"model.router_groups \(3\) must divide model.num_experts \(8\)"),
        (dict(router_groups=4, router_topk_groups=1, num_experts_per_tok=3), "exceeds the 2 experts"),
        (dict(capacity_factor=-1.0), "model.capacity_factor must be positive"),
        (dict(clean_routing="sometimes"), "unknown model.clean_routing 'sometimes'; choose one of dropless, capacity"),
        (dict(shared_expert_gate=True), "needs a shared expert"),
        (dict(router_score="relu"), "unknown model.router_score 'relu'"),
        (dict(first_k_dense=2), r"model.first_k_dense \(2\) and model.mlp_only_layers leave no MoE layer of 2"),
        (dict(model_type="qwen3"), "must be unset for the dense model_type 'qwen3'"),
    ],
)
def test_moe_config_errors_name_the_field(overrides, message):
    good = dict(model_type="qwen3_moe", num_layers=2, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16)
    with pytest.raises(ValueError, match=message):
        ModelConfig(**{**good, **overrides})


def test_cli_rejects_a_bad_moe_override_in_one_line(capsys):
    code = cli.main(["edlm", "import-hf", "--config=configs/tiny_moe.py", "--config.model.router_topk_groups=5"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "model.router_topk_groups must be in 1..4" in err


def test_cli_import_keeps_experts_and_selection_bias(tmp_path, capsys):
    hf_dir, out = str(tmp_path / "hf"), str(tmp_path / "ckpt")
    torch_model = make_moe_hf_model("glm4_moe_sigmoid_groups", hf_dir)
    assert cli.main(["edlm", "import-hf", "--hf_dir", hf_dir, "--out", out]) == 0, capsys.readouterr().err
    loaded = edlm.load(out)
    reference = edlm.from_hf(hf_dir)
    for ours, ref in zip(jax.tree.leaves(nnx.state(loaded)), jax.tree.leaves(nnx.state(reference))):
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(ref))
    hf_bias = torch_model.model.layers[1].mlp.gate.e_score_correction_bias.numpy()
    np.testing.assert_array_equal(np.asarray(loaded.layers.mlp.router.bias[...])[0], hf_bias)
    hf_expert = torch_model.model.layers[1].mlp.experts  # transformers fuses experts in memory
    gate_up = hf_expert.gate_up_proj.detach().numpy()  # [experts, 2 * mlp, embed]
    np.testing.assert_array_equal(np.asarray(loaded.layers.mlp.gate_proj[...])[0], gate_up[:, :16].transpose(0, 2, 1))
