"""DiffusionSpec: a dLM checkpoint decodes as it was trained through every entry point.

The API (`generate(load(d), prompts, max_new_tokens=n)`) and the CLI (`edlm sample --ckpt d`) must
agree with each other and with the slow reference decoder given the trained settings explicitly;
vocabulary padding of an appended [MASK] row is never generated.
"""
import json
import warnings

import jax.numpy as jnp
import numpy as np
import pytest

import efficient_dlm as edlm
from efficient_dlm import checkpoints, cli
from efficient_dlm.diffusion.spec import DiffusionSpec, legacy_spec, resolve_decoding, spec_from_recipe
from efficient_dlm.errors import UserError
from efficient_dlm.train.model_init import append_mask_token
from tests.sample_reference import peaked_model, reference_dlm

PROMPTS = [[3, 14, 15, 9, 26], [5, 35, 8, 97 - 18, 4, 62, 64], [7]]
MAX_NEW = 6
SPEC = DiffusionSpec(mask_token_id=96, valid_vocab_size=97, block_size=4, token_shift=True, threshold=0.5)


@pytest.fixture(scope="module")
def shifted_ckpt(tmp_path_factory):
    """A token-shift dLM whose [MASK] row was appended (vocabulary 96 -> 97 valid, padded to 128). The
    padding columns of the LM head are made the largest, so only the spec keeps them from being chosen."""
    model, valid = append_mask_token(peaked_model(mask_token_id=None), 128)
    assert (model.config.mask_token_id, valid) == (96, 97)
    model.lm_head[...] = model.lm_head[...].at[:, valid:].set(3 * model.lm_head[...][:, : 128 - valid])
    path = str(tmp_path_factory.mktemp("spec") / "dlm")
    checkpoints.save(model, path, spec=SPEC)
    return path, model


def test_generate_from_load_equals_the_cli_and_the_reference(shifted_ckpt, tmp_path):
    path, model = shifted_ckpt
    loaded = edlm.load(path)
    assert loaded.spec == SPEC
    api = edlm.generate(loaded, PROMPTS, max_new_tokens=MAX_NEW)
    for row, prompt in enumerate(PROMPTS):  # the slow reference, given the trained settings explicitly
        tokens, _, steps = reference_dlm(model, prompt, block=4, max_new=MAX_NEW, strategy="threshold", threshold=0.5,
                                         token_shift=True, valid_vocab_size=97)
        assert api.sequences[row] == tokens and api.row_forwards[row] == steps
    assert all(t < 97 for row in api.sequences for t in row)
    unguarded = edlm.generate(model, PROMPTS, max_new_tokens=MAX_NEW, block_size=4, threshold=0.5, token_shift=True)
    assert any(t >= 97 for row in unguarded.sequences for t in row)  # the padding would win without the spec

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt_ids": p}) + "\n" for p in PROMPTS))
    out = tmp_path / "out.jsonl"
    argv = ["edlm", "sample", "--ckpt", path, "--prompts_jsonl", str(prompts), "--out", str(out),
            f"--config.sample.max_new_tokens={MAX_NEW}"]
    assert cli.main(argv) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["completion_ids"] for r in records] == api.sequences
    assert [r["forward_passes"] for r in records] == api.row_forwards.tolist()


def test_contradicting_the_spec_is_refused_or_warned(shifted_ckpt):
    loaded = edlm.load(shifted_ckpt[0])
    with pytest.raises(UserError, match="token_shift=False contradicts the model, trained with token_shift=True"):
        edlm.generate(loaded, PROMPTS, max_new_tokens=MAX_NEW, token_shift=False)
    with pytest.raises(UserError, match="valid_vocab_size=128 would generate vocabulary padding"):
        edlm.generate(loaded, PROMPTS, max_new_tokens=MAX_NEW, valid_vocab_size=128)
    with pytest.warns(UserWarning, match="block_size=3 does not divide the trained block size 4"):
        resolve_decoding(SPEC, block_size=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_decoding(SPEC, block_size=2, threshold=0.7)["threshold"] == 0.7  # divides; explicit wins


def test_spec_from_a_training_recipe_and_from_legacy_metadata():
    cfg = peaked_model().config
    recipe = {"diffusion": {"objective": "block_diffusion", "block_size": 8, "block_size_schedule": "0:2,10:16,5:4",
                            "token_shift": True}, "sample": {"strategy": "", "threshold": 0.8}}
    spec = spec_from_recipe(recipe, cfg, valid_vocab_size=90)
    assert spec == DiffusionSpec(mask_token_id=95, valid_vocab_size=90, block_size=16, token_shift=True, threshold=0.8)
    assert spec_from_recipe({"diffusion": {"objective": "opd"}, "opd": {"block_size": 4}}, cfg).block_size == 4
    assert spec_from_recipe({"diffusion": {"objective": "ar"}}, cfg) is None
    assert legacy_spec(cfg, {"train_config": recipe, "valid_vocab_size": 90}) == spec
    assert legacy_spec(cfg, {}) == DiffusionSpec(mask_token_id=95)
    assert legacy_spec(peaked_model(mask_token_id=None).config, {}) is None


def test_a_bad_spec_file_is_one_line_naming_it(shifted_ckpt, tmp_path):
    model = shifted_ckpt[1]
    path = str(tmp_path / "ckpt")
    checkpoints.save(model, path, spec=SPEC)
    spec_file = tmp_path / "ckpt" / "diffusion_spec.json"
    spec_file.write_text(json.dumps(SPEC.to_dict() | {"block_size": 0}))
    with pytest.raises(UserError, match=r"diffusion_spec.json: block_size must be a positive integer, got 0"):
        edlm.load(path)
    spec_file.write_text(json.dumps(SPEC.to_dict() | {"mask_token_id": 200}))
    with pytest.raises(UserError, match=r"mask_token_id 200 differs from the model's 96"):
        edlm.load(path)
