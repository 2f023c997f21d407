"""LoRA (models/lora.py, models/adapters.py, train/lora.py): adapters train on a frozen base, checkpoint
alone, resume exactly, load merged, and export merged (transformers) and unmerged (PEFT), whose
forwards are the independent references for ours."""
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import peft
import pytest
import torch
import transformers
from flax import nnx
from jax.sharding import PartitionSpec as P
from ml_collections import ConfigDict

import efficient_dlm as edlm
from efficient_dlm.config import base_config, typed, validate
from efficient_dlm.data.byte_tokenizer import ASSET_DIR
from efficient_dlm.errors import UserError
from efficient_dlm.integrity import CheckpointError
from efficient_dlm.models.adapters import add_adapters, merge_adapters, split_adapted
from efficient_dlm.models.decoder import MODEL_STATE
from efficient_dlm.models.lora import LoraConfig
from efficient_dlm.port.peft_export import to_peft
from efficient_dlm.train.lora import lora_config
from efficient_dlm.train.opd import make_opd_step
from efficient_dlm.train.loop import train
from efficient_dlm.train.optim import make_optimizer
from efficient_dlm.train.state import create_state, split_model, state_shardings
from efficient_dlm.train.step import make_train_step
from tests.devices import subprocess_env
from tests.sample_reference import peaked_model
from tests.test_chat_sft import _conversations, _write
from tests.test_moe_configs import _recipe
from tests.test_opd import BLOCK, PROMPTS, _batch
from tests.test_opd import _recipe as opd_recipe
from tests.test_train import tiny_config

ALL = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
TOKENS = np.random.RandomState(0).randint(2, 500, size=(2, 16))


def _leaves(tree) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _relative(ours, ref) -> float:
    return float(np.abs(np.asarray(ours) - np.asarray(ref)).max() / np.abs(np.asarray(ref)).max())


def _lora_config(tmp, base_dir: str) -> ConfigDict:
    """LoRA chat SFT (data.format=chat: assistant turns supervised) on the saved base."""
    c = tiny_config(tmp, "lora")
    c.data.update(format="chat", chat_template="builtin", seq_len=64, eval_files="")  # eval off: one compiled step
    c.data.train_files = _write(tmp / "chat.jsonl", _conversations(200))
    c.diffusion.update(mask_token="model", block_size_schedule="")
    c.init.checkpoint = base_dir
    c.lora.update(rank=4, alpha=8.0, dropout=0.1, targets=ALL)
    c.train.update(steps=6, save_every=3, eval_every=0, learning_rate=1e-2)
    return c


def test_lora_chat_sft_freezes_the_base_resumes_exactly_loads_merged_and_exports(tmp_path):
    c = tiny_config(tmp_path, "unused")
    base = edlm.init_model(edlm.ModelConfig.from_dict(c.model.to_dict()), seed=0)
    base_dir = edlm.save(base, str(tmp_path / "base"), tokenizer_dir=ASSET_DIR)
    base_params = _leaves(nnx.state(base, MODEL_STATE))
    config = _lora_config(tmp_path, base_dir)
    result = train(config)

    # The base went through six steps bitwise unchanged; the adapters moved; moments exist for adapters only.
    assert len(_leaves(result.state.frozen)) == len(base_params)
    for a, b in zip(_leaves(result.state.frozen), base_params):
        np.testing.assert_array_equal(a, b)
    adapter_paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(result.state.params)[0]]
    assert len(adapter_paths) == 2 * 7 and all("_lora_" in p for p in adapter_paths)
    assert all(np.abs(x).max() > 0 for x in _leaves(result.state.params))  # B started at zero
    moments = [(jax.tree_util.keystr(p), x) for p, x in jax.tree_util.tree_flatten_with_path(result.state.opt_state)[0]]
    tensors = [p for p, x in moments if np.ndim(x) > 0]
    assert len(tensors) == 2 * len(adapter_paths) and all("_lora_" in p for p in tensors)  # Adam mu and nu
    assert all(np.isfinite(h["loss"]) for h in result.history)
    record = json.load(open(os.path.join(result.run_dir, "model_config.json")))["extra"]["lora"]
    assert record["base"]["path"] == base_dir and record["rank"] == 4

    _check_resume(config, result, tmp_path)
    adapted = edlm.load(result.run_dir, merge_lora=False)
    merged = edlm.load(result.run_dir)
    ours = np.asarray(adapted(TOKENS, attention="block", block_size=4))
    assert _relative(merged(TOKENS, attention="block", block_size=4), ours) <= 1e-5
    assert _relative(base(TOKENS, attention="block", block_size=4), ours) > 1e-3  # the adapters do something
    for a, b in zip(_leaves(split_adapted(adapted)[1]), _leaves(result.state.params)):
        np.testing.assert_array_equal(a, b)
    _check_exports(result.run_dir, base_dir, ours, tmp_path)

    # The run refuses a base whose files changed since it started.
    manifest = os.path.join(base_dir, "params", "checksums.json")
    with open(manifest) as f:
        payload = json.load(f)
    with open(manifest, "w") as f:
        json.dump(payload, f, indent=3)  # the same checksums, a different file
    with pytest.raises(CheckpointError, match="changed since the run started"):
        edlm.load(result.run_dir)


