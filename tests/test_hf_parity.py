"""Logits of imported models equal transformers' (PyTorch CPU, float32) for every dense option."""
import numpy as np
import pytest
import torch

import efficient_dlm as edlm
from tests.hf_factory import FAMILIES, make_hf_model


def _relative_error(ours, ref, valid):
    diff = np.abs(ours - ref)[valid]
    return float(diff.max() / np.abs(ref[valid]).max())


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_causal_logits_match_transformers_with_padding(family, tmp_path):
    torch_model = make_hf_model(family, str(tmp_path))
    model = edlm.from_hf(str(tmp_path))
    rng = np.random.RandomState(1)
    tokens = rng.randint(0, 97, size=(3, 12))
    lengths = np.array([12, 9, 5])  # right padding: rows 1 and 2 are shorter
    attn = (np.arange(12)[None] < lengths[:, None]).astype(np.int64)
    with torch.no_grad():
        ref = torch_model(torch.tensor(tokens), attention_mask=torch.tensor(attn)).logits.numpy()
    segment_ids = attn.astype(np.int32)  # 1 = document, 0 = padding
    ours = np.asarray(model(tokens, segment_ids=segment_ids))
    assert _relative_error(ours, ref, attn.astype(bool)) <= 1e-4
