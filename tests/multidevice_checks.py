"""Sharded numerics on 8 fake CPU devices, run as ONE subprocess by tests/test_parallel.py.

Usage: python tests/multidevice_checks.py HF_DIR WORK_DIR. Each check asserts against the
single-device computation (the reference) and prints "ok <name>"; the parent test requires all.
"""
from __future__ import annotations

import os
import sys

from tests.devices import subprocess_env

os.environ.update(subprocess_env(devices=8))  # 8 fake devices, the suite's cheap code generation

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from efficient_dlm import checkpoints  # noqa: E402
from efficient_dlm.config import base_config, model_config, typed  # noqa: E402
from efficient_dlm.models.cache import KVCache  # noqa: E402
from efficient_dlm.models.decoder import Decoder  # noqa: E402
from efficient_dlm.parallel import distributed, sharding  # noqa: E402
from efficient_dlm.parallel import mesh as mesh_lib  # noqa: E402
from efficient_dlm.port import hf_import  # noqa: E402
from efficient_dlm.sample.api import prepare  # noqa: E402
from efficient_dlm.serve.engine import Engine, EngineConfig, Request  # noqa: E402
from efficient_dlm.train.optim import make_optimizer  # noqa: E402
from efficient_dlm.train.state import create_state  # noqa: E402
from efficient_dlm.train.step import make_train_step  # noqa: E402

MESHES = [(8, 1, 1), (2, 4, 1), (2, 2, 2)]  # (fsdp, tensor, expert)


def tiny_config():
    c = base_config()
    m = c.model
    m.vocab_size, m.hidden_size, m.intermediate_size, m.num_layers = 128, 32, 64, 2
    m.num_heads, m.num_kv_heads, m.head_dim, m.qk_norm, m.mask_token_id = 4, 2, 8, True, 127
    c.diffusion.block_size = 4
    return c


def mesh_for(c, shape):
    """Mesh over (fsdp, tensor, expert) = shape; (1, 1, 1) is the single-device reference."""
    c.mesh.data, (c.mesh.fsdp, c.mesh.tensor, c.mesh.expert) = 1, shape
    devices = jax.devices()[: int(np.prod(shape))]
    return mesh_lib.make_mesh(c.mesh, devices), mesh_lib.config_rules(c.mesh)


def build(cfg, mesh, rules):
    return sharding.create_sharded(lambda: Decoder(cfg, rngs=nnx.Rngs(params=0)), mesh, rules)


def train_and_sample(c, cfg, model, tokens, mesh, rules):
    """One jitted program (compiling once per mesh keeps the test fast) with three parts:
    - loss and gradient norm of the trainer's block-diffusion step (efficient_dlm.train.step);
    - the sampler's whole generation program (efficient_dlm.sample: ragged prompts, prefill, blocks,
      denoising steps, KV cache): tokens and the logits they were committed with;
    - an empty KV cache, to read its sharding."""
    tx = make_optimizer(c.train)
    state = create_state(model, tx, 0, mesh)
    step = make_train_step(typed(c).diffusion, typed(c).train, cfg, tx=tx, jit=False)
    batch = dict(tokens=tokens, segment_ids=np.ones_like(tokens), positions=np.broadcast_to(np.arange(16), tokens.shape))
    batch = distributed.global_batch(batch, mesh, tokens.shape[0])
    assert batch["tokens"].sharding.spec == sharding.batch_sharding(mesh, 2, tokens.shape).spec
    prompts = [row[: 3 + i] for i, row in enumerate(tokens)]  # ragged: 3..10 tokens
    prep = prepare(model, prompts, max_new_tokens=8, block_size=4, strategy="threshold", threshold=0.5, return_logits=True)
    graphdef, plan, params, inputs, knobs = prep.args

    @jax.jit
    def run(state, batch, params, inputs, knobs):
        sampled = prep.program(graphdef, plan, params, inputs, knobs)
        state, metrics = step(state, batch, jax.random.key(7))
        cache = KVCache.empty(cfg, tokens.shape[0], 16)
        return jnp.stack([metrics["loss"], metrics["grad_norm"]]), state.params, sampled, cache.k

    with mesh_lib.use(mesh, rules):
        return run(state, batch, params, inputs, knobs)


