"""The trainer end to end on a tiny model: learning, checkpoints, exact resume, NaN handling, CLI."""
import json
import os
import shutil
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from ml_collections import ConfigDict

import efficient_dlm as edlm
from efficient_dlm import cli
from efficient_dlm.config import typed
from efficient_dlm.train.loop import NonFiniteError, cached_step, train
from efficient_dlm.train.step import make_train_step
from tests.corpus import documents, write_jsonl
from tests.devices import subprocess_env

CONFIG = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "tiny_train.py")
SMALL_MODEL = dict(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16)


def _load_recipe() -> ConfigDict:
    import importlib.util

    spec = importlib.util.spec_from_file_location("tiny_train", CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def tiny_config(tmp, name: str, **train) -> ConfigDict:
    c = _load_recipe()
    c.model.update(SMALL_MODEL)
    c.data.train_files = write_jsonl(tmp / "train.jsonl", documents(300, 1))
    c.data.eval_files = write_jsonl(tmp / "eval.jsonl", documents(40, 2))
    c.data.seq_len = 32
    c.data.num_threads = 1
    c.diffusion.block_size = 4
    c.diffusion.block_size_schedule = "0:4,8:8"
    c.diffusion.mask_token = "append"
    c.train.update(dict(steps=16, batch_size=4, learning_rate=3e-3, warmup_steps=2, save_every=4, keep_last=10,
                        eval_every=8, eval_batches=2, log_every=1, progress=False, max_nonfinite_steps=3))
    c.train.update(train)
    c.run_dir = str(tmp / name)
    return c


def _params(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_training_learns_resumes_bit_exactly_accumulates_and_skips_non_finite_steps(tmp_path, capsys):
    """One run, several properties: the compiled steps are shared (compiling dominates CPU test time)."""
    config = tiny_config(tmp_path, "straight")
    result = train(config)
    _check_learning_and_run_layout(result)
    _check_kill_and_resume(config, result, tmp_path, capsys)
    _check_signal_stops_cleanly_and_resumes(config, result, tmp_path, capsys)
    _check_gradient_accumulation(config, result)
    _check_non_finite_steps(config, tmp_path, capsys)


def _check_learning_and_run_layout(result):
    nll = [h["nll"] for h in result.history]
    assert np.mean(nll[-4:]) < np.mean(nll[:4]) - 0.5, nll
    # Block-size schedule: 4 for steps 0-7, 8 afterwards; one compiled step per size.
    assert [h["block_size"] for h in result.history] == [4] * 8 + [8] * 8
    # [MASK] appended: vocab 512 -> 513 valid rows padded to 640; recorded in model_config.json.
    cfg, extra = edlm.checkpoints.read_model_config(result.run_dir)
    assert (cfg.vocab_size, cfg.mask_token_id, extra["valid_vocab_size"]) == (640, 512, 513)
    assert os.path.exists(os.path.join(result.run_dir, "tokenizer", "tokenizer.json"))
    loaded = edlm.load(result.run_dir)
    spec = loaded.spec  # the run's DiffusionSpec: final block size of the schedule, appended [MASK], padding
    assert (spec.mask_token_id, spec.valid_vocab_size, spec.block_size, spec.attention) == (512, 513, 8, "block_diffusion")
    assert os.path.exists(os.path.join(result.run_dir, "diffusion_spec.json"))
    for a, b in zip(_params(nnx.state(loaded, nnx.Param)), _params(result.state.params)):
        np.testing.assert_array_equal(a, b)
    assert sorted(int(p) for p in os.listdir(result.run_dir) if p.isdigit()) == [4, 8, 12, 16]
    lines = [json.loads(x) for x in open(os.path.join(result.run_dir, "metrics.jsonl"))]
    train_keys = {"loss", "learning_rate", "grad_norm", "tokens_per_s", "masked_fraction", "step_time", "accuracy"}
    assert train_keys <= set(lines[0]) and [x["step"] for x in lines if x["kind"] == "eval"] == [8, 16]
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(result.run_dir, "tensorboard")))


