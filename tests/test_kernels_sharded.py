"""Kernels under a mesh: sharded numerics on 8 fake CPU devices and TPU AOT lowering, one subprocess."""
import json
import subprocess
import sys
from pathlib import Path

from tests.devices import subprocess_env

ROOT = Path(__file__).resolve().parents[1]


def test_sharded_kernels_match_xla_and_compile_for_tpu():
    env = subprocess_env(
        devices=8,
        TPU_ACCELERATOR_TYPE="v5p-8",
        TPU_WORKER_HOSTNAMES="localhost",
        ALLOW_MULTIPLE_LIBTPU_LOAD="1",  # AOT only: several test processes may load libtpu at once
    )
    del env["JAX_PLATFORMS"]  # the script picks its platforms itself (CPU devices, a TPU topology for AOT)
    proc = subprocess.run(
        [sys.executable, "-m", "tests.kernels_multidevice"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    cpu = result["cpu"]
    assert cpu["training_loss"] <= 1e-5 and cpu["training_grads"] <= 1e-4, cpu
    assert cpu["decode"] <= 1e-5, cpu
    assert cpu["lm_head_prob"] <= 1e-5 and cpu["lm_head_entropy"] <= 1e-5, cpu
    assert cpu["lm_head_token_mismatches"] == 0, cpu
    assert result["tpu"] == {"training_fwd_bwd": True, "decode": True, "lm_head": True}
