"""Sharded MoE block forward + gradient vs one device; run by tests/test_moe_sharded.py in a subprocess
with XLA_FLAGS=--xla_force_host_platform_device_count=8. Prints one line per mesh and exits non-zero
on the first mismatch."""
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from efficient_dlm.models.config import ModelConfig
from efficient_dlm.models.moe import MoEBlock, Routing, moe_loss_terms
from efficient_dlm.parallel.rules import MESH_AXES, logical_to_spec
from efficient_dlm.parallel.sharding import state_shardings

jax.config.update("jax_default_matmul_precision", "highest")

CFG = ModelConfig(
    model_type="glm4_moe", hidden_size=32, num_experts=8, num_experts_per_tok=2,
    moe_intermediate_size=16, shared_expert_intermediate_size=16, router_score="sigmoid", router_groups=4,
    router_topk_groups=2, router_norm_topk=True, routed_scaling_factor=2.5, router_bias=True,
)
# (data, fsdp, tensor, expert), capacity_factor and capacity segments (1: x_t only, x_0 dropless;
# 2: x_t and x_0 with a capacity each, clean_routing="capacity")
CASES = [((1, 2, 1, 4), None, 1), ((1, 1, 2, 4), 1.0, 1), ((1, 2, 1, 4), 1.0, 2), ((1, 4, 2, 1), None, 1)]


def loss_and_grads(cfg: ModelConfig, x, segments: int = 1, mesh=None):
    """Loss and gradients of one MoE block (router, experts, shared expert) on x [B, T, D]."""
    block = nnx.jit(lambda: MoEBlock(cfg, rngs=nnx.Rngs(params=0)))()
    block.router.bias[...] = jnp.linspace(0.0, 0.3, cfg.num_experts)  # the selection bias must matter
    graphdef, params, rest = nnx.split(block, nnx.Param, ...)
    params = jax.tree.map(lambda p: 8.0 * p, params)  # outputs of order 1: the loss is not all aux loss

    # Capacity cases route as training does: capacity on the first half (x_t), the second half dropless
    # (segments 1) or with a capacity of its own (segments 2).
    routing = Routing(x.shape[1] // 2 if cfg.capacity_factor else None, jnp.ones(x.shape[:2], jnp.float32), segments)

    def loss_fn(params, rest, x):
        y, stats = nnx.merge(graphdef, params, rest)(x, routing)
        aux = jax.tree.map(lambda a: a[None], stats)  # one layer
        return jnp.mean(jnp.square(y)) + 0.01 * moe_loss_terms(aux)["load_balancing"]

    step = jax.jit(jax.value_and_grad(loss_fn))
    if mesh is None:
        return step(params, rest, x), ""
    with jax.set_mesh(mesh):
        params = jax.device_put(params, state_shardings(params, mesh))
        active = [a for a, n in mesh.shape.items() if n > 1]
        x = jax.device_put(x, NamedSharding(mesh, logical_to_spec(("batch", "length", "act_embed"), mesh_axes=active)))
        jaxpr = str(step.trace(params, rest, x).jaxpr)
        return step(params, rest, x), jaxpr


def main() -> int:
    assert len(jax.devices()) == 8, jax.devices()
    x = jnp.asarray(np.random.RandomState(0).randn(8, 12, CFG.hidden_size), jnp.float32)
    refs = {(cap, seg): loss_and_grads(CFG.replace(capacity_factor=cap), x, seg)[0] for _, cap, seg in CASES}
    for shape, cap, seg in CASES:
        cfg = CFG.replace(capacity_factor=cap)
        t0 = time.perf_counter()
        ref_loss, ref_grads = refs[cap, seg]
        mesh = jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 4)
        (loss, grads), jaxpr = loss_and_grads(cfg, x, seg, mesh)
        loss_err = abs(float(loss) - float(ref_loss)) / abs(float(ref_loss))
        grad_err = max(
            float(jnp.max(jnp.abs(g - r)) / (jnp.max(jnp.abs(r)) + 1e-12))
            for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads))
        )
        expert_parallel = "all_to_all" in jaxpr
        print(f"mesh={shape} capacity={cap} segments={seg} loss={float(loss):.6f} loss_err={loss_err:.2e} "
              f"grad_rel_err={grad_err:.2e} all_to_all={expert_parallel} ({time.perf_counter() - t0:.1f}s)")
        if loss_err > 1e-5 or grad_err > 1e-5 or expert_parallel != (shape[3] > 1):
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
