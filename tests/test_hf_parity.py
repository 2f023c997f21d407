"""Logits of imported models equal transformers' (PyTorch CPU, float32) for every dense option.

Each family runs one batch with right padding and one with left padding (HF gets attention_mask and
explicit position_ids; we get the same positions and segment ids 1 = token, 0 = padding). Dynamic RoPE
scales each row by its own length, not the batch's longest position (models/rope.py), so its reference
is transformers on each row alone.
"""
import numpy as np
import pytest
import torch
from flax import nnx

import efficient_dlm as edlm
from tests.hf_factory import FAMILIES, make_hf_model

LENGTHS = np.array([12, 9, 5])


def relative_error(ours, ref, valid):
    diff = np.abs(ours - ref)[valid]
    return float(diff.max() / np.abs(ref[valid]).max())


def padded_batch(side: str, seed: int = 1):
    """tokens [3, 12], attention mask and positions (0.. per row, counted over real tokens only)."""
    tokens = np.random.RandomState(seed).randint(0, 97, size=(3, 12))
    index = np.arange(12)[None]
    attn = index < LENGTHS[:, None] if side == "right" else index >= 12 - LENGTHS[:, None]
    positions = np.clip(np.cumsum(attn, axis=1) - 1, 0, None)
    return tokens, attn, positions.astype(np.int32)


def hf_logits(torch_model, tokens, attn, positions):
    with torch.no_grad():
        out = torch_model(
            torch.tensor(tokens), attention_mask=torch.tensor(attn.astype(np.int64)), position_ids=torch.tensor(positions)
        )
    return out.logits.float().numpy()


@nnx.jit
def causal_logits(model, tokens, segment_ids, positions):
    return model(tokens, segment_ids=segment_ids, positions=positions)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_causal_logits_match_transformers_with_padding(family, tmp_path):
    torch_model = make_hf_model(family, str(tmp_path))
    model = edlm.from_hf(str(tmp_path))
    for side in ("right", "left"):
        tokens, attn, positions = padded_batch(side)
        ref = hf_logits(torch_model, tokens, attn, positions)
        if "dynamic" in family:
            for row, real in enumerate(attn):
                alone = tokens[row : row + 1, real]
                ref[row, real] = hf_logits(torch_model, alone, np.ones_like(alone), np.arange(alone.shape[1])[None])[0]
        ours = np.asarray(causal_logits(model, tokens, attn.astype(np.int32), positions))
        assert relative_error(ours, ref, attn) <= 1e-4, side
