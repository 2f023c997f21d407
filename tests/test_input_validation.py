"""Bad input is stopped at the boundary with one line naming the file/line or key, one test per class:
data files, config knobs, token ids, HF directories, output paths, CLI text. The full matrix (100+
cases, CLI and API) is benchmarks/bad_inputs.py."""
import json
import os

import numpy as np
import pytest
from ml_collections import ConfigDict

import efficient_dlm as edlm
from efficient_dlm import cli
from efficient_dlm.config import base_config, typed, validate
from efficient_dlm.data.pipeline import DataSpec, build_dataset
from efficient_dlm.errors import UserError
from efficient_dlm.port.hf_config import read_config_json
from efficient_dlm.sample.inputs import read_prompts
from efficient_dlm.train.loop import check_same_architecture
from tests.corpus import BYTE_TOKENIZER



def _write(path, content) -> str:
    mode = "wb" if isinstance(content, bytes) else "w"
    with open(path, mode) as f:
        f.write(content)
    return str(path)


def _data_cases(tmp):
    npy = str(tmp / "neg.npy")
    np.save(npy, np.array([3, -2, 1], np.int32))
    os.mkdir(tmp / "dir.jsonl")
    os.mkfifo(tmp / "fifo.jsonl")
    return [
        (_write(tmp / "int.jsonl", '{"text": "ok"}\n\n{"text": 12345}\n'), r"int\.jsonl: line 3: field 'text' is int 12345, not a string"),
        (_write(tmp / "null.jsonl", '{"text": null}\n'), r"null\.jsonl: line 1: field 'text' is NoneType null, not a string"),
        (_write(tmp / "utf8.jsonl", b'{"text": "ok"}\n{"text": "\xff\xfe"}\n'), r"utf8\.jsonl: line 2 is not valid UTF-8"),
        (npy, r"neg\.npy: token id -2 at position 1 is outside the vocabulary \[0, 512\)"),
        (str(tmp / "dir.jsonl"), r"dir\.jsonl is a directory, not a file"),
        (str(tmp / "fifo.jsonl"), r"fifo\.jsonl is not a regular file \(a FIFO"),
    ]


def test_bad_data_files_are_named_with_their_line(tmp_path):
    spec = DataSpec(seq_len=16, batch_size=1, eos_id=1, vocab_size=512, tokenizer=BYTE_TOKENIZER, packing=False, num_threads=1)
    for path, message in _data_cases(tmp_path):
        with pytest.raises(UserError, match=message):
            for _ in zip(range(4), build_dataset(path, spec, train=False)):
                pass


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("train.learning_rate", -1e-3, "train.learning_rate must be a positive number, got -0.001"),
        ("train.learning_rate", float("nan"), "train.learning_rate must be a positive number, got nan"),
        ("train.max_param_norm_ratio", 0.5, r"train.max_param_norm_ratio must be > 1 \(0 disables the guard\)"),
        ("sample.temperature", float("nan"), "sample.temperature must be a finite number >= 0"),
        ("sample.temperature", float("inf"), "sample.temperature must be a finite number >= 0"),
        ("sample.top_p", float("nan"), r"sample.top_p must be in \(0, 1\], got nan"),
        ("sample.threshold", float("nan"), r"sample.threshold must be in \[0, 1\], got nan"),
        ("sample.factor", float("inf"), "sample.factor must be a finite number > 0"),
        ("model.mask_token_id", 1, "model.mask_token_id 1 equals model.eos_token_id; .MASK. must be a token of its own"),
    ],
    ids=lambda v: str(v),
)
def test_bad_config_values_name_their_key(key, value, message):
    config = base_config()
    config.model.eos_token_id = 1
    section, name = key.split(".")
    config[section][name] = value
    with pytest.raises(ValueError, match=message):
        validate(config)


