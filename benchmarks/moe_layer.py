"""MoE block benchmark: CPU step time of the dispatch modes, and TPU AOT memory / FLOPs at 100B shape.

    python benchmarks/moe_layer.py            # both parts; --part cpu | tpu
    python benchmarks/moe_layer.py --json out.json

CPU part: one MoE block (router, routed experts, shared expert) forward + backward, jitted, on
[8, 512] tokens: dropless (sort + jax.lax.ragged_dot), capacity 1.25 (dense [E, rows*C] batches),
and, for scale, a dense SwiGLU of the same active width (k * moe_intermediate). Median over runs of
wall time and of process CPU time (the latter is steadier on a shared machine).
TPU part: ahead-of-time compilation on a CPU host (libtpu) of the same block at configs/moe_100b.py's
shape (d 4096, 256 experts of 1024, top-8 of 8 groups, shared expert, bf16) for a v5p:2x2x1 topology
(4 chips, expert axis 4: all_to_all dispatch), forward + backward on 4 x 4096 tokens: bytes per chip
(arguments, temporaries) and FLOPs from XLA's analyses, for dropless and capacity modes, and whether
`moe_impl=gmm` lowers to the megablox Mosaic kernel.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5p-8")  # AOT for a TPU topology from a CPU host
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
if os.environ.get("JAX_PLATFORMS") == "cpu":
    os.environ.pop("JAX_PLATFORMS")  # libtpu must load for the topology; computations still run on CPU

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from efficient_dlm.models.config import ModelConfig  # noqa: E402
from efficient_dlm.models.layers import MLP  # noqa: E402
from efficient_dlm.models.moe import MoEBlock, Routing, moe_loss_terms  # noqa: E402
from efficient_dlm.parallel.rules import MESH_AXES, logical_to_spec  # noqa: E402
from efficient_dlm.parallel.sharding import state_shardings  # noqa: E402

CPU_MOE = dict(model_type="glm4_moe", hidden_size=256, num_experts=32, num_experts_per_tok=4, moe_intermediate_size=256,
               shared_expert_intermediate_size=256, router_score="sigmoid", router_groups=4, router_topk_groups=2,
               router_norm_topk=True, router_bias=True)
FLASH_MOE = dict(model_type="glm4_moe", hidden_size=4096, num_experts=256, num_experts_per_tok=8, moe_intermediate_size=1024,
                 shared_expert_intermediate_size=1024, router_score="sigmoid", router_groups=8, router_topk_groups=4,
                 router_norm_topk=True, routed_scaling_factor=2.5, router_bias=True, dtype="bfloat16")


def _loss(graphdef, moe: bool = True):
    """Training's forward + backward; a MoE block routes as in training (capacity mode over the whole
    row when the config sets capacity_factor: every token plays x_t)."""
    def loss(params, rest, x):
        layer = nnx.merge(graphdef, params, rest)
        out = layer(x, Routing(x.shape[1], jnp.ones(x.shape[:2], jnp.float32))) if moe else layer(x)
        y, stats = out if isinstance(out, tuple) else (out, None)
        extra = 0.0 if stats is None else 0.01 * moe_loss_terms(jax.tree.map(lambda a: a[None], stats))["load_balancing"]
        return jnp.mean(jnp.square(y.astype(jnp.float32))) + extra

    return jax.jit(jax.value_and_grad(loss))


def _time(fn, args, runs: int) -> dict[str, float]:
    jax.block_until_ready(fn(*args))  # compile
    walls, cpus = [], []
    for _ in range(runs):
        w, c = time.perf_counter(), time.process_time()
        jax.block_until_ready(fn(*args))
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return {"wall_ms": 1e3 * statistics.median(walls), "cpu_ms": 1e3 * statistics.median(cpus)}


def cpu_part(runs: int) -> dict[str, dict[str, float]]:
    x = jnp.asarray(np.random.RandomState(0).randn(8, 512, CPU_MOE["hidden_size"]), jnp.float32)
    results = {}
    for name, cfg in {
        "dropless (ragged_dot)": ModelConfig(**CPU_MOE),
        "capacity 1.25": ModelConfig(**CPU_MOE, capacity_factor=1.25),
    }.items():
        graphdef, params, rest = nnx.split(MoEBlock(cfg, rngs=nnx.Rngs(params=0)), nnx.Param, ...)
        results[name] = _time(_loss(graphdef), (params, rest, x), runs)
    dense_cfg = ModelConfig(**{**CPU_MOE, "model_type": "qwen3", "num_experts": 0, "first_k_dense": 0})
    width = CPU_MOE["num_experts_per_tok"] * CPU_MOE["moe_intermediate_size"] + CPU_MOE["shared_expert_intermediate_size"]
    graphdef, params, rest = nnx.split(MLP(dense_cfg, width, rngs=nnx.Rngs(params=0)), nnx.Param, ...)
    results["dense SwiGLU, same active width"] = _time(_loss(graphdef, moe=False), (params, rest, x), runs)
    return results


def tpu_part() -> dict[str, dict[str, float]]:
    from jax.experimental import topologies

    topology = topologies.get_topology_desc("v5p:2x2x1", "tpu")
    mesh = jax.sharding.Mesh(np.array(topology.devices).reshape(1, 1, 1, 4), MESH_AXES)
    results = {}
    for name, extra in {"dropless": {}, "capacity 1.25": {"capacity_factor": 1.25}, "dropless, gmm": {"moe_impl": "gmm"}}.items():
        cfg = ModelConfig(**FLASH_MOE, **extra)
        abstract = nnx.eval_shape(lambda: MoEBlock(cfg, rngs=nnx.Rngs(params=0)))
        graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
        with jax.set_mesh(mesh):
            shard = lambda tree: jax.tree.map(  # noqa: E731
                lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, jnp.bfloat16 if leaf.ndim > 1 else leaf.dtype, sharding=s),
                tree, state_shardings(tree, mesh))
            x_spec = logical_to_spec(("batch", "length", "act_embed"), mesh_axes=["expert"])
            x = jax.ShapeDtypeStruct((4, 4096, cfg.hidden_size), jnp.bfloat16, sharding=NamedSharding(mesh, x_spec))
            compiled = _loss(graphdef).lower(shard(params), shard(rest), x).compile()
        memory, cost = compiled.memory_analysis(), compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        results[name] = {
            "argument_GiB_per_chip": memory.argument_size_in_bytes / 2**30,
            "temp_GiB_per_chip": memory.temp_size_in_bytes / 2**30,
            "TFLOPs_per_chip": cost.get("flops", float("nan")) / 1e12,
            "mosaic_kernel": "tpu_custom_call" in compiled.as_text(),
        }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("cpu", "tpu", "both"), default="both")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    out = {}
    if args.part in ("cpu", "both"):
        out["cpu"] = cpu_part(args.runs)
    if args.part in ("tpu", "both"):
        out["tpu_v5p_2x2x1_expert4"] = tpu_part()
    for part, rows in out.items():
        print(f"\n{part}")
        for name, row in rows.items():
            print(f"  {name:<34} " + "  ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
