"""Train-step throughput and FLOPs: block diffusion vs AR (and the other objectives) on one model.

    JAX_PLATFORMS=cpu python benchmarks/train_step.py --json /tmp/train_step.json

Builds a random model (default: 4 layers, hidden 256, vocab 4096; small enough for a laptop CPU, big
enough that the matmuls dominate), one fixed batch of token ids shared by every objective, and the
real jitted train step of `efficient_dlm.train.step.make_train_step` (corruption, forward, loss,
backward, AdamW). Reports compile time, XLA's FLOP count of the compiled step
(`compiled.cost_analysis()`), measured steps/s and tokens/s (tokens = batch x seq_len of the
*clean* sequence, the same for every objective), and each objective's FLOP and time ratio to `ar`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from efficient_dlm.config import base_config, model_config, typed  # noqa: E402
from efficient_dlm.models.decoder import init_model  # noqa: E402
from efficient_dlm.train.optim import make_optimizer  # noqa: E402
from efficient_dlm.train.state import create_state  # noqa: E402
from efficient_dlm.train.step import make_train_step  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--objectives", default="ar,block_diffusion,block,bidirectional")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--block_size", type=int, default=32)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--json", default="")
    return p.parse_args(argv)


def config_for(args, objective: str):
    c = base_config()
    m = c.model
    m.vocab_size, m.hidden_size, m.intermediate_size = args.vocab, args.hidden, 4 * args.hidden
    m.num_layers, m.num_heads, m.num_kv_heads, m.head_dim = args.layers, args.heads, args.heads, args.hidden // args.heads
    m.dtype, m.mask_token_id, m.eos_token_id = args.dtype, args.vocab - 1, 1
    c.diffusion.objective, c.diffusion.block_size = objective, args.block_size
    c.data.seq_len = args.seq_len
    c.train.batch_size, c.train.steps = args.batch, 1000
    return c


def cost(compiled) -> float:
    analysis = compiled.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
    return float(analysis.get("flops", float("nan")))


def bench(args, objective: str, batch) -> dict:
    config = config_for(args, objective)
    cfg = model_config(config)
    tx = make_optimizer(config.train)
    state = create_state(init_model(cfg, seed=0), tx, seed=0)
    step = make_train_step(typed(config).diffusion, typed(config).train, cfg, tx=tx)
    start = time.perf_counter()
    compiled = step.lower(state, batch, jax.random.PRNGKey(0)).compile()
    compile_s = time.perf_counter() - start
    for i in range(2):  # warm-up
        state, metrics = compiled(state, batch, jax.random.PRNGKey(i))
    jax.block_until_ready(state)
    start = time.perf_counter()
    for i in range(args.steps):
        state, metrics = compiled(state, batch, jax.random.PRNGKey(100 + i))
    jax.block_until_ready(state)
    elapsed = time.perf_counter() - start
    return {
        "objective": objective,
        "compile_s": compile_s,
        "gflops_per_step": cost(compiled) / 1e9,
        "step_s": elapsed / args.steps,
        "tokens_per_s": args.batch * args.seq_len * args.steps / elapsed,
        "loss": float(metrics["loss"]),
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    rng = np.random.default_rng(0)
    shape = (args.batch, args.seq_len)
    batch = {
        "tokens": rng.integers(2, args.vocab - 1, shape).astype(np.int32),
        "segment_ids": np.ones(shape, np.int32),
        "positions": np.tile(np.arange(args.seq_len, dtype=np.int32), (args.batch, 1)),
        "loss_weights": np.ones(shape, np.float32),
    }
    batch = jax.device_put(batch)
    rows = [bench(args, objective, batch) for objective in args.objectives.split(",")]
    base = next((r for r in rows if r["objective"] == "ar"), rows[0])
    print(f"device: {jax.devices()[0].device_kind}, model: {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}, "
          f"batch {args.batch} x seq {args.seq_len}, block {args.block_size}, {args.dtype}")
    print(f"{'objective':<16}{'compile s':>10}{'GFLOP/step':>12}{'FLOP ratio':>11}{'step s':>9}{'tokens/s':>10}{'time ratio':>11}")
    for r in rows:
        r["flop_ratio_vs_ar"] = r["gflops_per_step"] / base["gflops_per_step"]
        r["time_ratio_vs_ar"] = r["step_s"] / base["step_s"]
        print(f"{r['objective']:<16}{r['compile_s']:>10.1f}{r['gflops_per_step']:>12.2f}{r['flop_ratio_vs_ar']:>11.2f}"
              f"{r['step_s']:>9.3f}{r['tokens_per_s']:>10,.0f}{r['time_ratio_vs_ar']:>11.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
