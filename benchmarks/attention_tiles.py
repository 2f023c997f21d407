"""Attention work saved by the splash diffusion masks, measured without a TPU.

For each stream length L and block size B, for the clean-context training layout ([x_t ; x_0], 2L)
and plain block-causal attention (L):
- tiles: fraction of (tile x tile) tiles the splash forward kernel computes (from its MaskInfo);
- visible: fraction of the attention matrix that is visible (the limit any mask-aware kernel meets);
- mask_s: host seconds to build the three MaskInfos (forward, dq, dkv) from indices;
- kernel GFLOP: 4 * tile^2 * head_dim per computed tile (QK^T and PV), i.e. the matmul work the
  Mosaic kernel issues (XLA's cost analysis cannot see inside a Mosaic custom call: it reports 0);
- dense GFLOP: XLA cost analysis of the dense-mask XLA attention program, AOT-compiled for a TPU
  v5p chip through libtpu; xla_in_splash GFLOP: cost analysis of the splash program's XLA part.
One head, batch 1, head_dim 128, bfloat16. Usage:
    python benchmarks/attention_tiles.py [--lengths 2048,8192,32768] [--blocks 16,32,128] [--out x.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5p-8")
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import topologies  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from efficient_dlm.models.attention import xla_attention  # noqa: E402
from efficient_dlm.models.masks import MaskSpec, dense_mask  # noqa: E402
from pallas_kernels import splash_masks  # noqa: E402
from pallas_kernels.training_attention import DEFAULT_TILE, splash_attention  # noqa: E402

HEAD_DIM = 128


def _flops(fn, mesh, length: int) -> float:
    x = jax.ShapeDtypeStruct((1, length, 1, HEAD_DIM), jnp.bfloat16, sharding=NamedSharding(mesh, P()))
    with jax.set_mesh(mesh):
        compiled = jax.jit(fn).lower(x, x, x).compile()
    return float(compiled.cost_analysis().get("flops", 0.0))


def measure(spec: MaskSpec, length: int, mesh, with_dense: bool) -> dict:
    splash_masks.mask_infos.cache_clear()
    start = time.perf_counter()
    splash_masks.mask_infos(spec, length, length, DEFAULT_TILE)
    mask_seconds = time.perf_counter() - start
    tiles, visible = splash_masks.computed_tile_fraction(spec, length, DEFAULT_TILE)
    num_tiles = (length // DEFAULT_TILE) ** 2
    row = dict(
        layout=spec.mode, L=spec.seq_len, B=spec.block_size, length=length, tiles=tiles, visible=visible,
        mask_s=mask_seconds, kernel_gflop=tiles * num_tiles * 4 * DEFAULT_TILE**2 * HEAD_DIM / 1e9,
        xla_in_splash_gflop=_flops(lambda q, k, v: splash_attention(q, k, v, spec), mesh, length) / 1e9,
    )
    if with_dense:
        dense = lambda q, k, v: xla_attention(q, k, v, dense_mask(spec, length, length))
        row["dense_gflop"] = _flops(dense, mesh, length) / 1e9
    return row


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="2048,8192,32768")
    parser.add_argument("--blocks", default="16,32,128")
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    topology = topologies.get_topology_desc("v5p:2x2x1", "tpu")
    mesh = jax.sharding.Mesh(np.array(topology.devices[:1]), ("data",))
    rows = []
    print(f"{'layout':14} {'L':>6} {'B':>4} {'tiles':>7} {'visible':>7} {'mask_s':>7} {'kernel GF':>10} {'dense GF':>10} {'xla-in-splash GF':>16}")
    for length in (int(x) for x in args.lengths.split(",")):
        for block in (int(x) for x in args.blocks.split(",")):
            for spec, physical in ((MaskSpec("clean_context", block, length), 2 * length), (MaskSpec("block", block, length), length)):
                row = measure(spec, physical, mesh, with_dense=True)
                rows.append(row)
                print(f"{row['layout']:14} {length:>6} {block:>4} {row['tiles']:>7.4f} {row['visible']:>7.4f} {row['mask_s']:>7.3f} "
                      f"{row['kernel_gflop']:>10.1f} {row['dense_gflop']:>10.1f} {row['xla_in_splash_gflop']:>16.3f}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