def _check_resume(config, result, tmp):
    """Killed after step 6's metrics but before its checkpoint: resuming from step 3 ends bit-identical."""
    resumed_dir = tmp / "resumed"
    shutil.copytree(result.run_dir, resumed_dir, ignore=shutil.ignore_patterns("6", "tensorboard"))
    config = ConfigDict(config.to_dict())
    config.run_dir = str(resumed_dir)
    resumed = train(config)
    assert resumed.resumed_from == 3
    for a, b in zip(resumed.history, result.history[3:]):
        assert a["loss"] == b["loss"] and a["grad_norm"] == b["grad_norm"]
    for a, b in zip(_leaves((resumed.state.params, resumed.state.opt_state)), _leaves((result.state.params, result.state.opt_state))):
        np.testing.assert_array_equal(a, b)
    config.lora.rank = 8
    with pytest.raises(UserError, match="adapters cannot change on resume"):
        train(config)


def _check_exports(run_dir: str, base_dir: str, ours: np.ndarray, tmp):
    """transformers runs the merged export, PEFT the base export plus the PEFT adapters: both compute
    our adapter forward (float32)."""
    with pytest.raises(UserError, match="is a LoRA run: pass --merge_lora"):
        edlm.to_hf(run_dir, str(tmp / "refused"))
    merged_dir = edlm.to_hf(run_dir, str(tmp / "merged"), merge_lora=True)
    hf = transformers.AutoModelForCausalLM.from_pretrained(merged_dir, trust_remote_code=True, dtype=torch.float32)
    with torch.no_grad():
        assert _relative(hf(torch.tensor(TOKENS)).logits.numpy(), ours) <= 1e-5

    base_hf = edlm.to_hf(base_dir, str(tmp / "base_hf"), block_size=4)
    adapter_dir = to_peft(run_dir, str(tmp / "peft"), base_model=base_hf)
    with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
        assert len(json.load(f)["target_modules"]) == 7 * edlm.load(base_dir).config.num_layers
    model = transformers.AutoModelForCausalLM.from_pretrained(base_hf, trust_remote_code=True, dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(model, adapter_dir).eval()  # eval: PEFT's dropout off
    with torch.no_grad():
        assert _relative(model(torch.tensor(TOKENS)).logits.numpy(), ours) <= 1e-5


def test_lora_on_a_moe_model_adapts_experts_and_keeps_the_router_bias_frozen():
    """Two train steps of a tiny MoE (selection bias on) with adapters on q / v and the routed experts:
    the base, its selection bias included, bitwise unchanged; every adapter moved; the merged model
    (models/adapters.py, an einsum per weight) computes the adapter forward (grouped matmuls)."""
    c = _recipe("tiny_moe_train")
    c.model.update(first_k_dense=0, num_layers=1, router_bias=True, router_bias_update_rate=0.01)
    c.diffusion.update(block_size=4, mask_token="model")
    c.data.seq_len = 16
    c.train.update(batch_size=2, learning_rate=1e-2, warmup_steps=0)
    c.init.checkpoint = "unused-by-this-test"
    c.lora.update(rank=2, alpha=4.0, targets="q_proj,v_proj,experts")
    config = ConfigDict(validate(c).to_dict())
    model = edlm.init_model(edlm.ModelConfig.from_dict(config.model.to_dict()), seed=0)
    base = _leaves(nnx.state(model, MODEL_STATE))
    lora = LoraConfig(2, 4.0, 0.0, ("q_proj", "v_proj", "experts"))
    add_adapters(model, lora, seed=1)
    tx = make_optimizer(config.train)
    state = create_state(model, tx, 0, lora=lora)
    sections = typed(config)
    assert sections.lora.adapters() == lora
    step = make_train_step(sections.diffusion, sections.train, model.config, lora=lora, donate=False)
    rng = np.random.default_rng(0)
    batch = {"tokens": rng.integers(3, 200, (2, 16)).astype(np.int32), "segment_ids": np.ones((2, 16), np.int32),
             "positions": np.tile(np.arange(16, dtype=np.int32), (2, 1))}
    for i in range(2):
        state, metrics = step(state, batch, jax.random.PRNGKey(i))
        assert np.isfinite(float(metrics["loss"])) and not bool(metrics["skipped"])
    for a, b in zip(_leaves(state.frozen), base):
        np.testing.assert_array_equal(a, b)
    names = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(state.params)[0]]
    assert len(names) == 2 * 5 and sum("mlp" in n for n in names) == 6  # gate / up / down of the experts
    assert all(np.abs(x).max() > 0 for x in _leaves(state.params))
    graphdef = nnx.graphdef(model)
    adapted = nnx.merge(graphdef, state.params, state.frozen)
    ours = adapted(TOKENS % 200, attention="block", block_size=4)
    assert _relative(merge_adapters(adapted)(TOKENS % 200, attention="block", block_size=4), ours) <= 1e-5
    assert _relative(nnx.merge(graphdef, jax.tree.map(np.zeros_like, state.params), state.frozen)(
        TOKENS % 200, attention="block", block_size=4), ours) > 1e-4


