"""Ahead-of-time compilation of the real training step and sampler for a TPU topology, on any host.

libtpu can describe a TPU slice it is not running on (`jax.experimental.topologies`); jit-lowering a
function with abstract, sharded inputs (ShapeDtypeStruct, nothing allocated) over a mesh of those
devices and compiling it gives XLA's own per-chip memory plan and FLOP count. That is the proof that a
configuration fits before anyone pays for a pod.

Memory per chip (XLA's CompiledMemoryStats): arguments + outputs - aliased (donated state is updated
in place) + temporaries + generated code. FLOPs from `cost_analysis()` are per chip.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from ml_collections import ConfigDict

from efficient_dlm.config import model_config
from efficient_dlm.models.config import ModelConfig
from efficient_dlm.parallel import mesh as mesh_lib
from efficient_dlm.parallel import sharding
from efficient_dlm.parallel.topology import GIB, TpuSlice

# libtpu reads these when it is loaded; on a CPU host they make it describe (not open) a TPU.
# ALLOW_MULTIPLE_LIBTPU_LOAD lets several compile-only processes share the host.
_LIBTPU_ENV = {"TPU_WORKER_HOSTNAMES": "localhost", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}


def tpu_devices(target: TpuSlice) -> list:
    """Compile-only devices of `target` (all slices). Sets the libtpu environment if it is unset."""
    from jax.experimental import topologies

    os.environ.setdefault("TPU_ACCELERATOR_TYPE", target.accelerator_type)
    for key, value in _LIBTPU_ENV.items():
        os.environ.setdefault(key, value)
    kwargs = {"num_slices": target.num_slices} if target.num_slices > 1 else {}
    topo = topologies.get_topology_desc(target.topology, "tpu", chip_config_name=target.generation.chip_config, **kwargs)
    return list(topo.devices)


@dataclasses.dataclass
class Program:
    """A jittable function with abstract, sharded arguments: what gets lowered and compiled."""

    name: str
    fn: Callable
    args: tuple
    arg_names: tuple[str, ...]
    out_shardings: Any = None
    donate_argnums: tuple[int, ...] = ()
    notes: dict[str, Any] = dataclasses.field(default_factory=dict)

    def compile(self, mesh: Mesh, rules=None):
        jitted = jax.jit(self.fn, out_shardings=self.out_shardings, donate_argnums=self.donate_argnums)
        with mesh_lib.use(mesh, rules):
            return jitted.lower(*self.args).compile()


def target_model_config(config: ConfigDict) -> ModelConfig:
    """The model config the recipe trains, as it runs on TPU: 'auto' attention means the TPU kernels
    there (this host is a CPU, where 'auto' would resolve to the XLA reference)."""
    from efficient_dlm.train.model_init import trained_config

    cfg = trained_config(config)
    return cfg.replace(attention_backend="splash") if cfg.attention_backend == "auto" else cfg


def _batch_args(mesh: Mesh, batch: int, length: int) -> dict[str, jax.ShapeDtypeStruct]:
    shape = (batch, length)
    s = sharding.batch_sharding(mesh, 2, shape)
    return {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=s) for k in ("tokens", "segment_ids", "positions")}


def train_program(config: ConfigDict, mesh: Mesh) -> Program:
    """The training step of `edlm train` (efficient_dlm.train.step) with abstract state and batch."""
    from efficient_dlm.train.optim import make_optimizer
    from efficient_dlm.train.state import abstract_state, state_shardings
    from efficient_dlm.train.step import make_train_step

    cfg = target_model_config(config)
    config = config.copy_and_resolve_references()
    if config.diffusion.objective != "ar" and config.diffusion.mask_token == "append":
        config.diffusion.valid_vocab_size = cfg.mask_token_id + 1  # as the trainer records it
    tx = make_optimizer(config.train)
    shardings = state_shardings(cfg, tx, mesh)
    state = sharding.abstract_arrays(abstract_state(cfg, tx, config.seed), shardings)
    batch, length = config.train.batch_size, config.data.seq_len
    key = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=NamedSharding(mesh, PartitionSpec()))
    return Program(
        "train_step",
        make_train_step(config, cfg, tx=tx, jit=False),
        (state, _batch_args(mesh, batch, length), key),
        ("state", "batch", "rng"),
        out_shardings=(shardings, None),
        donate_argnums=(0,),
        notes=dict(
            objective=config.diffusion.objective, batch=batch, seq_len=length, grad_accum=config.train.grad_accum,
            attention=cfg.attention_backend, remat=cfg.remat_policy, param_dtype=cfg.param_dtype, dtype=cfg.dtype,
        ),
    )


def sample_program(config: ConfigDict, mesh: Mesh, batch: int = 8, context: int | None = None) -> Program:
    """One denoising step of the sampler: a block of queries against a full static KV cache, the
    block's logits, and the cache write of its keys/values (the inner loop body of `generate`)."""
    from flax import nnx

    from efficient_dlm.models.cache import KVCache
    from efficient_dlm.models.decoder import abstract_model

    cfg = target_model_config(config)
    block = config.sample.block_size
    slots = context or config.data.seq_len
    graphdef, params = nnx.split(abstract_model(cfg), nnx.Param)
    p_sh = sharding.state_shardings(params, mesh)
    cache = jax.eval_shape(lambda: KVCache.empty(cfg, batch, slots))
    kv = sharding.cache_sharding(mesh, cache.k.shape)
    rows = sharding.named(mesh, ("cache_batch",), (batch,))
    cache_sh = KVCache(kv, kv, rows, rows)

    def step(p, cache, tokens, positions):
        model = nnx.merge(graphdef, p)
        h, (k, v) = model.decode(tokens, positions, cache, attention="bidirectional", block_size=block)
        return model.logits(h), cache.write(k, v, cache.length[0])

    chunk = sharding.batch_sharding(mesh, 2, (batch, block))
    ids = jax.ShapeDtypeStruct((batch, block), jnp.int32, sharding=chunk)
    return Program(
        "sample_step",
        step,
        (sharding.abstract_arrays(params, p_sh), sharding.abstract_arrays(cache, cache_sh), ids, ids),
        ("params", "cache", "tokens", "positions"),
        out_shardings=(None, cache_sh),
        donate_argnums=(1,),
        notes=dict(batch=batch, cache_slots=slots, block=block, attention=cfg.attention_backend),
    )


