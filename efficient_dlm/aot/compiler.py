"""Ahead-of-time compilation of the real training step, sampler and serving step for a TPU topology, on any host.

libtpu can describe a TPU slice it is not running on (`jax.experimental.topologies`); jit-lowering a
function with abstract, sharded inputs (ShapeDtypeStruct, nothing allocated) over a mesh of those
devices and compiling it gives XLA's own per-chip memory plan and FLOP count. That is the proof that a
configuration fits before anyone pays for a pod.

Memory per chip (XLA's CompiledMemoryStats): arguments + outputs - aliased (donated state is updated
in place) + temporaries + generated code. FLOPs from `cost_analysis()` are per chip.

It sits at the CLI level (it builds the programs of train/ and sample/ from the typed config); the
mesh, rules and sharding it compiles over are parallel/'s.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from efficient_dlm.config import Config, override, to_plain
from efficient_dlm.diffusion.spec import spec_from_recipe, with_spec
from efficient_dlm.errors import UserError
from efficient_dlm.models.config import ModelConfig
from efficient_dlm.models.decoder import abstract_model
from efficient_dlm.models.quantize import Quantization, quantize_model
from efficient_dlm.parallel import mesh as mesh_lib
from efficient_dlm.parallel import sharding
from efficient_dlm.parallel.topology import GIB, TpuSlice
from efficient_dlm.models.cache import KVCache
from efficient_dlm.sample.api import prepare
from efficient_dlm.sample.config import quantization_kwargs
from efficient_dlm.serve import slots as slots_lib
from efficient_dlm.serve import speculative as spec_lib
from efficient_dlm.serve.engine import EngineConfig, engine_layout
from efficient_dlm.serve.step_program import ar_step, diffusion_step
from efficient_dlm.train.model_init import trained_config
from efficient_dlm.train.optim import make_optimizer
from efficient_dlm.train.state import abstract_state, state_shardings
from efficient_dlm.train.step import make_train_step

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


def target_model_config(config: Config) -> ModelConfig:
    """The model config the recipe trains, as it runs on TPU: 'auto' attention means the TPU kernels
    there (this host is a CPU, where 'auto' would resolve to the XLA reference)."""
    cfg = trained_config(config)
    return cfg.replace(attention_backend="splash") if cfg.attention_backend == "auto" else cfg


def _batch_args(mesh: Mesh, batch: int, length: int) -> dict[str, jax.ShapeDtypeStruct]:
    shape = (batch, length)
    s = sharding.batch_sharding(mesh, 2, shape)
    return {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=s) for k in ("tokens", "segment_ids", "positions")}


def train_program(config: Config, mesh: Mesh) -> Program:
    """The training step of `edlm train` (efficient_dlm.train.step) with abstract state and batch."""
    cfg = target_model_config(config)
    diffusion, train = config.diffusion, config.train
    if diffusion.objective != "ar" and diffusion.mask_token == "append":
        diffusion = diffusion.replace(valid_vocab_size=cfg.mask_token_id + 1)  # as the trainer records it
    tx = make_optimizer(train)
    lora = config.lora.adapters()  # LoRA: adapters trained, the base frozen (TrainState.frozen)
    shardings = state_shardings(cfg, tx, mesh, lora)
    state = sharding.abstract_arrays(abstract_state(cfg, tx, config.seed, lora), shardings)
    batch, length = config.train.batch_size, config.data.seq_len
    key = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=NamedSharding(mesh, PartitionSpec()))
    return Program(
        "train_step",
        make_train_step(diffusion, train, cfg, lora=lora, tx=tx, jit=False),
        (state, _batch_args(mesh, batch, length), key),
        ("state", "batch", "rng"),
        out_shardings=(shardings, None),
        donate_argnums=(0,),
        notes=dict(
            objective=config.diffusion.objective, batch=batch, seq_len=length, grad_accum=config.train.grad_accum,
            attention=cfg.attention_backend, remat=cfg.remat_policy, param_dtype=cfg.param_dtype, dtype=cfg.dtype,
            **({} if lora is None else dict(lora_rank=lora.rank, lora_targets=",".join(lora.targets),
                                            lora_base_dtype=lora.base_dtype or cfg.param_dtype)),
        ),
    )


def sample_program(config: Config, mesh: Mesh, batch: int = 8, prompt_len: int | None = None) -> Program:
    """The sampler of `edlm sample` (efficient_dlm.sample: the whole generation program, block loop,
    denoising steps and exact KV cache, or the AR baseline per sample.strategy) for `batch` prompts of
    `prompt_len` tokens (default data.seq_len / 2) and sample.max_new_tokens, weights and inputs sharded."""
    cfg = target_model_config(config)
    prompt_len = prompt_len or config.data.seq_len // 2
    model = with_spec(abstract_model(cfg), spec_from_recipe(to_plain(config), cfg))  # as the trainer records it
    model = quantize_model(model, **quantization_kwargs(config.sample))  # sample.quantize / --quantize: abstract too
    kwargs = config.sample.generate_kwargs()
    prep = prepare(model, np.zeros((batch, prompt_len), np.int32), verifier=_teacher_verifier(cfg, kwargs), **kwargs)
    speculative = "draft_steps" in prep.shapes  # what prepare resolved (self_speculative included)
    if speculative:
        draft_graphdef, verify_graphdef, plan, draft_state, verify_state, inputs, knobs = prep.args
        state = (draft_state, verify_state)
        run = lambda state, inputs, knobs: prep.program(draft_graphdef, verify_graphdef, plan, *state, inputs, knobs)  # noqa: E731
        notes = dict(strategy="speculative", max_new_tokens=plan.draft.max_new_tokens)
    else:
        graphdef, plan, state, inputs, knobs = prep.args
        run = lambda state, inputs, knobs: prep.program(graphdef, plan, state, inputs, knobs)  # noqa: E731
        notes = dict(strategy=plan.strategy, max_new_tokens=plan.max_new_tokens)
    replicated = NamedSharding(mesh, PartitionSpec())
    inputs = {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding.named(mesh, ("batch",) + (None,) * (v.ndim - 1), v.shape))
        for k, v in inputs.items()
    }
    knobs = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=replicated) for k, v in knobs.items()}
    shard = lambda s: sharding.abstract_arrays(s, sharding.state_shardings(s, mesh))  # noqa: E731
    state = tuple(None if s is None else shard(s) for s in state) if speculative else shard(state)
    return Program(
        "sampler", run, (state, inputs, knobs), ("params", "inputs", "knobs"),
        notes=dict(**notes, prompt_len=prompt_len, **prep.shapes, attention=cfg.attention_backend,
                   quantization=Quantization.of(model.config).describe()),
    )


def _abstract_cache(cfg: ModelConfig, mesh: Mesh, slots: int, size: int) -> KVCache:
    """A serving KV cache as ShapeDtypeStructs: slots over the data axes, kv heads by the rules."""
    rope = np.ones((slots,), np.int32) if cfg.rope_type == "dynamic" else None
    cache = jax.eval_shape(lambda: KVCache.empty(cfg, slots, size, rope_length=rope))
    kv = sharding.cache_sharding(mesh, cache.k.shape)
    rows = lambda x: None if x is None else jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding.named(mesh, ("batch",), x.shape))  # noqa: E731
    return cache.replace(k=jax.ShapeDtypeStruct(cache.k.shape, cache.k.dtype, sharding=kv),
                         v=jax.ShapeDtypeStruct(cache.v.shape, cache.v.dtype, sharding=kv),
                         start=rows(cache.start), length=rows(cache.length), rope_length=rows(cache.rope_length))


def _teacher_verifier(cfg: ModelConfig, kwargs: dict):
    """sample.strategy "speculative": the dLM drafts and an AR teacher of the same architecture verifies,
    both models' weights in the program (the worst case); None otherwise (a spec never records
    "speculative"; its self_speculative verifies with the dLM's own weights: one set)."""
    return abstract_model(dataclasses.replace(cfg, mask_token_id=None)) if kwargs["strategy"] == "speculative" else None


