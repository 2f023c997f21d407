"""Export speed and host memory: `to_hf` of a random model shaped like a recipe (default Qwen3-0.6B).

    JAX_PLATFORMS=cpu python benchmarks/export_hf.py --config configs/qwen3_0p6b.py --dtype bfloat16

Reports parameters, bytes written, wall time and the peak extra resident memory during the export
(sampled from /proc/self/statm every 5 ms) next to the largest single tensor: the exporter gathers one
HF tensor at a time, so the extra memory should stay a small multiple of that tensor, not of the model.
Writes the numbers as JSON to --json when given.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import shutil
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from efficient_dlm.config import model_config  # noqa: E402
from efficient_dlm.models.decoder import abstract_model  # noqa: E402
from efficient_dlm.port.hf_export import tensor_plan, to_hf  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakRSS:
    """Samples the resident set size in a thread while the block runs."""

    def __enter__(self):
        self.peak, self.running = rss(), True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, rss())
            time.sleep(0.005)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()


def random_model(cfg, seed: int = 0):
    """Random parameters, created one at a time on device (no host copy of the whole model)."""
    model = abstract_model(cfg)
    key = jax.random.key(seed)
    flat = []
    for i, (path, leaf) in enumerate(nnx.to_flat_state(nnx.state(model, nnx.Param))):
        value = 0.02 * jax.random.normal(jax.random.fold_in(key, i), leaf.shape, jnp.float32)
        flat.append((path, leaf.replace(value.astype(leaf.dtype))))
    nnx.update(model, nnx.from_flat_state(flat))
    jax.block_until_ready(nnx.state(model))  # materialised before memory is measured
    return model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/qwen3_0p6b.py")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--max_shard_size", default="5GB")
    parser.add_argument("--mask_token_id", type=int, default=0, help="record a [MASK] id (dLM export); -1: AR export")
    parser.add_argument("--json", default="")
    args = parser.parse_args()

    from ml_collections import config_flags  # noqa: F401  (recipe files import efficient_dlm.config)
    import importlib.util

    spec = importlib.util.spec_from_file_location("recipe", args.config)
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    cfg = model_config(recipe.get_config()).replace(param_dtype="float32", dtype="float32")
    if args.mask_token_id >= 0:
        cfg = cfg.replace(mask_token_id=args.mask_token_id)
    model = random_model(cfg)
    plan = tensor_plan(model, args.dtype)
    params = sum(int(jnp.size(leaf[...])) for _, leaf in nnx.to_flat_state(nnx.state(model, nnx.Param)))
    largest = max(spec.nbytes for spec, _, _ in plan)
    tmp = tempfile.mkdtemp()
    tok = os.path.join(tmp, "tok")
    os.makedirs(tok)
    with open(os.path.join(tok, "tokenizer.json"), "w") as f:
        f.write("{}")  # the exporter copies tokenizer files; their content does not matter here
    out = os.path.join(tmp, "out")
    gc.collect()
    before = rss()
    start = time.perf_counter()
    with PeakRSS() as peak:
        to_hf(model, out, tokenizer_dir=tok, dtype=args.dtype, max_shard_size=args.max_shard_size)
    seconds = time.perf_counter() - start
    written = sum(os.path.getsize(os.path.join(out, n)) for n in os.listdir(out) if n.endswith(".safetensors"))
    result = {
        "config": args.config,
        "dtype": args.dtype,
        "params": params,
        "tensors": len(plan),
        "bytes_written": written,
        "seconds": round(seconds, 2),
        "MB_per_s": round(written / seconds / 1e6, 1),
        "model_rss_MB": round(before / 1e6),
        "peak_extra_rss_MB": round((peak.peak - before) / 1e6, 1),
        "largest_tensor_MB": round(largest / 1e6, 1),
        "maxrss_MB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3),
    }
    shutil.rmtree(tmp)
    print("\n".join(f"{k:>20}: {v}" for k, v in result.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