PROGRAMS: dict[str, Callable[..., Program]] = {"train": train_program, "sample": sample_program}


def advice(program: Program, config: ConfigDict, state_fraction: float | None = None) -> str:
    """What to change when `program` does not fit; `state_fraction`: arguments / HBM, when known."""
    tips = []
    if state_fraction is None or state_fraction > 0.4:
        tips.append("shard over more chips (larger mesh.fsdp, mesh.tensor, or a bigger topology)")
    if program.name == "train_step":
        if config.model.remat_policy != "full":
            tips.append("--config.model.remat_policy=full")
        tips.append(f"a smaller per-chip batch (train.batch_size below {config.train.batch_size}, or more train.grad_accum)")
    else:
        tips.append(f"fewer rows or cache slots (--sample_batch below {program.notes['batch']}, --sample_context)")
    return "; ".join(tips)


def compile_or_explain(program: Program, mesh: Mesh, rules, config: ConfigDict, target: TpuSlice):
    """Compiles; an out-of-memory compile error becomes one line saying what to change."""
    from efficient_dlm.cli import UserError

    try:
        return program.compile(mesh, rules)
    except jax.errors.JaxRuntimeError as err:
        text = str(err)
        if "RESOURCE_EXHAUSTED" not in text and "out of memory" not in text.lower():
            raise
        first = next((line for line in text.splitlines() if "memory" in line.lower()), text.splitlines()[0])
        raise UserError(
            f"{program.name} does not fit on {target.describe()} with mesh {mesh_lib.describe(mesh)}: "
            f"{first.strip().rstrip('.')}. Try: {advice(program, config)}"
        ) from None


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", 0.0)) if cost else 0.0


def step_flops(name: str, config: ConfigDict, mesh: Mesh, rules, **options) -> float:
    """FLOPs per chip of program `name` at the config's full depth.

    XLA's cost analysis counts the body of a loop once, so the scanned program under-reports by the
    depth. We compile the same program unrolled with one and two repeating layers (after any leading
    dense layers of an MoE model; cheap) and extrapolate linearly,
    F(L) = F(d) + (L - d) * (F(d + 1) - F(d)); tests/aot_checks.py finds it within 1e-4 of the count
    for the whole program unrolled.
    """
    first = config.model.get("first_k_dense", 0) or 0
    counts = []
    for depth in (first + 1, first + 2):
        variant = config.copy_and_resolve_references()
        variant.model.num_layers = depth
        variant.model.scan_layers = False
        counts.append(_flops(PROGRAMS[name](variant, mesh, **options).compile(mesh, rules)))
    return counts[0] + (config.model.num_layers - first - 1) * (counts[1] - counts[0])


def report(compiled, target: TpuSlice, program: Program, flops_per_chip: float, top: int = 6) -> dict[str, Any]:
    """Per-chip memory (bytes) against HBM, FLOPs, and the largest argument tensors' shardings."""
    mem = compiled.memory_analysis()
    parts = dict(
        arguments=mem.argument_size_in_bytes,
        outputs=mem.output_size_in_bytes,
        aliased=mem.alias_size_in_bytes,
        temporaries=mem.temp_size_in_bytes,
        code=mem.generated_code_size_in_bytes,
    )
    total = parts["arguments"] + parts["outputs"] - parts["aliased"] + parts["temporaries"] + parts["code"]
    return dict(
        target=target.describe(),
        chips=target.total_chips,
        hbm_bytes=target.hbm_bytes,
        memory=dict(parts, total=total),
        hbm_fraction=total / target.hbm_bytes,
        flops_per_chip=flops_per_chip,
        flops_total=flops_per_chip * target.total_chips,
        largest=sharding.describe_tree(dict(zip(program.arg_names, program.args)), top),
    )


def format_report(name: str, result: dict[str, Any], notes: dict[str, Any] | None = None) -> str:
    mem = result["memory"]
    lines = [f"== {name} on {result['target']}"]
    if notes:
        lines.append("   " + ", ".join(f"{k}={v}" for k, v in notes.items()))
    for key in ("arguments", "outputs", "aliased", "temporaries", "code", "total"):
        lines.append(f"   {key:<12} {mem[key] / GIB:9.3f} GiB per chip")
    lines.append(f"   HBM          {result['hbm_bytes'] / GIB:9.3f} GiB per chip -> {result['hbm_fraction']:.1%} used")
    lines.append(f"   FLOPs        {result['flops_per_chip']:.3e} per chip, {result['flops_total']:.3e} per step")
    lines.append("   largest inputs: global shape, dtype, sharding, MiB per chip")
    for row in result["largest"]:
        lines.append(
            f"     {row['path']:<44} {str(row['shape']):<22} {row['dtype']:<9} {row['spec']:<34} {row['device_bytes'] / 2**20:9.1f}"
        )
    return "\n".join(lines)
