"""The exported PyTorch `generate` decodes as `efficient_dlm.generate`: every strategy, token for token,
with forward passes counted the same way, on a token-shift dLM with an appended [MASK] row."""
import numpy as np
import pytest
import torch
import transformers

import efficient_dlm as edlm
from efficient_dlm.diffusion.spec import DiffusionSpec, with_spec
from efficient_dlm.errors import UserError
from efficient_dlm.train.model_init import append_mask_token
from tests.sample_reference import peaked_model
from tests.test_hf_export import write_tokenizer

PROMPTS = [[3, 14, 15, 9, 26], [5, 35, 8, 79, 4, 62, 64, 11, 2], [7]]
MAX_NEW = 7
SPEC = DiffusionSpec(mask_token_id=96, valid_vocab_size=97, block_size=4, token_shift=True, strategy="factor", factor=0.8)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(our model reloaded from the export, the transformers model) of a token-shift dLM whose padding
    columns are the LM head's largest (only the spec's valid_vocab_size keeps them from being chosen)."""
    torch.set_num_threads(1)
    model, valid = append_mask_token(peaked_model(mask_token_id=None), 128)
    model.lm_head[...] = model.lm_head[...].at[:, valid:].set(3 * model.lm_head[...][:, : 128 - valid])
    root = tmp_path_factory.mktemp("export_decoding")
    out = str(root / "hf")
    edlm.to_hf(with_spec(model, SPEC), out, tokenizer_dir=write_tokenizer(root / "tok", vocab=128))
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32)
    return edlm.from_hf(out), hf


def _torch_batch():
    width = max(map(len, PROMPTS))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in PROMPTS])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in PROMPTS])
    return ids, mask


@pytest.mark.parametrize("knobs", [
    {},  # the exported defaults: the spec's factor strategy
    dict(strategy="threshold", threshold=0.5),
    dict(strategy="topk", tokens_per_step=2),
    dict(strategy="factor", factor=1.5),
    dict(strategy="entropy", entropy_bound=0.4),
    dict(strategy="threshold", threshold=0.3, stop=True),
])
def test_exported_generate_equals_efficient_dlm(exported, knobs):
    ours, hf = exported
    assert ours.spec == SPEC  # the export's config.json carries the spec back
    knobs = dict(knobs)
    stop = knobs.pop("stop", False)
    ids, mask = _torch_batch()
    ref = edlm.generate(ours, PROMPTS, max_new_tokens=MAX_NEW, **knobs)
    stops = {}
    if stop:  # a token row 0 emits mid-way: as stop token it must end row 0 early on both sides
        stops = dict(eos_token_id=ref.sequences[0][2])
        ref = edlm.generate(ours, PROMPTS, max_new_tokens=MAX_NEW, stop_tokens=[stops["eos_token_id"]], **knobs)
        assert len(ref.sequences[0]) == 3
    out = hf.generate(ids, attention_mask=mask, max_new_tokens=MAX_NEW, return_dict_in_generate=True, **knobs, **stops)
    assert out["new_tokens"] == ref.sequences
    assert out["row_forwards"] == ref.row_forwards.tolist() and out["forward_passes"] == ref.forward_passes
    assert out["tokens_per_forward"] == pytest.approx(ref.tokens_per_forward)
    assert all(t < 97 for row in ref.sequences for t in row)
    if not knobs:
        assert ref.tokens_per_forward > 1.0  # several tokens per step: the commit rule was exercised


def test_a_spec_with_inference_capacity_routing_is_refused(tmp_path):
    """MoE layers decode dropless (capacity routes training's x_t half only): a spec claiming otherwise
    is one UserError naming the field."""
    with pytest.raises(UserError, match=r"moe_capacity_factor must be null: MoE layers decode dropless, got 1.25"):
        DiffusionSpec(mask_token_id=63, moe_capacity_factor=1.25)


def test_an_export_the_pytorch_side_would_decode_differently_is_refused_naming_the_setting(exported, tmp_path):
    """to_hf refuses, before writing anything, a token shift contradicting the trained one: the exported
    `generate` would decode the model wrongly."""
    ours, _ = exported
    out = tmp_path / "hf"
    with pytest.raises(UserError, match=r"^token_shift=False contradicts the model's diffusion spec \(trained with token_shift=True\)"):
        edlm.to_hf(ours, str(out), tokenizer_dir=write_tokenizer(tmp_path / "tok", vocab=128), token_shift=False)
    assert not out.exists()


@pytest.mark.parametrize("stop", [False, True])
def test_exported_self_speculative_generate_is_the_models_causal_greedy_decoding(exported, stop):
    """strategy="self_speculative" (the dLM drafts, its causal mode verifies) keeps exactly what the same
    weights decoding causally choose: the exported generate and efficient_dlm.generate both equal
    efficient_dlm.generate(strategy="ar"), on ragged prompts, with a row stopping early."""
    ours, hf = exported
    ref = edlm.generate(ours, PROMPTS, max_new_tokens=MAX_NEW, strategy="ar")
    stops, stop_tokens = {}, None
    if stop:
        stops, stop_tokens = dict(eos_token_id=ref.sequences[1][3]), [ref.sequences[1][3]]
        ref = edlm.generate(ours, PROMPTS, max_new_tokens=MAX_NEW, strategy="ar", stop_tokens=stop_tokens)
        assert len(ref.sequences[1]) <= 4
    ids, mask = _torch_batch()
    out = hf.generate(ids, attention_mask=mask, max_new_tokens=MAX_NEW, return_dict_in_generate=True,
                      strategy="self_speculative", **stops)
    assert out["new_tokens"] == ref.sequences
    ours_spec = edlm.generate(ours, PROMPTS, max_new_tokens=MAX_NEW, strategy="self_speculative", stop_tokens=stop_tokens)
    assert ours_spec.sequences == ref.sequences
    lengths = [len(row) for row in ref.sequences]
    assert all(v <= n for v, n in zip(out["verifier_forwards"], lengths))  # one verify keeps >= 1 token
    assert out["row_forwards"] == [2 * v for v in out["verifier_forwards"]]  # one draft + one verify per iteration
    assert sum(out["verifier_forwards"]) < sum(lengths)  # some drafts were accepted: the accept path ran


def test_a_self_speculative_default_travels_with_the_model(exported, tmp_path):
    """A spec whose default decoding is self_speculative: efficient_dlm.generate without a strategy is
    generate(strategy="speculative", verifier="self"), and the export's generate without one decodes
    self-speculatively too (its result counts verifier forwards) with the same tokens."""
    ours, _ = exported
    try:
        _self_speculative_default(with_spec(ours, SPEC.replace(strategy="self_speculative")), ours, tmp_path)
    finally:
        with_spec(ours, SPEC)  # the module's model is shared: give it back its own spec


def _self_speculative_default(model, ours, tmp_path):
    default = edlm.generate(model, PROMPTS, max_new_tokens=MAX_NEW)
    explicit = edlm.generate(model, PROMPTS, max_new_tokens=MAX_NEW, strategy="speculative", verifier="self")
    assert default.sequences == explicit.sequences and default.verifier_forwards == explicit.verifier_forwards
    out = str(tmp_path / "hf")
    edlm.to_hf(model, out, tokenizer_dir=write_tokenizer(tmp_path / "tok", vocab=128))
    assert edlm.from_hf(out).spec.strategy == "self_speculative"
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32)
    ids, mask = _torch_batch()
    result = hf.generate(ids, attention_mask=mask, max_new_tokens=MAX_NEW, return_dict_in_generate=True)
    assert result["new_tokens"] == default.sequences and "verifier_forwards" in result
    with pytest.raises(UserError, match=r"strategy='self_speculative' verifies with the dLM itself"):
        edlm.generate(model, PROMPTS, max_new_tokens=MAX_NEW, strategy="self_speculative", verifier=ours)