def serve_program(config: Config, mesh: Mesh, slots: int = 8, prompt_len: int | None = None) -> Program:
    """The block-step program of `edlm serve` (efficient_dlm/serve: one call advances every slot by one
    block, one AR token, or one draft + verify iteration per sample.strategy) for `slots` slots holding
    prompts of up to `prompt_len` tokens (default data.seq_len / 2) and sample.max_new_tokens. Compiled at
    its widest chunk (every slot admitting a longest prompt) with sampling on: the largest variant the
    server warms up. Slots shard over the data axes, weights by their rules, the caches are donated."""
    cfg = target_model_config(config)
    prompt_len = prompt_len or config.data.seq_len // 2
    model = with_spec(abstract_model(cfg), spec_from_recipe(to_plain(config), cfg))
    kwargs = config.sample.generate_kwargs()
    verifier = _teacher_verifier(cfg, kwargs)
    layout = engine_layout(model, EngineConfig(
        slots=slots, max_prompt_tokens=prompt_len, max_new_tokens=kwargs["max_new_tokens"], strategy=kwargs["strategy"],
        block_size=kwargs["block_size"], draft_steps=kwargs["draft_steps"]), verifier)
    rows = lambda tree: {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding.named(mesh, ("batch",) + (None,) * (v.ndim - 1), v.shape)) for k, v in tree.items()}  # noqa: E731
    replicated = NamedSharding(mesh, PartitionSpec())
    knobs = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=replicated)
             for k, v in slots_lib.build_knobs([None] * slots, layout.defaults).items()}
    shard = lambda m: sharding.abstract_arrays(nnx.state(m), sharding.state_shardings(nnx.state(m), mesh))  # noqa: E731
    notes = dict(strategy=layout.strategy, slots=slots, batch=slots, max_prompt_tokens=prompt_len,
                 max_new_tokens=kwargs["max_new_tokens"], block_size=layout.geometry.block_size)
    if layout.kind == "speculative":  # self-verification (self_speculative) holds one set of weights
        geo, plan = layout.spec_geometry, dataclasses.replace(layout.spec, sampled=True)
        widths = max(geo.all_widths())
        self_verify = plan.spec.self_verify
        draft_graphdef, verify_graphdef = nnx.graphdef(model), None if self_verify else nnx.graphdef(verifier)
        caches = (_abstract_cache(cfg, mesh, slots, geo.draft.cache_size),
                  _abstract_cache((model if self_verify else verifier).config, mesh, slots, geo.verify_cache_size))
        run = lambda params, caches, inputs, knobs: spec_lib.spec_step(  # noqa: E731
            draft_graphdef, verify_graphdef, plan, *params, *caches, inputs, knobs)
        args = ((shard(model), None if self_verify else shard(verifier)), caches, rows(spec_lib.empty_inputs(geo, widths)),
                knobs)
        notes.update(chunk_widths=widths, cache_size=geo.draft.cache_size, verifier_cache_size=geo.verify_cache_size)
    else:
        geo, plan = layout.geometry, dataclasses.replace(layout.plan, sampled=True)
        width = max(slots_lib.chunk_widths(geo))
        graphdef = nnx.graphdef(model)
        step = ar_step if layout.kind == "ar" else diffusion_step
        run = lambda params, cache, inputs, knobs: step(graphdef, plan, params, cache, inputs, knobs)  # noqa: E731
        args = (shard(model), _abstract_cache(cfg, mesh, slots, geo.cache_size), rows(slots_lib.empty_inputs(geo, width)), knobs)
        notes.update(chunk_width=width, cache_size=geo.cache_size)
    return Program("serve_step", run, args, ("params", "cache", "inputs", "knobs"), donate_argnums=(1,),
                   notes=dict(**notes, attention=cfg.attention_backend))