def check_train_and_sample(c, cfg):
    """Same loss, gradient norm and sampled tokens on every mesh as on one device; parameters created
    in place (sharded init) with the right values; batch, parameters and KV cache sharded by the rules."""
    tokens = np.asarray(jax.random.randint(jax.random.key(1), (8, 16), 0, 120))
    mesh, rules = mesh_for(c, (1, 1, 1))
    ref_model = build(cfg, mesh, rules)
    ref_losses, _, ref_sampled, _ = train_and_sample(c, cfg, ref_model, tokens, mesh, rules)
    assert (ref_sampled["lengths"] == 8).all() and (ref_sampled["tokens"] != 127).all(), ref_sampled
    ref_state = nnx.state(ref_model, nnx.Param)
    for shape in MESHES:
        mesh, rules = mesh_for(c, shape)
        if shape == MESHES[-1]:  # sharded init once (it compiles); elsewhere place the reference values
            model = build(cfg, mesh, rules)
        else:
            model = nnx.merge(nnx.graphdef(ref_model), jax.device_put(ref_state, sharding.state_shardings(ref_state, mesh)))
        for (path, got), (_, want) in zip(nnx.to_flat_state(nnx.state(model, nnx.Param)), nnx.to_flat_state(ref_state)):
            array = got.get_value()
            assert array.sharding.spec == sharding.param_spec(got, mesh), (shape, path)
            np.testing.assert_allclose(np.asarray(array), np.asarray(want.get_value()), rtol=1e-6, atol=1e-8)
        losses, params, sampled, cache_k = train_and_sample(c, cfg, model, tokens, mesh, rules)
        np.testing.assert_allclose(losses, ref_losses, rtol=2e-5, err_msg=f"train loss, grad norm, mesh {shape}")
        for key in ("tokens", "commit_step", "lengths"):
            np.testing.assert_array_equal(sampled[key], ref_sampled[key], err_msg=f"sampled {key}, mesh {shape}")
        np.testing.assert_allclose(sampled["logits"], ref_sampled["logits"], rtol=1e-5, atol=1e-5, err_msg=f"mesh {shape}")
        k_proj = params["layers"]["attn"]["k_proj"][...]
        want = sharding.named(mesh, ("layers", "embed", "kv_heads", "head_dim"), k_proj.shape)
        assert k_proj.sharding.is_equivalent_to(want, k_proj.ndim), (shape, k_proj.sharding)
        want = sharding.cache_sharding(mesh, cache_k.shape)
        assert cache_k.sharding.is_equivalent_to(want, cache_k.ndim), (shape, cache_k.sharding)
    print("ok train_and_sample", ref_losses, ref_sampled["tokens"][0])


def check_hf_load(c, hf_dir):
    """Every shard holds the right values and the reader was asked only for the shards' slices."""
    ref = nnx.state(hf_import.from_hf(hf_dir), nnx.Param)
    requests: dict[tuple, list] = {}
    original = hf_import._slice_reader

    def recording_reader(ckpt, rule, cfg, dtype):
        read = original(ckpt, rule, cfg, dtype)
        return lambda index: (requests.setdefault(rule.path, []).append(index), read(index))[1]

    hf_import._slice_reader = recording_reader
    try:
        for shape in MESHES:
            mesh, rules = mesh_for(c, shape)
            requests.clear()
            with mesh_lib.use(mesh, rules):
                state = nnx.state(hf_import.from_hf(hf_dir, mesh=mesh), nnx.Param)
            for (path, got), (_, want) in zip(nnx.to_flat_state(state), nnx.to_flat_state(ref)):
                key = tuple(str(p) for p in path)
                array, expected = got.get_value(), np.asarray(want.get_value())
                spec = sharding.param_spec(got, mesh)
                assert array.sharding.spec == spec, (key, array.sharding.spec, spec)
                for shard in array.addressable_shards:
                    np.testing.assert_array_equal(np.asarray(shard.data), expected[shard.index], err_msg=str(key))
                wanted = {_norm(i, array.shape) for i in array.sharding.devices_indices_map(array.shape).values()}
                asked = {_norm(i, array.shape) for i in requests[key]}
                assert asked == wanted, (key, shape, asked, wanted)
                if any(spec):  # a sharded weight is never read whole
                    assert _norm(tuple(slice(None) for _ in array.shape), array.shape) not in asked, key
    finally:
        hf_import._slice_reader = original
    print("ok hf_load")


