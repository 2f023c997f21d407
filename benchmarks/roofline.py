"""Roofline PREDICTION of per-forward time on one TPU chip for the decoding steps of a recipe's model.

    PYTHONPATH=. python benchmarks/roofline.py --config configs/qwen3_8b_bd.py --out roofline.json

AOT-compiles (libtpu, on this host) one bare forward per decoding step against a full KV cache (layers
unrolled at depth 1 and 2, extrapolated to the model's depth: cost analysis counts a loop once), the
model as the sampler runs it (`Decoder.decode` + LM head + argmax on the positions the step reads):
the AR step (1 token, causal), the dLM denoising step (B tokens, bidirectional), the dLM first step
of a block ([clean block ; block], 2B tokens, block-causal) and the speculative verifier step (B + 1
tokens, causal). From XLA's cost analysis of each compiled program (FLOPs, bytes accessed) the
roofline time is max(FLOPs / peak FLOP/s, bytes / HBM bandwidth) per chip. Tokens/s ratios against AR
follow at given tokens per forward. Nothing here ran on a TPU: it is a prediction.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

from efficient_dlm.models.cache import KVCache  # noqa: E402
from efficient_dlm.models.decoder import abstract_model  # noqa: E402
from efficient_dlm.aot import compiler as aot  # noqa: E402
from efficient_dlm.config import typed  # noqa: E402
from efficient_dlm.parallel.topology import parse  # noqa: E402

# TPU v5p per chip (Google Cloud's published figures): bfloat16 peak and HBM bandwidth.
PEAK = {"v5p": (459e12, 2.765e12)}


def _recipe(path: str):
    spec = importlib.util.spec_from_file_location("recipe", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return typed(module.get_config())


def _step_program(cfg, batch: int, chunk: int, head: int, cache_size: int, attention: str, block_size, device):
    """A bare forward of [batch, chunk] tokens against a full cache, LM head + argmax on the last `head`."""
    model = abstract_model(cfg)
    graphdef, state = nnx.split(model)
    mesh = Mesh([device], ("one",))
    one = NamedSharding(mesh, PartitionSpec())
    shape = (cfg.num_layers, batch, cache_size, cfg.num_kv_heads, cfg.head_dim)
    kv = jax.ShapeDtypeStruct(shape, cfg.compute_dtype, sharding=one)
    ids = jax.ShapeDtypeStruct((batch, chunk), jnp.int32, sharding=one)
    state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one), state)

    def forward(state, k, v, tokens, positions):
        model = nnx.merge(graphdef, state)
        zeros = jnp.zeros((batch,), jnp.int32)
        cache = KVCache(k, v, zeros, zeros + cache_size, zeros + cache_size + chunk if cfg.rope_type == "dynamic" else None)
        hidden, _ = model.decode(tokens, positions, cache, attention=attention, block_size=block_size)
        return jnp.argmax(model.logits(hidden[:, chunk - head :]), axis=-1)

    return jax.jit(forward).lower(state, kv, kv, ids, ids).compile()


def _cost(compiled) -> tuple[float, float]:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"]), float(cost["bytes accessed"])


def _extrapolated_cost(cfg, *step) -> tuple[float, float]:
    """(FLOPs, bytes) of the whole model: cost analysis counts a loop body once, so the layers are
    unrolled at depth 1 and 2 and the per-layer difference extrapolated to the real depth."""
    one, two = (_cost(_step_program(cfg.replace(num_layers=n, scan_layers=False), *step)) for n in (1, 2))
    return tuple(a + (cfg.num_layers - 1) * (b - a) for a, b in zip(one, two))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/qwen3_8b_bd.py")
    parser.add_argument("--topology", default="v5p-8", help="one chip of this slice compiles each program")
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--prompt_len", type=int, default=2048)
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--block_size", type=int, default=0, help="0 = the recipe's diffusion.block_size")
    parser.add_argument("--tpf", default="2.09", help="dLM tokens per forward to predict at (the demo's at 0.9)")
    parser.add_argument("--tpvf", default="2,3,4", help="speculative tokens per verifier forward to predict at")
    parser.add_argument("--out", default="roofline.json")
    args = parser.parse_args()
    config = _recipe(args.config)
    cfg = aot.target_model_config(config).replace(param_dtype=config.model.dtype)  # inference weights in bf16
    block = args.block_size or config.diffusion.block_size
    target = parse(args.topology)
    device = aot.tpu_devices(target)[0]
    peak_flops, bandwidth = PEAK[target.generation.name]
    cache_size = args.prompt_len + args.max_new_tokens
    steps = {"ar": (1, 1, "causal", None), "dlm_step": (block, block, "bidirectional", block),
             "dlm_first": (2 * block, block, "block", block), "verify": (block + 1, block + 1, "causal", None)}
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        times = {}
        for name, (chunk, head, attention, block_size) in steps.items():
            flops, moved = _extrapolated_cost(cfg, batch, chunk, head, cache_size, attention, block_size, device)
            times[name] = max(flops / peak_flops, moved / bandwidth)
            rows.append({"batch": batch, "step": name, "chunk": chunk, "flops": flops, "bytes": moved,
                         "roofline_s": times[name], "bound": "compute" if flops / peak_flops > moved / bandwidth else "memory"})
            print(json.dumps(rows[-1]), flush=True)
        ar_tps = batch / times["ar"]
        for tpf in (float(t) for t in args.tpf.split(",")):
            # A block of B tokens at TPF tau: B / tau forwards, the first of them on [clean block ; block].
            block_time = times["dlm_first"] + (block / tpf - 1) * times["dlm_step"]
            rows.append({"batch": batch, "mode": f"threshold at TPF {tpf:g}", "ratio_vs_ar": batch * block / block_time / ar_tps})
            print(json.dumps(rows[-1]), flush=True)
        for tpvf in (float(t) for t in args.tpvf.split(",")):
            # One draft step (the [clean block ; block] chunk) and one verifier forward per iteration.
            iteration = times["dlm_first"] + times["verify"]
            rows.append({"batch": batch, "mode": f"speculative (1 draft step) at {tpvf:g} tokens per verifier forward",
                         "ratio_vs_ar": batch * tpvf / iteration / ar_tps})
            print(json.dumps(rows[-1]), flush=True)
    with open(args.out, "w") as f:
        json.dump({"config": args.config, "topology": args.topology, "peak_flops": peak_flops, "hbm_bandwidth": bandwidth,
                   "cache_size": cache_size, "block_size": block, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
