"""Orbax model checkpoints round-trip bit-exactly; `edlm import-hf` (in-process) writes one that loads
as from_hf does; the command line answers bad input with one `edlm <verb>: error: ...` line."""
import os

import jax
import numpy as np
import pytest
from flax import nnx

import efficient_dlm as edlm
from efficient_dlm import ModelConfig, cli
from tests.hf_factory import variant


def params(model):
    return jax.tree.leaves(nnx.state(model, nnx.Param))


def assert_same_params(a, b):
    assert a.config == b.config
    for x, y in zip(params(a), params(b), strict=True):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
def test_save_load_round_trip_is_bit_exact(tiny_model, param_dtype, tmp_path):
    model = variant(tiny_model, param_dtype=param_dtype, dtype=param_dtype, mask_token_id=96)
    edlm.save(model, str(tmp_path / "ckpt"), extra={"note": "test"})
    assert_same_params(edlm.load(str(tmp_path / "ckpt")), model)
    with pytest.raises(FileExistsError, match=r"a checkpoint already exists \(pass force=True / --overwrite\)"):
        edlm.save(model, str(tmp_path / "ckpt"))


def test_load_casts_on_request(tiny_model, tmp_path):
    model = tiny_model
    edlm.save(model, str(tmp_path / "ckpt"))
    half = edlm.load(str(tmp_path / "ckpt"), dtype="bfloat16")
    assert half.config == model.config.replace(dtype="bfloat16", param_dtype="bfloat16")
    for x, y in zip(params(half), params(model), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y.astype(x.dtype)))
    with pytest.raises(FileNotFoundError, match=r"not an efficient_dlm checkpoint \(no model_config\.json\)"):
        edlm.load(str(tmp_path))


def run_cli(capsys, *args):
    code = cli.main(["edlm", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_import_hf_command_then_load_equals_from_hf(tiny_hf_dir, tmp_path, capsys):
    directory, _ = tiny_hf_dir
    out = str(tmp_path / "ckpt")
    code, stdout, stderr = run_cli(capsys, "import-hf", f"--hf_dir={directory}", f"--out={out}", "--dtype=bfloat16")
    assert code == 0, stderr
    assert f"wrote {out}" in stdout
    assert_same_params(edlm.load(out), edlm.from_hf(directory, dtype="bfloat16"))
    # A second in-process call: the refusal, then --overwrite works (flags reset between calls).
    code, _, stderr = run_cli(capsys, "import-hf", f"--hf_dir={directory}", f"--out={out}")
    assert code == 2 and stderr.strip() == f"edlm import-hf: error: {out}: a checkpoint already exists (pass --overwrite)"
    code, _, stderr = run_cli(capsys, "import-hf", f"--config.init.hf_dir={directory}", f"--out={out}", "--overwrite",
                              "--mask_token_id=96")
    assert code == 0, stderr
    assert_same_params(edlm.load(out), edlm.from_hf(directory, mask_token_id=96))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--config.model.foo=3"], "unknown config key 'model.foo' (not in the recipe's schema; see efficient_dlm/config.py)"),
        (["--config.model.dtype=float8"], "unknown model.dtype 'float8'; choose one of float32, bfloat16, float16"),
        (["--config.model.num_heads=3"], "model.num_heads (3) must be a multiple of model.num_kv_heads (2)"),
        (["--config=configs/nope.py"], "--config: recipe file 'configs/nope.py' not found"),
        (["--dtype=int8"], "unknown --dtype 'int8'; choose float32, bfloat16 or float16"),
        (["--mask_token_id=97"], "model.mask_token_id 97 is outside the vocabulary (size 97)"),
        (["--hf_dir=/nonexistent/dir"], "/nonexistent/dir: not a directory (from_hf takes a local Hugging Face model directory)"),
    ],
    ids=lambda v: v[0] if isinstance(v, list) else "",
)
def test_cli_bad_input_is_one_line(tiny_hf_dir, args, message, tmp_path, capsys):
    base = {"--hf_dir": f"--hf_dir={tiny_hf_dir[0]}", "--out": f"--out={tmp_path / 'o'}"}
    for arg in args:
        base[arg.split("=")[0]] = arg
    code, _, stderr = run_cli(capsys, "import-hf", *base.values())
    assert code == 2
    assert stderr.strip() == f"edlm import-hf: error: {message}"


def test_cli_usage_and_verb_help(capsys):
    code, stdout, _ = run_cli(capsys)
    assert code == 0 and all(verb in stdout for verb in cli.VERBS)
    code, _, stderr = run_cli(capsys, "no-such-verb")
    assert code == 2 and "unknown verb 'no-such-verb'" in stderr
    # Every verb's module loads next to every other's in one process (shared names such as --out).
    for verb in [*cli.VERBS, "import-hf"]:
        code, stdout, stderr = run_cli(capsys, verb, "--help")
        assert code == 0 and f"usage: edlm {verb}" in stdout, stderr
    assert "--hf_dir" in stdout and "overwrite" in stdout


def test_every_recipe_builds_a_valid_config():
    from ml_collections import config_flags  # noqa: F401  (recipes are plain modules)
    import importlib.util

    from efficient_dlm.config import model_config, validate

    recipes = sorted(n for n in os.listdir(os.path.join(cli.REPO_ROOT, "configs")) if n.endswith(".py"))
    assert {"tiny.py", "qwen3_0p6b.py", "qwen3_8b.py", "llama3_8b.py"} <= set(recipes)
    for name in recipes:
        spec = importlib.util.spec_from_file_location(name[:-3], os.path.join(cli.REPO_ROOT, "configs", name))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        assert isinstance(model_config(validate(module.get_config())), ModelConfig)


def test_failed_overwrite_keeps_the_old_checkpoint(tiny_model, tmp_path, monkeypatch):
    """A write that dies midway (here: orbax raising) leaves the previous checkpoint loadable."""
    import orbax.checkpoint as ocp

    path = str(tmp_path / "ckpt")
    edlm.save(tiny_model, path)

    def broken_save(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ocp.StandardCheckpointer, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        edlm.save(variant(tiny_model, mask_token_id=5), path, force=True)
    monkeypatch.undo()
    assert_same_params(edlm.load(path), tiny_model)