PROGRAMS: dict[str, Callable[..., Program]] = {"train": train_program, "sample": sample_program, "serve": serve_program}


def advice(program: Program, config: Config, state_fraction: float | None = None) -> str:
    """What to change when `program` does not fit; `state_fraction`: arguments / HBM, when known."""
    tips = []
    if state_fraction is None or state_fraction > 0.4:
        tips.append("shard over more chips (larger mesh.fsdp, mesh.tensor, or a bigger topology)")
    m, expert_parallel = config.model, config.mesh.expert not in (0, 1)
    if m.num_experts and m.capacity_factor is None and expert_parallel:
        # Dropless expert parallelism sends static worst-case buffers: ep x the local tokens.
        tips.append("--config.model.capacity_factor=1.25 (dropless expert parallelism sizes its buffers for the worst case)")
    if m.num_experts and program.name == "train_step" and m.clean_routing == "dropless" and expert_parallel:
        # The clean x_0 half, dropless in training by default, pads the same way (docs/METHOD.md section 7).
        tips.append("--config.model.clean_routing=capacity (the x_0 half's dropless exchange is sized for the worst case)")
    if program.name == "train_step":
        if config.model.remat_policy != "full":
            tips.append("--config.model.remat_policy=full")
        tips.append(f"a smaller per-chip batch (train.batch_size below {config.train.batch_size}, or more train.grad_accum)")
    elif program.name == "serve_step":
        tips.append(f"fewer slots or shorter prompts (--serve_slots below {program.notes['slots']}, "
                    "--serve_max_prompt_tokens, --config.sample.max_new_tokens)")
    else:
        tips.append(
            f"fewer rows or a shorter context (--sample_batch below {program.notes['batch']}, --sample_prompt_len, "
            "--config.sample.max_new_tokens)"
        )
    return "; ".join(tips)


