"""Run by test_train.py in a subprocess with 8 fake CPU devices: sharded training equals unsharded.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/train_multidevice.py RUN_DIR
"""
import os
import pathlib
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, PartitionSpec  # noqa: E402

from efficient_dlm.train.loop import train  # noqa: E402
from tests.test_train import tiny_config  # noqa: E402


def main(tmp: pathlib.Path) -> None:
    assert jax.device_count() == 8, jax.devices()
    config = tiny_config(tmp, "single", steps=2, save_every=2, eval_every=0)
    config.data.eval_files = ""
    config.diffusion.block_size_schedule = ""
    config.model.num_kv_heads = 2  # kv heads split over tensor=2
    single = train(config)
    mesh = Mesh(np.array(jax.devices()).reshape(2, 2, 2, 1), ("data", "fsdp", "tensor", "expert"))
    config.run_dir = str(tmp / "sharded")
    sharded = train(config, mesh=mesh)
    for a, b in zip(single.history, sharded.history):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(single.state.params), jax.tree.leaves(sharded.state.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    params, mu = sharded.state.params, sharded.state.opt_state.inner_state[1][0].mu
    assert params["embed_tokens"].sharding.spec == PartitionSpec("tensor", "fsdp"), params["embed_tokens"].sharding
    for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(mu)):
        assert m.sharding == p.sharding, (m.sharding, p.sharding)  # AdamW moments sharded like their params
    config.train.steps = 3
    resumed = train(config, mesh=mesh)  # restores step 2 into the sharded layout
    assert [h["step"] for h in resumed.history] == [3]
    assert jax.tree.leaves(resumed.state.params)[0].sharding == jax.tree.leaves(params)[0].sharding
    print("OK")


if __name__ == "__main__":
    main(pathlib.Path(sys.argv[1]))