def test_architecture_change_on_resume_is_refused():
    config = base_config()
    started = {"model": config.model.to_dict()}
    config.model.num_layers = 3
    with pytest.raises(UserError, match=r"model.num_layers is 3 but the run in R started with 2; the architecture cannot change"):
        check_same_architecture(typed(config).model, started, "R")
    config.model.num_layers, config.model.dtype = 2, "bfloat16"  # numerics may change
    check_same_architecture(typed(config).model, started, "R")


def test_token_ids_are_checked_at_the_api_boundary(tiny_model, tmp_path):
    vocab = tiny_model.config.vocab_size
    for tokens, message in [
        (np.array([[1, vocab]]), rf"Model\(tokens\): token id {vocab} is outside the vocabulary \[0, {vocab}\)"),
        (np.array([[1, -1]]), r"token id -1 is outside the vocabulary"),
        (np.array([[1.0, 2.5]]), r"token ids must be integers, got float64 \(e.g. 1.0\)"),
    ]:
        with pytest.raises(UserError, match=message):
            tiny_model(tokens)
    with pytest.raises(ValueError, match=r"prompt 0: token ids must be integers, got float64"):
        edlm.generate(tiny_model, [[1.7, 2.0]], max_new_tokens=2, strategy="ar")
    prompts = _write(tmp_path / "p.jsonl", '{"prompt": "fine"}\n{"prompt": 12345}\n')
    with pytest.raises(UserError, match=r"p\.jsonl:2: \"prompt\" must be a string, got int 12345"):
        read_prompts(prompts)
    prompts = _write(tmp_path / "q.jsonl", '{"prompt_ids": [1, 2.5]}\n')
    with pytest.raises(UserError, match=r"q\.jsonl:1: \"prompt_ids\": token ids must be integers"):
        read_prompts(prompts)


