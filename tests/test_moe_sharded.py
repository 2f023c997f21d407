"""Expert parallelism on 8 fake CPU devices: the sharded MoE block's loss and gradients equal one device's.

Meshes (data, fsdp, tensor, expert): dropless all_to_all over expert=4 with fsdp=2; capacity mode
(x_t half) over expert=4 with the experts' mlp split over tensor=2; both halves with a capacity each
(clean_routing="capacity") over expert=4 with fsdp=2; and no expert axis (experts sharded over
fsdp/tensor by the rules, XLA partitions the grouped matmul). One subprocess for all four."""
import os
import subprocess
import sys

from tests.devices import subprocess_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_sharded_moe_forward_and_gradient_equal_single_device():
    env = subprocess_env(devices=8)
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "tests", "moe_sharded_check.py")],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("mesh=")]
    assert len(lines) == 4, proc.stdout
