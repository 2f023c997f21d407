"""Run in a subprocess by test_kernels_sharded.py: prints one JSON line of results.

1. On 8 fake CPU devices under a (data, fsdp, tensor) mesh, the shard_map-wrapped kernels (interpret
   mode) on sharded inputs equal the XLA references, gradients included.
2. For a v5p:2x2x1 TPU topology (libtpu on a CPU host), the same functions AOT-compile to Mosaic:
   training attention forward + backward, block decode attention and the LM head.
"""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import topologies
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from efficient_dlm.models import kernel_dispatch
from efficient_dlm.models.attention import cached_attention, xla_attention
from efficient_dlm.models.masks import MaskSpec, dense_mask

AXES = ("data", "fsdp", "tensor", "expert")
SPEC = MaskSpec("clean_context", 16, 128)


def _loss(attend):
    return lambda q, k, v, seg: jnp.sum(attend(q, k, v, seg).astype(jnp.float32) ** 2)


def _training(q, k, v, seg):
    return kernel_dispatch.training_attention(q, k, v, SPEC, seg, "splash")


def _reference(q, k, v, seg):
    return xla_attention(q, k, v, dense_mask(SPEC, q.shape[1], k.shape[1], seg, seg))


def _decode(q, k, v, ck, cv, start, length, positions):
    return kernel_dispatch.decode_attention(q, k, v, ck, cv, start, length, positions, "bidirectional", None, "pallas")


def _allowed(vocab: int) -> np.ndarray:
    allowed = np.ones(vocab, bool)
    allowed[[0, 137]] = False  # banned ids in both vocab shards
    return allowed


def _lm_head(h, w):
    return kernel_dispatch.lm_head_confidence(h, w, temperature=0.7, with_entropy=True, allowed=_allowed(w.shape[1]), backend="pallas")


def cpu_numerics() -> dict[str, float]:
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2, 1), AXES)
    rng = np.random.default_rng(0)
    put = lambda x, spec: jax.device_put(jnp.asarray(x, jnp.float32), NamedSharding(mesh, spec))
    q = put(rng.normal(size=(4, 256, 4, 16)), P(("data", "fsdp"), None, "tensor"))
    k, v = (put(rng.normal(size=(4, 256, 2, 16)), P(("data", "fsdp"), None, "tensor")) for _ in range(2))
    seg = jax.device_put(jnp.asarray(np.sort(rng.integers(0, 3, (4, 256)), 1), jnp.int32), NamedSharding(mesh, P(("data", "fsdp"))))
    errors = {}
    with jax.set_mesh(mesh), jax.default_matmul_precision("highest"):
        got = jax.jit(jax.value_and_grad(_loss(_training), argnums=(0, 1, 2)))(q, k, v, seg)
    with jax.default_matmul_precision("highest"):
        want = jax.value_and_grad(_loss(_reference), argnums=(0, 1, 2))(q, k, v, seg)
    errors["training_loss"] = float(abs(got[0] - want[0]) / abs(want[0]))
    errors["training_grads"] = max(float(jnp.abs(a - b).max()) for a, b in zip(got[1], want[1]))

    batch, width, slots = 4, 4, 24  # one kv head: heads stay replicated over tensor, the cache is not copied
    qd = put(rng.normal(size=(batch, width, 2, 8)), P(("data", "fsdp")))
    kd, vd = (put(rng.normal(size=(batch, width, 1, 8)), P(("data", "fsdp"))) for _ in range(2))
    ck, cv = (put(rng.normal(size=(batch, slots, 1, 8)), P(("data", "fsdp"))) for _ in range(2))
    start, length = jnp.array([0, 3, 5, 2], jnp.int32), jnp.array([24, 3, 20, 11], jnp.int32)
    positions = length[:, None] + jnp.arange(width, dtype=jnp.int32)
    args = (qd, kd, vd, ck, cv, start, length, positions)
    with jax.set_mesh(mesh):
        got = jax.jit(_decode)(*args)
    errors["decode"] = float(jnp.abs(got - cached_attention(*args, "bidirectional")).max())

    hidden = put(rng.normal(size=(4, 3, 16)), P(("data", "fsdp")))
    w_out = put(rng.normal(size=(16, 250)), P(None, "tensor"))  # two vocab shards of 125: partial tiles
    with jax.set_mesh(mesh):
        got = jax.jit(_lm_head)(hidden, w_out)
    want = kernel_dispatch.xla_lm_head_confidence(hidden, w_out, temperature=0.7, with_entropy=True, allowed=_allowed(250))
    errors["lm_head_prob"] = float(jnp.abs(got[0] - want[0]).max())
    errors["lm_head_entropy"] = float(jnp.abs(got[2] - want[2]).max())
    errors["lm_head_token_mismatches"] = int(jnp.sum(got[1] != want[1]))
    return errors


def tpu_aot() -> dict[str, bool]:
    topology = topologies.get_topology_desc("v5p:2x2x1", "tpu")
    mesh = jax.sharding.Mesh(np.array(topology.devices).reshape(1, 2, 2, 1), AXES)
    arg = lambda shape, dtype, spec: jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))
    bf16, batch_heads = jnp.bfloat16, P("fsdp", None, "tensor")
    compiled = {}
    with jax.set_mesh(mesh):
        q, kv = arg((4, 256, 8, 128), bf16, batch_heads), arg((4, 256, 4, 128), bf16, batch_heads)
        seg = arg((4, 256), jnp.int32, P("fsdp"))
        train = jax.jit(jax.grad(_loss(_training), argnums=(0, 1, 2))).lower(q, kv, kv, seg).compile()
        compiled["training_fwd_bwd"] = "tpu_custom_call" in train.as_text()

        qd, kd = arg((4, 32, 8, 128), bf16, batch_heads), arg((4, 32, 4, 128), bf16, batch_heads)
        cache = arg((4, 1024, 4, 128), bf16, batch_heads)
        rows, positions = arg((4,), jnp.int32, P("fsdp")), arg((4, 32), jnp.int32, P("fsdp"))
        decode = jax.jit(_decode).lower(qd, kd, kd, cache, cache, rows, rows, positions).compile()
        compiled["decode"] = "tpu_custom_call" in decode.as_text()

        hidden, w_out = arg((4, 32, 256), bf16, P("fsdp")), arg((256, 151936), bf16, P(None, "tensor"))
        lm_head = jax.jit(_lm_head).lower(hidden, w_out).compile()
        compiled["lm_head"] = "tpu_custom_call" in lm_head.as_text()
    return compiled


if __name__ == "__main__":
    print(json.dumps({"cpu": cpu_numerics(), "tpu": tpu_aot()}))