def _norm(index, shape):
    return tuple(s.indices(n)[:2] for s, n in zip(index, shape))


def check_orbax_load(c, cfg, work_dir):
    model = Decoder(cfg, rngs=nnx.Rngs(params=4))
    path = checkpoints.save(model, os.path.join(work_dir, "ckpt"))
    ref = nnx.state(model, nnx.Param)
    mesh, rules = mesh_for(c, (2, 2, 2))
    with mesh_lib.use(mesh, rules):
        state = nnx.state(checkpoints.load(path, mesh=mesh), nnx.Param)
    for (path_, got), (_, want) in zip(nnx.to_flat_state(state), nnx.to_flat_state(ref)):
        array = got.get_value()
        assert array.sharding.spec == sharding.param_spec(got, mesh), path_
        for shard in array.addressable_shards:
            np.testing.assert_array_equal(np.asarray(shard.data), np.asarray(want.get_value())[shard.index])
    print("ok orbax_load")


def _drive(engine: Engine, requests) -> list[list[int]]:
    """Runs the requests through the engine on this thread (admit, step, until idle): their tokens."""
    out = [[] for _ in requests]
    for i, (prompt, settings) in enumerate(requests):
        engine.waiting.append(Request(prompt, 8, {**engine.defaults, **settings}, lambda new, _, i=i: out[i].extend(new)))
    while engine.busy:
        with engine._wake:
            engine._admit()
        engine.step()
    return out


def check_serve_sharded(c, cfg):
    """The serving engine with its slots sharded over the data axes (mesh data=2 fsdp=2 tensor=2) gives every
    request the tokens the unsharded engine gives it (ragged prompts joining at different blocks, greedy and
    sampled rows); the slots' KV cache is laid out by the rules (slots over data x fsdp)."""
    model = Decoder(cfg, rngs=nnx.Rngs(params=0))
    params = nnx.state(model, nnx.Param)  # scaled up so that the outputs depend on the prompt
    nnx.update(model, jax.tree.map(lambda x: x * 6 if x.ndim >= 2 else x, params))
    rng = np.random.RandomState(3)
    requests = [(rng.randint(1, 120, size=n).tolist(), {"threshold": 0.3, "temperature": 0.7 * (i % 2), "seed": i})
                for i, n in enumerate([3, 8, 5, 1, 7, 2])]
    config = EngineConfig(slots=4, max_prompt_tokens=8, max_new_tokens=8, block_size=4)
    want = _drive(Engine(model, config), requests)
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor, c.mesh.expert = 2, 2, 2, 1
    mesh = mesh_lib.make_mesh(c.mesh, jax.devices())
    engine = Engine(model, config, mesh=mesh, rules=mesh_lib.config_rules(c.mesh))
    got = _drive(engine, requests)
    assert got == want and len(set(map(tuple, want))) == len(want), (got, want)
    k = engine.runner.cache.k
    assert k.sharding.is_equivalent_to(sharding.cache_sharding(mesh, k.shape), k.ndim), k.sharding
    assert k.sharding.spec[1] == ("data", "fsdp"), k.sharding.spec
    print("ok serve_sharded")


def main(hf_dir: str, work_dir: str) -> None:
    assert jax.device_count() == 8, jax.devices()
    c = tiny_config()
    cfg = model_config(c)
    check_train_and_sample(c, cfg)
    check_hf_load(c, hf_dir)
    check_orbax_load(c, cfg, work_dir)
    check_serve_sharded(c, cfg)


if __name__ == "__main__":
    main(*sys.argv[1:3])