def _check_kill_and_resume(config, result, tmp, capsys):
    resumed_dir = tmp / "resumed"
    # As if killed after step 16's metrics were logged but before checkpoints 12 and 16 were written.
    shutil.copytree(result.run_dir, resumed_dir, ignore=shutil.ignore_patterns("12", "16", "tensorboard"))
    config = ConfigDict(config.to_dict())
    config.run_dir = str(resumed_dir)
    capsys.readouterr()
    resumed = train(config)  # fresh Checkpointer, data iterator, state; restores step 8
    assert resumed.resumed_from == 8 and f"resumed {resumed_dir} from step 8" in capsys.readouterr().out
    assert [h["step"] for h in resumed.history] == list(range(9, 17))
    logged = [json.loads(x) for x in open(resumed_dir / "metrics.jsonl")]
    assert [x["step"] for x in logged if x["kind"] == "train"] == list(range(1, 17))  # each step once
    assert [x["step"] for x in logged if x["kind"] == "eval"] == [8, 16]
    for a, b in zip(resumed.history, result.history[8:]):
        assert a["loss"] == b["loss"] and a["grad_norm"] == b["grad_norm"]
    for a, b in zip(_params(resumed.state.params), _params(result.state.params)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(_params(resumed.state.opt_state), _params(result.state.opt_state)):
        np.testing.assert_array_equal(a, b)


def _check_signal_stops_cleanly_and_resumes(config, result, tmp, capsys):
    """SIGTERM mid-run: the step in flight finishes, a checkpoint is written, the run says where to
    resume; resuming then ends bit-identical to the uninterrupted run."""
    config = ConfigDict(config.to_dict())
    config.run_dir = str(tmp / "signalled")

    def terminate_during_step_6(step, batch):
        if step == 5:
            os.kill(os.getpid(), signal.SIGTERM)
        return batch

    capsys.readouterr()
    stopped = train(config, batch_transform=terminate_during_step_6)
    assert stopped.stopped_by == "SIGTERM" and int(stopped.state.step) == 6
    assert f"SIGTERM: stopped after step 6; checkpoint step 6 in {config.run_dir}; run the same command to resume" in capsys.readouterr().out
    assert edlm.checkpoints.run_steps(config.run_dir) == [4, 6]
    resumed = train(config)
    assert resumed.resumed_from == 6 and resumed.stopped_by is None
    for a, b in zip(_params(resumed.state.params), _params(result.state.params)):
        np.testing.assert_array_equal(a, b)


def _check_non_finite_steps(config, tmp_path, capsys):
    config = ConfigDict(config.to_dict())
    config.run_dir = str(tmp_path / "nan")
    config.train.save_every = 2

    def poison(step, batch):
        if step >= 4:
            batch = {**batch, "loss_weights": np.where(np.arange(batch["tokens"].shape[1]) == 3, np.nan, batch["loss_weights"]).astype(np.float32)}
        return batch

    with pytest.raises(NonFiniteError, match="stopped at step 7: 3 consecutive steps with non-finite loss or gradients.*last checkpoint: step 6"):
        train(config, batch_transform=poison)
    assert "step 5: non-finite loss or gradients; update skipped (1 in a row)" in capsys.readouterr().out
    # Steps 5 and 6 were skipped: the step-6 checkpoint holds exactly the step-4 parameters, all finite.
    for a, b in zip(_restore(config.run_dir, 4), _restore(config.run_dir, 6)):
        np.testing.assert_array_equal(a, b)
        assert np.all(np.isfinite(a))


def _restore(run_dir: str, step: int) -> list[np.ndarray]:
    """Parameters of one step of a run, read with orbax directly."""
    import orbax.checkpoint as ocp

    from efficient_dlm.models.decoder import abstract_model

    cfg, _ = edlm.checkpoints.read_model_config(run_dir)
    target = nnx.state(abstract_model(cfg), nnx.Param)
    with ocp.StandardCheckpointer() as ckptr:
        return _params(ckptr.restore(os.path.join(run_dir, str(step), "params"), target))


def _check_gradient_accumulation(config, result):
    """Two micro-batches give the same loss and update as one batch (normalised by the global count)."""
    cfg = result.model_config
    c = typed(config)
    diffusion = c.diffusion.replace(valid_vocab_size=513)
    one = cached_step(make_train_step, diffusion, c.train, cfg, 8)  # the step the straight run compiled
    two = make_train_step(diffusion, c.train.replace(grad_accum=2), cfg, block_size=8, donate=False)
    rng = np.random.default_rng(0)
    batch = {"tokens": rng.integers(3, 200, (4, 32)).astype(np.int32), "segment_ids": np.ones((4, 32), np.int32),
             "positions": np.tile(np.arange(32, dtype=np.int32), (4, 1)), "loss_weights": np.ones((4, 32), np.float32)}
    copy = lambda: jax.tree.map(jnp.copy, result.state)  # noqa: E731  (the steps donate their input)
    s2, m2 = two(copy(), batch, jax.random.PRNGKey(9))
    s1, m1 = one(copy(), batch, jax.random.PRNGKey(9))
    np.testing.assert_allclose(float(m2["loss"]), float(m1["loss"]), rtol=1e-5)
    for a, b in zip(_params(s2.params), _params(s1.params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    # Joint objective through the train step (diffusion.ar_weight): its loss is the plain one plus w times
    # the causal next-token NLL it reports (the loss itself is tested in test_objectives.py).
    joint = make_train_step(diffusion.replace(ar_weight=0.5), c.train, cfg, block_size=8, donate=False)
    _, mj = joint(copy(), batch, jax.random.PRNGKey(9))
    np.testing.assert_allclose(float(mj["loss"]), float(m1["loss"]) + 0.5 * float(mj["ar_nll"]), rtol=1e-5)


def test_edlm_train_cli_ar_then_bad_configs(tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", documents(80, 3))
    small = [f"--config.model.{k}={v}" for k, v in SMALL_MODEL.items()]
    base = ["edlm", "train", f"--config={CONFIG}", f"--config.data.train_files={data}", "--config.data.seq_len=32",
            "--config.train.batch_size=4", "--config.train.progress=False", *small]
    run_dir = tmp_path / "ar"
    rc = cli.main(base + ["--config.diffusion.objective=ar", "--config.train.steps=6", f"--config.run_dir={run_dir}"])
    out, err = capsys.readouterr()
    assert rc == 0 and "trained ar to step 6" in out, err
    model = edlm.load(str(run_dir))
    assert model.config.hidden_size == 32 and model.config.mask_token_id == 511
    rc = cli.main(base + ["--config.diffusion.objective=mdlm", f"--config.run_dir={tmp_path / 'bad'}"])
    assert rc == 2 and capsys.readouterr().err.strip() == (
        "edlm train: error: unknown diffusion.objective 'mdlm'; choose one of block_diffusion, block, bidirectional, ar, opd"
    )


def test_bad_configs_fail_with_one_clear_message(tmp_path):
    config = tiny_config(tmp_path, "unused")
    (tmp_path / "empty.jsonl").write_text("")
    bad = {
        ("diffusion", "block_size_schedule", "0:4,8:5"): "diffusion.block_size_schedule (step 8) 5 does not divide data.seq_len 32",
        ("init", "tokenizer", str(tmp_path / "none")): "tokenizer not found",
        ("data", "train_files", str(tmp_path / "empty.jsonl")): "empty dataset",
        ("train", "grad_accum", 3): "train.grad_accum (3) must divide train.batch_size (4)",
        ("diffusion", "mask_token", "model"): "no [MASK] token",
    }
    for (section, key, value), message in bad.items():
        c = ConfigDict(config.to_dict())
        c[section][key] = value
        c.model.mask_token_id = None
        c.run_dir = str(tmp_path / "bad")
        with pytest.raises((ValueError, FileNotFoundError)) as err:
            train(c)
        assert message in str(err.value) and "\n" not in str(err.value), (key, err.value)


def test_sharded_training_on_8_devices_matches_one_device(tmp_path):
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = subprocess_env(devices=8)
    done = subprocess.run([sys.executable, os.path.join(root, "tests", "train_multidevice.py"), str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0 and done.stdout.strip().endswith("OK"), done.stderr[-3000:]


def test_qwen3_8b_block_diffusion_recipe_traces_at_full_size():
    """The 8B recipe validates and its train step traces (shapes only, nothing allocated)."""
    import importlib.util

    from efficient_dlm.train.optim import make_optimizer
    from efficient_dlm.train.state import abstract_state

    path = os.path.join(os.path.dirname(CONFIG), "qwen3_8b_bd.py")
    spec = importlib.util.spec_from_file_location("qwen3_8b_bd", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = typed(module.get_config())
    cfg = config.model.replace(vocab_size=152064, mask_token_id=151936)  # what mask_token=append makes
    diffusion, train = config.diffusion.replace(valid_vocab_size=151937), config.train.replace(batch_size=2)
    state = abstract_state(cfg, make_optimizer(train))
    n = config.data.seq_len
    batch = {k: jax.ShapeDtypeStruct((2, n), jnp.int32) for k in ("tokens", "segment_ids", "positions")}
    batch["loss_weights"] = jax.ShapeDtypeStruct((2, n), jnp.float32)
    step = make_train_step(diffusion, train, cfg, jit=False)
    new_state, metrics = jax.eval_shape(step, state, batch, jax.ShapeDtypeStruct((2,), jnp.uint32))
    assert jax.tree.structure(new_state) == jax.tree.structure(state)
    assert sum(x.size for x in jax.tree.leaves(state.params)) > 8e9
    assert metrics["loss"].shape == () and new_state.params["lm_head"].shape == (4096, 152064)


def test_checkpoint_retention_keeps_the_last_k_and_the_best(tmp_path):
    import grain

    from efficient_dlm.train.checkpointing import Checkpointer
    from efficient_dlm.train.state import TrainState

    t = ConfigDict(dict(keep_last=2, keep_best=True, async_checkpoint=True))
    ckpt = Checkpointer(str(tmp_path / "run"), t)
    data = iter(grain.MapDataset.range(100).to_iter_dataset())
    eval_loss = {2: 0.5, 4: 0.9}  # step 2 is the best evaluation; later steps have none
    for step in range(1, 6):
        next(data)
        state = TrainState(jnp.asarray(step, jnp.int32), {"w": jnp.full((3,), step, jnp.float32)}, {}, jax.random.PRNGKey(0))
        ckpt.save(state, {"data": data}, {"eval_loss": eval_loss[step]} if step in eval_loss else None)
    ckpt.wait()
    assert sorted(ckpt.all_steps()) == [2, 4, 5]
    restored_data = iter(grain.MapDataset.range(100).to_iter_dataset())
    target = jax.eval_shape(lambda: state)
    back = ckpt.restore(2, target, {"data": restored_data})
    assert int(back.step) == 2 and np.all(np.asarray(back.params["w"]) == 2) and next(restored_data) == 2
    ckpt.close()