def compile_or_explain(program: Program, mesh: Mesh, rules, config: Config, target: TpuSlice):
    """Compiles; an out-of-memory compile error becomes one line saying what to change."""
    try:
        return program.compile(mesh, rules)
    except jax.errors.JaxRuntimeError as err:
        text = str(err)
        if "RESOURCE_EXHAUSTED" not in text and "out of memory" not in text.lower():
            raise
        first = next((line for line in text.splitlines() if "memory" in line.lower()), text.splitlines()[0])
        if "space=vmem" in text:  # a kernel's tile, not HBM: more chips do not help
            raise UserError(
                f"{program.name} does not compile on {target.describe()}: a kernel's block exceeds the chip's "
                f"VMEM ({first.strip()[:160]}). Try: --config.model.attention_backend=xla, or smaller kernel blocks"
            ) from None
        raise UserError(
            f"{program.name} does not fit on {target.describe()} with mesh {mesh_lib.describe(mesh)}: "
            f"{first.strip().rstrip('.')}. Try: {advice(program, config)}"
        ) from None


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", 0.0)) if cost else 0.0


def train_flops(config: Config, mesh: Mesh, rules, per_shard: bool = False) -> tuple[float, str]:
    """(FLOPs per chip of the training step at the config's full depth and batch, how they were counted).

    XLA's cost analysis counts the body of a loop once, so loops are taken out of the counted programs:
    layers are unrolled at one and two repeating layers (after any leading dense layers of an MoE
    model; cheap to compile) and extrapolated linearly, F(L) = F(d) + (L - d) * (F(d + 1) - F(d));
    gradient accumulation becomes one pass over the batch and the chunked loss the plain one (the same
    arithmetic, minus the chunked LM head's recomputation in the backward pass). When that whole-batch
    program does not fit the chip (plain [B, T, V] logits: the 100B MoE's needs 125 GiB on v5p even at
    2 rows per chip), or with per_shard, the program runs one sequence per batch shard and is scaled
    to the batch: an estimate that also scales the optimizer update, which does not grow with the
    batch (within 2% on a tiny model, where that share is largest; negligible at billions of
    parameters, where a parameter's update costs ~10 FLOPs against ~6 per token it sees).
    tests/aot_checks.py checks both against XLA's count for the unrolled program.
    """
    first, layers = config.model.first_k_dense or 0, config.model.num_layers
    batch, length = config.train.batch_size, config.data.seq_len

    def at_depth(rows: int) -> float:
        counts = []
        for depth in (first + 1, first + 2):
            # Per-layer index lists do not fit the shallow variants; the extrapolation counts MoE layers.
            variant = override(config, {
                "model.num_layers": depth, "model.scan_layers": False, "model.mlp_only_layers": (),
                "model.full_attention_layers": (), "train.grad_accum": 1, "train.loss_chunk": 0, "train.batch_size": rows,
            })
            counts.append(_flops(train_program(variant, mesh).compile(mesh, rules)))
        return counts[0] + (layers - first - 1) * (counts[1] - counts[0])

    if not per_shard:
        try:
            return at_depth(batch), "whole batch, layers extrapolated"
        except jax.errors.JaxRuntimeError as err:
            if "RESOURCE_EXHAUSTED" not in str(err):
                raise
    shards = batch // sharding.batch_sharding(mesh, 2, (batch, length)).shard_shape((batch, length))[0]
    return at_depth(shards) * batch / shards, "layers extrapolated, batch scaled from 1 row per shard"


def report(compiled, target: TpuSlice, program: Program, flops: tuple[float, str] | None, top: int = 6) -> dict[str, Any]:
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
    flops_per_chip, flops_method = flops or (None, None)
    return dict(
        target=target.describe(),
        chips=target.total_chips,
        hbm_bytes=target.hbm_bytes,
        memory=dict(parts, total=total),
        hbm_fraction=total / target.hbm_bytes,
        flops_per_chip=flops_per_chip,
        flops_method=flops_method,
        xla_flops_per_chip=_flops(compiled),  # XLA's count for this program: loop bodies once
        flops_total=None if flops_per_chip is None else flops_per_chip * target.total_chips,
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
    if result["flops_per_chip"] is None:  # the sampler's loops run a data-dependent number of times
        lines.append("   FLOPs        not counted (data-dependent decode loops)")
    else:
        lines.append(
            f"   FLOPs        {result['flops_per_chip']:.3e} per chip, {result['flops_total']:.3e} per step "
            f"({result['flops_method']})"
        )
    lines.append("   largest inputs: global shape, dtype, sharding, MiB per chip")
    for row in result["largest"]:
        lines.append(
            f"     {row['path']:<44} {str(row['shape']):<22} {row['dtype']:<9} {row['spec']:<34} {row['device_bytes'] / 2**20:9.1f}"
        )
    return "\n".join(lines)
