"""Checkpoints verify what they wrote and never fall back; one writer per run directory.

A training run directory is built here with the real Checkpointer (two steps of a tiny model, no
training step compiled); the damage is done to the files orbax wrote."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

import efficient_dlm as edlm
from efficient_dlm import checkpoints, cli
from efficient_dlm.config import base_config
from efficient_dlm.errors import UserError
from efficient_dlm.integrity import MANIFEST, CheckpointError
from efficient_dlm.train.checkpointing import Checkpointer
from efficient_dlm.train.optim import make_optimizer
from efficient_dlm.train.run_lock import LOCK_NAME, RunLock
from efficient_dlm.train.state import TrainState, abstract_state, create_state
from tests.hf_factory import variant


def _params(model_or_state):
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model_or_state, nnx.Param))]


def _biggest_file(root: str) -> str:
    files = [os.path.join(d, n) for d, _, names in os.walk(root) for n in names if n != MANIFEST]
    return max(files, key=os.path.getsize)


@pytest.fixture
def run_dir(tiny_model, tmp_path):
    """A training run directory with steps 2 and 4 (step 4's parameters scaled by 2)."""
    t = base_config().train
    t.keep_best = False
    tx = make_optimizer(t)
    path = str(tmp_path / "run")
    checkpoints.write_model_config(path, tiny_model.config, {})
    ckpt = Checkpointer(path, t)
    state = create_state(tiny_model, tx, seed=0)
    for step, scale in ((2, 1.0), (4, 2.0)):
        params = jax.tree.map(lambda x, s=scale: x * s, state.params)
        ckpt.save(TrainState(jax.numpy.asarray(step), params, state.opt_state, state.rng), {})
    ckpt.close()
    return path


def test_damaged_or_missing_steps_are_named_and_never_replaced_by_older_ones(run_dir, tiny_model, tmp_path, capsys):
    assert all(os.path.exists(os.path.join(run_dir, s, MANIFEST)) for s in ("2", "4"))
    newest = edlm.load(run_dir)
    for a, b in zip(_params(newest), _params(tiny_model)):
        np.testing.assert_array_equal(a, 2 * b)
    for a, b in zip(_params(edlm.load(run_dir, step=2)), _params(tiny_model)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(CheckpointError, match=r"no step 3 \(steps: 2, 4\)"):
        edlm.load(run_dir, step=3)

    victim = _biggest_file(os.path.join(run_dir, "4", "params"))
    data = bytearray(open(victim, "rb").read())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside a parameter chunk
    open(victim, "wb").write(bytes(data))
    with pytest.raises(CheckpointError, match=rf"step 4: file {victim} is corrupted \(checksum mismatch\)"):
        edlm.load(run_dir)
    open(victim, "wb").write(bytes(data[: len(data) // 3]))
    with pytest.raises(CheckpointError, match=rf"step 4: file {victim} is truncated"):
        edlm.load(run_dir)
    os.remove(victim)
    with pytest.raises(CheckpointError, match=rf"step 4: file {victim} is missing"):
        edlm.load(run_dir)

    # The CLI: one line naming the step and file; --step reads the older step explicitly.
    out = str(tmp_path / "hf")
    code = cli.main(["edlm", "export-hf", f"--ckpt={run_dir}", f"--out={out}", f"--tokenizer_dir={_tokenizer(tmp_path)}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == f"edlm export-hf: error: {run_dir} step 4: file {victim} is missing"
    assert not os.path.exists(out)
    code = cli.main(["edlm", "export-hf", f"--ckpt={run_dir}", f"--out={out}", f"--tokenizer_dir={_tokenizer(tmp_path)}", "--step=2"])
    assert code == 0, capsys.readouterr().err
    for a, b in zip(_params(edlm.from_hf(out)), _params(tiny_model)):
        np.testing.assert_array_equal(a, b)


def _tokenizer(tmp_path) -> str:
    return os.path.join(os.path.dirname(edlm.__file__), "assets", "byte_tokenizer")


def test_model_checkpoint_verifies_and_resumed_step_without_checksums_gets_them(run_dir, tiny_model, tmp_path):
    path = str(tmp_path / "ckpt")
    edlm.save(variant(tiny_model, mask_token_id=5), path)
    victim = _biggest_file(os.path.join(path, "params"))
    with open(victim, "r+b") as f:
        f.truncate(os.path.getsize(victim) - 1)
    with pytest.raises(CheckpointError, match=rf"{path}: file {victim} is truncated"):
        edlm.load(path)
    with open(os.path.join(path, "model_config.json"), "w") as f:
        f.write('{"num_layers": ')
    with pytest.raises(CheckpointError, match=rf"{path}/model_config.json: Expecting value"):
        edlm.load(path)

    # A run killed between orbax's atomic rename and the checksums: load refuses, resume records them.
    os.remove(os.path.join(run_dir, "4", MANIFEST))
    with pytest.raises(CheckpointError, match=r"step 4: no checksums.json .*resuming the run records it"):
        edlm.load(run_dir)
    t = base_config().train
    ckpt = Checkpointer(run_dir, t)
    assert ckpt.verify(4) is True and ckpt.verify(4) is False
    target = abstract_state(tiny_model.config, make_optimizer(t), 0)
    restored = ckpt.restore(4, target, {})
    ckpt.close()
    for a, b in zip(jax.tree.leaves(restored.params), _params(tiny_model)):
        np.testing.assert_array_equal(np.asarray(a), 2 * b)


def test_one_writer_per_run_directory(tmp_path):
    run = str(tmp_path / "run")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        os.makedirs(run)
        with open(os.path.join(run, LOCK_NAME), "w") as f:
            json.dump({"pid": sleeper.pid, "host": os.uname().nodename, "started": "earlier"}, f)
        with pytest.raises(UserError, match=rf"{run} is in use by another run \(pid {sleeper.pid} on .*started earlier\)"):
            RunLock(run).acquire()
        # The trainer refuses before touching anything.
        config = base_config()
        config.run_dir = run
        from efficient_dlm.train.loop import train

        with pytest.raises(UserError, match=rf"pid {sleeper.pid}"):
            train(config)
        assert sorted(os.listdir(run)) == [LOCK_NAME]
    finally:
        sleeper.kill()
        sleeper.wait()
    # The holder died: its lock is stale and taken over; released on exit.
    with RunLock(run) as lock:
        assert json.load(open(lock.path))["pid"] == os.getpid()
        with pytest.raises(UserError, match="in use by another run"):
            RunLock(run).acquire()
    assert not os.path.exists(os.path.join(run, LOCK_NAME))