def test_lora_config_errors_name_the_key(tmp_path):
    c = tiny_config(tmp_path, "bad")
    c.init.checkpoint = str(tmp_path)
    c.diffusion.mask_token = "model"
    for key, value, message in [
        ("rank", -1, "lora.rank must be a non-negative integer"),
        ("alpha", 0.0, "lora.alpha must be a positive number"),
        ("dropout", 1.0, r"lora.dropout must be in \[0, 1\)"),
        ("targets", "q_proj,qkv", "lora.targets 'q_proj,qkv'"),
        ("base_dtype", "int8", "unknown lora.base_dtype 'int8'"),
    ]:
        bad = ConfigDict(c.to_dict())
        bad.lora.rank = 4
        bad.lora[key] = value
        with pytest.raises(UserError, match=message):
            validate(bad)
    bad = ConfigDict(c.to_dict())
    bad.lora.rank, bad.init.checkpoint, bad.init.hf_dir = 4, "", str(tmp_path)
    with pytest.raises(UserError, match="import init.hf_dir first"):
        validate(bad)
    bad.lora.rank, bad.init.hf_dir, bad.run_dir = 4, "", str(tmp_path / "run")
    with pytest.raises(UserError, match="set init.checkpoint"):
        train(bad)
    bad.init.checkpoint, bad.diffusion.mask_token = str(tmp_path), "append"
    with pytest.raises(UserError, match="diffusion.mask_token='model'"):
        validate(bad)


def test_opd_steps_train_only_the_adapters():
    """OPD with LoRA: the student decodes with base + adapters, only the adapters move, the base stays bitwise."""
    c = opd_recipe({})
    c.opd.update(dict(block_size=BLOCK, steps_per_block=BLOCK, top_k=0))
    c.lora.update(rank=2, alpha=4.0, targets="q_proj,o_proj,down_proj")
    lora = lora_config(typed(c))
    teacher_params = split_model(peaked_model(seed=1))[1]  # a different model: the KL is not zero at the start
    student = peaked_model(seed=0)
    base = _leaves(split_model(student)[1])
    state = create_state(add_adapters(student, lora, seed=1), make_optimizer(c.train), 0, lora=lora)
    step = make_opd_step(typed(c), student.config, student.config, max_new_tokens=8, donate=False)
    kls = []
    for i in range(2):
        state, metrics = step(state, teacher_params, _batch(PROMPTS), jax.random.PRNGKey(i))
        kls.append(float(metrics["kl"]))
    assert all(np.isfinite(kls)) and kls[0] > 0
    for a, b in zip(_leaves(state.frozen), base):
        np.testing.assert_array_equal(a, b)
    assert all(np.abs(x).max() > 0 for x in _leaves(state.params))


def test_adapters_shard_by_the_base_rules_and_their_moments_follow():
    """Adapters carry their weight's logical names (rank replicated): A shards like the weight's input
    axes, B like its output axes, the experts axis on "expert"; Adam moments follow (no compile needed)."""
    cfg = edlm.ModelConfig(model_type="qwen3_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
    mesh = jax.sharding.AbstractMesh((1, 2, 1, 2), ("data", "fsdp", "tensor", "expert"))
    lora = LoraConfig(2, 4.0, 0.0, ("q_proj", "experts"))
    shardings = state_shardings(cfg, make_optimizer(base_config().train), mesh, lora)
    specs = {path: v.get_value().spec for path, v in nnx.to_flat_state(shardings.params)}
    assert specs[("layers", "attn", "q_proj_lora_a")] == P(None, "fsdp", None)  # [layers, embed, r]
    assert specs[("layers", "mlp", "gate_proj_lora_a")] == P(None, "expert", "fsdp", None)  # [layers, experts, embed, r]
    assert specs[("layers", "mlp", "down_proj_lora_b")] == P(None, "expert", None, "fsdp")  # [layers, experts, r, embed]
    moments = [(jax.tree_util.keystr(p), s.spec) for p, s in jax.tree_util.tree_flatten_with_path(shardings.opt_state)[0]]
    assert [spec for path, spec in moments if "q_proj_lora_a" in path] == [P(None, "fsdp", None)] * 2


def test_sharded_lora_training_on_8_devices_matches_one_device(tmp_path):
    """tests/lora_multidevice.py on 8 fake CPU devices (data=2, fsdp=2, tensor=2): losses, gradient
    norms and adapter updates equal one device's, the base stays bitwise, adapters and moments shard
    by the base weights' rules."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = subprocess_env(devices=8)
    done = subprocess.run([sys.executable, os.path.join(root, "tests", "lora_multidevice.py"), str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0 and done.stdout.strip().endswith("OK"), done.stderr[-3000:]
