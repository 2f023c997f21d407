"""HF import benchmark: time, peak host memory and throughput of `from_hf` on a ~1 GB checkpoint.

Not a test. Writes a random Llama-shaped bfloat16 checkpoint (config.json + sharded safetensors with
an index, tensor names from our key maps) to a temporary directory, then imports it in a fresh
subprocess per case, so each peak RSS (VmHWM from /proc/self/status) belongs to one import alone.

On a CPU host JAX's device memory is host memory, so the imported model itself is part of the RSS:
the number to read is `overhead = (peak RSS - RSS before loading) / model bytes`. A loader that holds
a second full copy of the weights (an unpickled state dict, a dict of converted arrays) shows >= 2;
a memory-mapped loader that materialises one parameter at a time shows 1 plus the largest parameter.

    python benchmarks/import_bench.py --size_gb 1.0 --json import_bench.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GB = 1e9


def llama_config(size_gb: float) -> dict:
    """A Llama config.json (hidden 2048, GQA 16/4 heads, untied head) with layers chosen to reach size_gb."""
    hidden, inter, vocab, heads, kv_heads, head_dim = 2048, 5632, 32000, 16, 4, 128
    per_layer = 2 * (2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim + 3 * hidden * inter + 2 * hidden)
    fixed = 2 * (2 * vocab * hidden + hidden)
    layers = max(1, round((size_gb * GB - fixed) / per_layer))
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "head_dim": head_dim, "vocab_size": vocab, "rms_norm_eps": 1e-5,
        "max_position_embeddings": 4096, "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
        "tie_word_embeddings": False, "hidden_act": "silu", "dtype": "bfloat16",
    }


def write_checkpoint(directory: str, size_gb: float, shard_gb: float) -> int:
    """Writes config.json and random bf16 shards (one tensor in memory at a time); returns total bytes."""
    import ml_dtypes

    from efficient_dlm.models.decoder import abstract_model
    from efficient_dlm.port import keymaps
    from efficient_dlm.port.hf_config import model_config_from_hf
    from efficient_dlm.port.hf_import import _hf_shape, _param_paths
    from efficient_dlm.port.safetensors_writer import TensorSpec, write_sharded
    from flax import nnx

    hf = llama_config(size_gb)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
    cfg = model_config_from_hf(hf)
    abstract = _param_paths(nnx.state(abstract_model(cfg)))
    specs = []
    for rule in keymaps.rules_for(cfg):
        shape = abstract[rule.path].shape
        hf_shape = _hf_shape(rule, cfg, shape[1:] if rule.per_layer else shape)
        specs += [TensorSpec(name, hf_shape, np.dtype(ml_dtypes.bfloat16)) for name in keymaps.hf_names(rule, cfg)]
    rng = np.random.default_rng(0)

    def produce(spec: TensorSpec) -> np.ndarray:
        return (rng.standard_normal(spec.shape, dtype=np.float32) * 0.02).astype(ml_dtypes.bfloat16)

    write_sharded(directory, specs, produce, int(shard_gb * GB))
    return sum(s.nbytes for s in specs)


def evict_page_cache(directory: str) -> None:
    """Asks the kernel to drop the checkpoint's clean pages (cold read), no root needed."""
    for name in os.listdir(directory):
        fd = os.open(os.path.join(directory, name), os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def proc_status() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile of this process, in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
    return out


def child(directory: str, dtype: str) -> None:
    """One import in this fresh process; prints a JSON line with time and memory."""
    import jax

    import efficient_dlm as edlm

    jax.numpy.zeros(1).block_until_ready()  # backend up before the baseline
    before = proc_status()
    start = time.perf_counter()
    model = edlm.from_hf(directory, dtype=dtype)
    leaves = jax.tree.leaves(nnx_state(model))
    jax.block_until_ready(leaves)
    seconds = time.perf_counter() - start
    after = proc_status()
    print(json.dumps({"seconds": seconds, "model_bytes": sum(x.nbytes for x in leaves), "before": before, "after": after}))


def nnx_state(model):
    from flax import nnx

    return nnx.state(model, nnx.Param)


def run_case(directory: str, dtype: str, cold: bool, code_root: str) -> dict:
    if cold:
        evict_page_cache(directory)
    env = {**os.environ, "PYTHONPATH": code_root, "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, os.path.abspath(__file__), "--child", directory, "--dtype", dtype]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True, cwd=REPO_ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size_gb", type=float, default=1.0, help="checkpoint size to generate")
    parser.add_argument("--shard_gb", type=float, default=0.3, help="max safetensors shard size")
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], help="from_hf(dtype=...) cases")
    parser.add_argument("--code_root", default=REPO_ROOT, help="efficient_dlm checkout to import (compare versions)")
    parser.add_argument("--json", default="", help="write the results here")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="bfloat16", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.dtype)
    sys.path.insert(0, REPO_ROOT)
    with tempfile.TemporaryDirectory(prefix="edlm_import_bench_") as directory:
        ckpt_bytes = write_checkpoint(directory, args.size_gb, args.shard_gb)
        files = sorted(n for n in os.listdir(directory) if n.endswith(".safetensors"))
        rows = []
        for dtype in args.dtypes:
            for cold in (True, False):
                r = run_case(directory, dtype, cold, args.code_root)
                peak, base = r["after"]["VmHWM"], r["before"]["VmRSS"]
                rows.append({
                    "dtype": dtype, "page_cache": "cold" if cold else "warm", "seconds": round(r["seconds"], 2),
                    "gb_per_s": round(ckpt_bytes / GB / r["seconds"], 2), "checkpoint_gb": round(ckpt_bytes / GB, 3),
                    "model_gb": round(r["model_bytes"] / GB, 3), "rss_before_gb": round(base / GB, 3),
                    "peak_rss_gb": round(peak / GB, 3), "overhead": round((peak - base) / r["model_bytes"], 3),
                    "rss_after_file_gb": round(r["after"]["RssFile"] / GB, 3),
                })
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    header = (f"checkpoint: {ckpt_bytes / GB:.3f} GB bf16 in {len(files)} shards; code: {args.code_root}; "
              f"{os.cpu_count()} CPUs, load average {load}")
    print(header)
    cols = ["dtype", "page_cache", "seconds", "gb_per_s", "model_gb", "rss_before_gb", "peak_rss_gb", "overhead"]
    print(" | ".join(cols))
    for row in rows:
        print(" | ".join(str(row[c]) for c in cols))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"checkpoint": header, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
