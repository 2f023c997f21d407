"""HF directories as users have them: half-precision files, sharded index, older config.json, bad input.

The oracle is transformers (float32) for numerics; every bad input must fail with one readable line
(CheckpointError, a ValueError) naming the problem.
"""
import json
import os
import pickle
import shutil

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import efficient_dlm as edlm
from efficient_dlm.port.safetensors_io import CheckpointError, SafetensorsCheckpoint
from tests.hf_factory import make_hf_model
from tests.test_hf_parity import causal_logits, hf_logits, padded_batch, relative_error


def copy_dir(src: str, dst) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def edit_config(directory: str, **changes) -> None:
    path = os.path.join(directory, "config.json")
    with open(path) as f:
        config = json.load(f)
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    with open(path, "w") as f:
        json.dump(config, f)


def logits(model):
    tokens, attn, positions = padded_batch("right")
    return np.asarray(causal_logits(model, tokens, attn.astype(np.int32), positions))


@pytest.mark.parametrize("torch_dtype, stored_numpy", [(torch.bfloat16, "bfloat16"), (torch.float16, "float16")])
def test_half_precision_checkpoint_imports_exactly_in_float32(torch_dtype, stored_numpy, tmp_path):
    torch_model = make_hf_model("llama_llama3_rope", str(tmp_path), dtype=torch_dtype)
    ckpt = SafetensorsCheckpoint(str(tmp_path))
    assert {str(ckpt.dtype(name)) for name in ckpt.keys()} == {stored_numpy}
    model = edlm.from_hf(str(tmp_path), dtype="float32")
    tokens, attn, positions = padded_batch("right")
    ref = hf_logits(torch_model.float(), tokens, attn, positions)  # float32 compute on the half weights
    assert relative_error(logits(model), ref, attn) <= 1e-4


def test_sharded_checkpoint_equals_single_file(tiny_hf_dir, tmp_path):
    directory, torch_model = tiny_hf_dir
    torch_model.save_pretrained(tmp_path, max_shard_size="40KB")
    shards = [n for n in os.listdir(tmp_path) if n.endswith(".safetensors")]
    assert os.path.exists(tmp_path / "model.safetensors.index.json") and len(shards) > 2
    sharded, single = edlm.from_hf(str(tmp_path)), edlm.from_hf(directory)
    np.testing.assert_array_equal(logits(sharded), logits(single))


@pytest.mark.parametrize(
    "family, rope_scaling",
    [
        ("llama_mqa_linear_rope", {"type": "linear", "factor": 2.0}),
        ("llama_llama3_rope", {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 16}),
    ],
)
def test_older_config_format_gives_the_same_model(family, rope_scaling, tmp_path):
    """rope_theta + rope_scaling {"type": ...} + torch_dtype (transformers < 5) vs rope_parameters + dtype."""
    new = str(tmp_path / "new")
    torch_model = make_hf_model(family, new)
    old = copy_dir(new, tmp_path / "old")
    with open(os.path.join(new, "config.json")) as f:
        config = json.load(f)
    assert "rope_parameters" in config and "rope_scaling" not in config
    edit_config(old, rope_parameters=None, dtype=None, rope_theta=config["rope_parameters"]["rope_theta"],
                rope_scaling=rope_scaling, torch_dtype="float32")
    old_model, new_model = edlm.from_hf(old), edlm.from_hf(new)
    assert old_model.config == new_model.config
    tokens, attn, positions = padded_batch("right")
    assert relative_error(logits(old_model), hf_logits(torch_model, tokens, attn, positions), attn) <= 1e-4


def test_reader_maps_tensors_without_copying(tiny_hf_dir):
    ckpt = SafetensorsCheckpoint(tiny_hf_dir[0])
    name = "model.layers.0.mlp.up_proj.weight"
    tensor = ckpt.tensor(name)
    assert np.shares_memory(tensor, ckpt._where[name]._map)  # a view into the memory map
    expected = tiny_hf_dir[1].state_dict()[name].numpy()
    np.testing.assert_array_equal(tensor, expected)


# ---- bad input: one readable error line each ----------------------------------------------------


