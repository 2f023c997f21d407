"""Scale-out: rules, mesh config, TPU names, multi-host switches, launch plans (in-process, fast) and
the sharded numerics and TPU AOT compilation (two subprocesses: 8 fake CPU devices; libtpu)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
from jax.sharding import PartitionSpec as P

from efficient_dlm.config import base_config, validate
from efficient_dlm.parallel import distributed, mesh as mesh_lib, rules, topology

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = {"data": 1, "fsdp": 4, "tensor": 4, "expert": 2}


def _run(args, **env):
    full_env = {**os.environ, "PYTHONPATH": REPO, **env}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=full_env, capture_output=True, text=True, timeout=900)


# ---- rules -----------------------------------------------------------------------------------


def test_logical_to_spec_drops_axes_that_do_not_divide_or_are_taken():
    # kv_heads=2 cannot split over tensor=4: replicated there; heads=8 can.
    assert rules.logical_to_spec(("embed", "kv_heads", "head_dim"), mesh_axes=SIZES, shape=(64, 2, 16)) == P("fsdp", None, None)
    assert rules.logical_to_spec(("embed", "heads", "head_dim"), mesh_axes=SIZES, shape=(64, 8, 16)) == P("fsdp", "tensor", None)
    # batch -> (data, fsdp, expert): data has size 1 (dropped); 8 rows take fsdp (4) then expert (2).
    assert rules.logical_to_spec(("batch", "length"), mesh_axes=SIZES, shape=(8, 16)) == P(("fsdp", "expert"), None)
    # 4 rows: fsdp divides, fsdp*expert does not.
    assert rules.logical_to_spec(("batch", "length"), mesh_axes=SIZES, shape=(4, 16)) == P("fsdp", None)
    # A mesh axis is used once per array: the first dimension claiming it wins.
    table = (("a", "fsdp"), ("b", ("fsdp", "tensor")))
    assert rules.logical_to_spec(("a", "b"), rules=table, mesh_axes=SIZES, shape=(4, 16)) == P("fsdp", "tensor")


def test_unknown_logical_axis_is_an_error():
    with pytest.raises(ValueError, match="logical axis 'embd' has no sharding rule"):
        rules.logical_to_spec(("embd",))


def test_rules_from_config_override_the_table():
    c = base_config()
    c.mesh.rules.embed = "fsdp,tensor"
    c.mesh.rules.vocab = ""
    with rules.axis_rules(mesh_lib.config_rules(c.mesh)):
        assert rules.logical_to_spec(("vocab", "embed"), mesh_axes=SIZES, shape=(512, 64)) == P(None, ("fsdp", "tensor"))
    assert rules.logical_to_spec(("vocab", "embed"), mesh_axes=SIZES, shape=(512, 64)) == P("tensor", "fsdp")


# ---- mesh config -----------------------------------------------------------------------------


def test_mesh_shapes_fill_the_free_axis_per_slice():
    c = base_config()
    c.mesh.tensor = 4
    assert mesh_lib.mesh_shapes(c.mesh, 32) == ((1, 8, 4, 1), (1, 1, 1, 1))
    # 2 slices: dcn_data=-1 takes the slices, the ICI sizes split each slice's 16 devices.
    assert mesh_lib.mesh_shapes(c.mesh, 32, slices=2) == ((1, 4, 4, 1), (2, 1, 1, 1))
    c.mesh.tensor = 3
    with pytest.raises(ValueError, match="32 devices cannot be split with fixed axes of product 3"):
        mesh_lib.mesh_shapes(c.mesh, 32)
    c.mesh.tensor, c.mesh.fsdp = 2, 2
    with pytest.raises(ValueError, match=r"multiply to 4, but there are 32 devices"):
        mesh_lib.mesh_shapes(c.mesh, 32)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("tensor", -1, "at most one of mesh.fsdp, mesh.tensor may be -1"),
        ("expert", 0, "mesh.expert must be a positive integer or -1, got 0"),
        ("rules.embed", "fsdp,model", "mesh.rules.embed: unknown mesh axis 'model'"),
    ],
)
def test_bad_mesh_config_fails_with_one_line(key, value, message):
    c = base_config()
    *in_rules, name = key.split(".")
    (c.mesh.rules if in_rules else c.mesh)[name] = value
    with pytest.raises(ValueError, match=message):
        validate(c)


# ---- TPU names -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, topo, chips, hosts, accelerator",
    [
        ("v5p-8", "v5p:2x2x1", 4, 1, "v5p-8"),
        ("v5p-64", "v5p:2x4x4", 32, 8, "v5p-64"),
        ("v5p-256", "v5p:4x4x8", 128, 32, "v5p-256"),  # suffix counts TensorCores: 2 per chip
        ("v5p-512", "v5p:4x8x8", 256, 64, "v5p-512"),
        ("v4-128", "v4:4x4x4", 64, 16, "v4-128"),
        ("v5e-256", "v5e:16x16", 256, 64, "v5litepod-256"),  # suffix counts chips
        ("v5litepod-8", "v5e:2x4", 8, 1, "v5litepod-8"),
        ("v6e-64", "v6e:8x8", 64, 16, "v6e-64"),
        ("v5p:4x4x12", "v5p:4x4x12", 192, 48, "v5p-384"),
    ],
)
def test_tpu_names(name, topo, chips, hosts, accelerator):
    target = topology.parse(name)
    assert (target.topology, target.chips, target.hosts, target.accelerator_type) == (topo, chips, hosts, accelerator)


@pytest.mark.parametrize(
    "name, message",
    [("v5p-9", "must be even"), ("v5p-384", "no default topology for 192"), ("v7x-8", "unknown TPU type"), ("v5p", "cannot parse")],
)
def test_bad_tpu_names(name, message):
    with pytest.raises(ValueError, match=message):
        topology.parse(name)


# ---- multi-host switches -----------------------------------------------------------------------


def test_distributed_is_requested_only_by_the_environment():
    assert not distributed.requested({})
    assert not distributed.requested({"TPU_WORKER_HOSTNAMES": "localhost"})
    assert distributed.requested({"TPU_WORKER_HOSTNAMES": "10.0.0.2,10.0.0.3"})
    assert distributed.requested({"EDLM_DISTRIBUTED": "1"})
    assert distributed.requested({"JAX_COORDINATOR_ADDRESS": "10.0.0.2:1234"})
    assert not distributed.requested({"EDLM_DISTRIBUTED": "0", "JAX_COORDINATOR_ADDRESS": "10.0.0.2:1234"})
    with pytest.raises(ValueError, match="EDLM_DISTRIBUTED='maybe': use 1 or 0"):
        distributed.requested({"EDLM_DISTRIBUTED": "maybe"})


# ---- launch plans ------------------------------------------------------------------------------


def test_tpu_vm_dry_run_for_v5p_256_reaches_all_32_workers():
    result = _run(["launch/tpu_vm.py", "all", "--dry-run", "--name=bd8b", "--tpu=v5p-256", "--zone=us-east5-a",
                   "--", "--config=configs/qwen3_8b.py", "--config.train.steps=10"])
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "# 32 workers x 4 chips; every worker runs the same program" in lines
    commands = [line for line in lines if not line.startswith("#")]
    create, archive, scp, setup, start, follow, check, delete = commands
    assert create.startswith("gcloud compute tpus tpu-vm create bd8b") and "--accelerator-type=v5p-256" in create
    assert "--version=v2-alpha-tpuv5" in create
    for command in (scp, setup, start, check):
        assert "--worker=all" in command, command
    assert "--worker=0" in follow and "tail" in follow
    assert "EDLM_DISTRIBUTED=1 EDLM_EXPECTED_PROCESSES=32 python3 -m efficient_dlm.cli train" in start
    assert "--config=configs/qwen3_8b.py --config.train.steps=10" in start
    assert delete.startswith("gcloud compute tpus tpu-vm delete bd8b --quiet")


def test_xpk_dry_run_for_two_v5p_256_slices():
    result = _run(["launch/xpk.py", "all", "--dry-run", "--name=moe", "--tpu=v5p-256", "--num_slices=2", "--zone=z",
                   "--cluster=c", "--image=gcr.io/p/edlm:1", "--", "--config=configs/tiny.py"])
    assert result.returncode == 0, result.stderr
    create = next(line for line in result.stdout.splitlines() if line.startswith("xpk workload create"))
    assert "--tpu-type=v5p-256" in create and "--num-slices=2" in create and "--docker-image=gcr.io/p/edlm:1" in create
    assert "EDLM_EXPECTED_PROCESSES=64" in create


def test_launch_rejects_unknown_tpu():
    result = _run(["launch/tpu_vm.py", "create", "--dry-run", "--name=x", "--tpu=v9-8", "--zone=z"])
    assert result.returncode == 2 and "unknown TPU type 'v9-8'" in result.stderr


# ---- subprocesses: sharded numerics on 8 CPU devices; AOT through libtpu -------------------------


def test_sharded_numerics_on_8_cpu_devices(tmp_path):
    from tests.hf_factory import make_hf_model

    make_hf_model("qwen2_bias", str(tmp_path / "hf"), vocab_size=128)
    result = _run(["tests/multidevice_checks.py", str(tmp_path / "hf"), str(tmp_path / "work")])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    for check in ("train_and_sample", "hf_load", "orbax_load", "serve_sharded"):
        assert f"ok {check}" in result.stdout, result.stdout


@pytest.mark.skipif(sys.platform != "linux", reason="libtpu ships for Linux only (setup.py installs it there)")
def test_aot_tiny_config_on_tpu_topology(tmp_path):
    result = _run(["tests/aot_checks.py", str(tmp_path)])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    for check in ("cli_report", "flops_extrapolation", "does_not_fit"):
        assert f"ok {check}" in result.stdout, result.stdout


def test_aot_advice_names_capacity_routing_for_dropless_expert_parallelism():
    """The one line `edlm aot` prints when a program does not fit names the fix that fits the 100B MoE."""
    from efficient_dlm.config import sibling_recipe, typed
    from efficient_dlm.aot.compiler import Program, advice

    config = sibling_recipe(os.path.join(os.path.dirname(__file__), "..", "configs", "moe_100b.py"), "moe_100b")
    step = Program("train_step", None, (), (), notes={})
    config.mesh.expert = 16
    assert "capacity" not in advice(step, typed(config))  # the recipe already routes both halves with capacity
    config.model.capacity_factor = None
    assert "--config.model.capacity_factor=1.25" in advice(step, typed(config))
    config.model.clean_routing = "dropless"
    assert "--config.model.clean_routing=capacity" in advice(step, typed(config))
    config.mesh.expert = 1  # no expert axis: nothing is padded to the worst case
    assert "capacity" not in advice(step, typed(config))
