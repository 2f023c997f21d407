"""Export of a model sharded over 8 fake CPU devices (run by tests/test_hf_export.py in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8): `python export_sharded_check.py SRC OUT` loads the
HF directory SRC sharded over a (data, fsdp, tensor, expert) mesh, checks that parameters really are
split across devices, and exports to OUT (the caller compares OUT's tensors with SRC's)."""
import sys

import jax
from flax import nnx

import efficient_dlm as edlm
from efficient_dlm.models.decoder import MODEL_STATE
from efficient_dlm.parallel.rules import MESH_AXES


def main(src: str, out: str) -> int:
    assert len(jax.devices()) == 8, jax.devices()
    mesh = jax.make_mesh((1, 2, 1, 4), MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 4)
    model = edlm.from_hf(src, mesh=mesh)
    leaves = [leaf[...] for _, leaf in nnx.to_flat_state(nnx.state(model, MODEL_STATE))]
    split = [x for x in leaves if not x.sharding.is_fully_replicated]
    assert split, "no parameter is sharded"
    edlm.to_hf(model, out, tokenizer_dir=src)
    print(f"exported {len(leaves)} parameters, {len(split)} of them sharded over {mesh.shape}")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