def rewrite_tensors(directory: str, edit) -> None:
    path = os.path.join(directory, "model.safetensors")
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(model_type="gpt2"), r"unsupported model_type 'gpt2'; supported: llama, mistral, qwen2, qwen3"),
        (dict(hidden_act="gelu"), r"unsupported hidden_act 'gelu'; only silu \(SwiGLU\) is supported$"),
        (dict(use_sliding_window=True, sliding_window=8, layer_types=["full_attention", "chunked_attention"]),
         r"layer_types \['full_attention', 'chunked_attention'\] must list full_attention / sliding_attention"),
        (dict(rope_parameters={"rope_type": "longrope", "rope_theta": 1e4}), r"unsupported model\.rope_type 'longrope'"),
        (dict(num_attention_heads=None), r"config\.json lacks num_attention_heads$"),
    ],
    ids=["model_type", "hidden_act", "layer_types", "rope_type", "missing_key"],
)
def test_unsupported_config(tiny_hf_dir, tmp_path, changes, message):
    directory = copy_dir(tiny_hf_dir[0], tmp_path / "m")
    edit_config(directory, **changes)
    with pytest.raises(CheckpointError, match=message):
        edlm.from_hf(directory)


def test_missing_tensor(tiny_hf_dir, tmp_path):
    directory = copy_dir(tiny_hf_dir[0], tmp_path / "m")
    rewrite_tensors(directory, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\) model\.layers\.1\.mlp\.up_proj\.weight$"):
        edlm.from_hf(directory)


def test_unexpected_tensor(tiny_hf_dir, tmp_path):
    directory = copy_dir(tiny_hf_dir[0], tmp_path / "m")
    rewrite_tensors(directory, lambda t: t.update({"model.layers.0.mlp.extra.weight": np.zeros((2, 2), np.float32)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor\(s\) model\.layers\.0\.mlp\.extra\.weight$"):
        edlm.from_hf(directory)


def test_shape_mismatch_with_config(tiny_hf_dir, tmp_path):
    directory = copy_dir(tiny_hf_dir[0], tmp_path / "m")
    edit_config(directory, intermediate_size=48)
    with pytest.raises(CheckpointError, match=r"tensor model\.layers\.0\.mlp\.gate_proj\.weight has shape \(64, 32\), config expects \(48, 32\)"):
        edlm.from_hf(directory)


class _ExplodesWhenUnpickled:
    """Unpickling this runs code: it writes a marker file, then raises."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('unpickled'); raise RuntimeError('unpickled!')",))


def test_pickle_only_directory_is_refused_unopened(tiny_hf_dir, tmp_path):
    directory = tmp_path / "m"
    directory.mkdir()
    shutil.copy(os.path.join(tiny_hf_dir[0], "config.json"), directory)
    marker = str(tmp_path / "was_unpickled")
    (directory / "pytorch_model.bin").write_bytes(pickle.dumps(_ExplodesWhenUnpickled(marker)))
    with pytest.raises(CheckpointError, match=r"only pickle weights \(pytorch_model\.bin\) found; refusing to unpickle"):
        edlm.from_hf(str(directory))
    assert not os.path.exists(marker)


def test_truncated_safetensors(tiny_hf_dir, tmp_path):
    directory = copy_dir(tiny_hf_dir[0], tmp_path / "m")
    path = os.path.join(directory, "model.safetensors")
    os.truncate(path, os.path.getsize(path) - 100)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated safetensors file \(tensor .* ends at byte"):
        edlm.from_hf(directory)
    os.truncate(path, 5)
    with pytest.raises(CheckpointError, match=r"truncated safetensors file \(no header\)"):
        edlm.from_hf(directory)


def test_dtype_and_mesh_nonsense(tiny_hf_dir):
    with pytest.raises(ValueError, match=r"unknown dtype 'float8'; choose one of float32, bfloat16, float16"):
        edlm.from_hf(tiny_hf_dir[0], dtype="float8")
    with pytest.raises(ValueError, match=r"mesh must be a jax\.sharding\.Mesh or None, got str"):
        edlm.from_hf(tiny_hf_dir[0], mesh="cpu")
    with pytest.raises(ValueError, match=r"unknown model config key\(s\): num_expertz"):
        edlm.from_hf(tiny_hf_dir[0], num_expertz=4)


def test_not_a_model_directory(tmp_path):
    with pytest.raises(CheckpointError, match=r"not a directory"):
        edlm.from_hf(str(tmp_path / "absent"))
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        edlm.from_hf(str(tmp_path))