def test_bad_hf_directory_files_are_named(tiny_hf_dir, tmp_path, capsys):
    src, _ = tiny_hf_dir
    hf = json.load(open(os.path.join(src, "config.json")))
    bad = tmp_path / "hf"
    bad.mkdir()
    _write(bad / "config.json", json.dumps({**hf, "num_hidden_layers": "2"}))
    with pytest.raises(ValueError, match=r"config\.json: num_hidden_layers must be an integer, got \"2\""):
        read_config_json(str(bad))
    # A corrupt tokenizer.json is refused by import-hf before anything is written.
    corrupt = tmp_path / "hf2"
    corrupt.mkdir()
    for name in os.listdir(src):
        os.symlink(os.path.join(src, name), corrupt / name)
    _write(corrupt / "tokenizer.json", '{"version": "1.0", "model": {"type": "BPE", "vocab": 3}}')
    code = cli.main(["edlm", "import-hf", f"--hf_dir={corrupt}", f"--out={tmp_path / 'out'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith(f"edlm import-hf: error: {corrupt}/tokenizer.json: not a readable tokenizer.json (")
    assert "\n" not in err and not os.path.exists(tmp_path / "out")


def test_outputs_are_checked_before_the_work(tmp_path, capsys):
    regular = _write(tmp_path / "file", "x")
    cases = [
        (["sample", "--prompt=a", "--ckpt=/nonexistent", f"--out={tmp_path}"], f"--out {tmp_path} is a directory; give a file path"),
        (["sample", "--prompt=a", "--ckpt=/nonexistent", f"--out={regular}/x.jsonl"], f"--out {regular}/x.jsonl: {regular} is a file"),
        (["export-hf", "--ckpt=/nonexistent", f"--out={regular}/sub"], f"--out {regular}/sub: {regular} is a file, not a directory"),
        (["export-hf", "--ckpt=/nonexistent", "--out=/proc/edlm_export"], "--out /proc/edlm_export: cannot write in /proc"),
    ]
    for args, message in cases:
        code = cli.main(["edlm", *args])
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.startswith(f"edlm {args[0]}: error: {message}"), err


@pytest.mark.parametrize(
    "override, message",
    [
        ("--config.model.dtyp=x", "unknown config key 'model.dtyp' (did you mean 'model.dtype'? see efficient_dlm/config.py)"),
        ("--config.trian.steps=1", "unknown config section 'trian' in --config.trian.steps (did you mean 'train'? see efficient_dlm/config.py)"),
        ("--config.foo.bar=1", "unknown config section 'foo' in --config.foo.bar (see efficient_dlm/config.py)"),
        ("--config.model.dtype.x=1", "--config.model.dtype.x: config key 'model.dtype' is a value, not a section"),
    ],
)
def test_cli_config_key_messages_are_plain_text(override, message, capsys):
    code = cli.main(["edlm", "train", override])
    assert code == 2 and capsys.readouterr().err.strip() == f"edlm train: error: {message}"


def test_readme_and_ci_install_the_same_extras():
    root = cli.REPO_ROOT
    readme = open(os.path.join(root, "README.md")).read()
    ci = open(os.path.join(root, ".ci", "run")).read()
    first = next(line for line in readme.splitlines() if "pip install -e" in line)
    extras = first.split('pip install -e "')[1].split('"')[0]
    assert f'pip install -q -e "{extras}"' in ci, (extras, ci)
    setup = open(os.path.join(root, "setup.py")).read()
    assert "jax[tpu]" in setup.split("TEST = [")[1].split("]\n")[0]  # the test extra brings libtpu (edlm aot)


def test_parameter_norm_guard_stops_a_diverging_run():
    """The guard beside the NaN one: finite but exploding parameters stop the run, naming the ratio."""
    from types import SimpleNamespace

    from efficient_dlm.train.loop import NonFiniteError, _check_param_norm

    ckpt = SimpleNamespace(wait=lambda: None, latest_step=lambda: 4)
    run = SimpleNamespace(t=ConfigDict(dict(max_param_norm_ratio=10.0, learning_rate=1e6)), ckpt=ckpt, initial_norm=2.0)
    _check_param_norm(run, 5, 19.9)  # within 10x
    with pytest.raises(NonFiniteError, match=r"stopped at step 6: parameter norm 7.5e\+10 is 3.75e\+10 times .*"
                                             r"learning_rate 1e\+06 is likely too high; last checkpoint: step 4"):
        _check_param_norm(run, 6, 7.5e10)
    run.t.max_param_norm_ratio = 0.0  # disabled
    _check_param_norm(run, 6, 7.5e10)


def test_missing_optional_dependency_names_the_extra(monkeypatch, capsys):
    import importlib

    from efficient_dlm import extras

    real = importlib.import_module

    def without_libtpu(name, *args):
        if name == "libtpu":
            raise ImportError("No module named 'libtpu'")
        return real(name, *args)

    monkeypatch.setattr(extras.importlib, "import_module", without_libtpu)
    code = cli.main(["edlm", "aot", "--topology=v5p-8"])
    assert code == 2 and capsys.readouterr().err.strip() == (
        "edlm aot: error: edlm aot (compiling for a TPU topology) needs libtpu, which is not installed: pip install -e '.[tpu]'")


def test_no_libtpu_start_up_noise_on_a_host_without_tpus():
    """With libtpu installed (the test extra) and JAX_PLATFORMS unset, importing efficient_dlm on a
    TPU-less host selects the CPU platform before libtpu can print its start-up errors."""
    import importlib.util
    import subprocess
    import sys

    from efficient_dlm.platforms import tpu_chips_present

    if importlib.util.find_spec("libtpu") is None or tpu_chips_present():
        pytest.skip("needs libtpu installed on a host without TPU chips")
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    code = "import efficient_dlm, jax; print(jax.devices()[0].platform)"
    proc = subprocess.run([sys.executable, "-c", code], env={**env, "PYTHONPATH": cli.REPO_ROOT}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "cpu", proc.stderr
    assert "TPU" not in proc.stderr and "host bounds" not in proc.stderr, proc.stderr
