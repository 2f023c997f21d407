"""Imported MoE models equal transformers (PyTorch CPU, float32): logits, and the load-balancing loss."""
import numpy as np
import pytest
import torch

import efficient_dlm as edlm
from efficient_dlm.models.moe import moe_loss_terms
from efficient_dlm.port.hf_config import model_config_from_hf
from efficient_dlm.port.safetensors_io import CheckpointError
from tests.hf_moe_factory import MOE_FAMILIES, make_moe_hf_model


@pytest.mark.parametrize("family", sorted(MOE_FAMILIES))
def test_moe_logits_and_router_losses_match_transformers(family, tmp_path):
    torch_model = make_moe_hf_model(family, str(tmp_path))
    model = edlm.from_hf(str(tmp_path))
    assert model.config.is_moe
    tokens = np.random.RandomState(1).randint(0, 97, size=(3, 12))
    with torch.no_grad():
        ref = torch_model(torch.tensor(tokens), output_router_logits=True)
    hidden, aux = model.hidden(tokens)
    logits = np.asarray(model.logits(hidden))
    assert np.abs(logits - ref.logits.numpy()).max() <= 1e-4 * np.abs(ref.logits.numpy()).max()
    terms = moe_loss_terms(aux)
    z_loss = np.mean([torch.logsumexp(r.double(), -1).square().mean().item() for r in ref.router_logits])
    np.testing.assert_allclose(float(terms["router_z"]), z_loss, rtol=1e-4)
    if getattr(ref, "aux_loss", None) is not None:  # the Switch / Qwen loss as transformers computes it
        np.testing.assert_allclose(float(terms["load_balancing"]), ref.aux_loss.item(), rtol=1e-5)
        weighted = torch_model.config.router_aux_loss_coef * ref.aux_loss.item()  # what HF adds to its loss
        np.testing.assert_allclose(float(aux["moe_aux_loss"]), weighted, rtol=1e-5)


def _hf(**overrides):
    base = dict(model_type="qwen3_moe", vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, num_experts=8, num_experts_per_tok=2,
                moe_intermediate_size=16)
    return {**base, **overrides}


def test_hf_config_dense_layers_follow_transformers():
    def dense(**changes):
        cfg = model_config_from_hf(_hf(**changes))
        return cfg.first_k_dense, cfg.mlp_only_layers, cfg.dense_mlp_layers

    assert dense(mlp_only_layers=[0, 1]) == (2, (), (0, 1))
    assert dense(decoder_sparse_step=1) == (0, (), ())
    assert dense(mlp_only_layers=[0, 2]) == (1, (2,), (0, 2))
    assert dense(decoder_sparse_step=2) == (1, (2,), (0, 2))  # layer i is MoE iff (i + 1) % step == 0
    assert dense(decoder_sparse_step=3, mlp_only_layers=[0]) == (2, (3,), (0, 1, 3))
    with pytest.raises(CheckpointError, match="leave no MoE layer of 4"):
        model_config_from_hf(_hf(mlp_only_layers=[0, 1, 2, 3]))



def test_hf_config_partial_rotary_factor_follows_transformers():
    glm = dict(model_type="glm4_moe", n_routed_experts=8)
    assert model_config_from_hf(_hf(**glm)).partial_rotary_factor == 0.5  # Glm4MoeConfig's default
    assert model_config_from_hf(_hf(**glm, partial_rotary_factor=0.25)).rotary_dim == 2  # head_dim 8
    assert model_config_from_hf(_hf(**glm, rope_parameters=dict(rope_theta=1e4, partial_rotary_factor=1.0))).rotary_dim == 8
    with pytest.raises(CheckpointError, match=r"partial_rotary_factor=0.5 is not supported for qwen3_moe"):
        model_config_from_hf(_hf(rope_parameters=dict(rope_theta=1e4, partial_rotary_factor=0.5)))
