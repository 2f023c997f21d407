"""`edlm aot --config=configs/x.py --topology=v5p-256`: will this recipe fit on that TPU slice?

Compiles the real training step, the sampler's generation program and (--programs=serve) the serving
block-step program of `edlm serve` for the named topology on this host
through libtpu, with abstract sharded inputs, and prints per-chip memory against HBM, FLOPs per step
and how the largest tensors are sharded. Exits 1, naming what to change, when a program does not fit
under --hbm_limit of HBM.
"""
from __future__ import annotations

import json
import os
import time

from absl import flags

from efficient_dlm.config import typed
from efficient_dlm.errors import UserError
from efficient_dlm.extras import require
from efficient_dlm.outputs import check_output_file
from efficient_dlm.aot import compiler as aot
from efficient_dlm.parallel import mesh as mesh_lib
from efficient_dlm.parallel.topology import parse
from efficient_dlm.sample.config import set_quantize_flag

flags.DEFINE_string("topology", None, "TPU slice: v5p-256, v5e-64, v4-128, v6e-256, or explicit v5p:4x4x12")
flags.DEFINE_integer("num_slices", 1, "number of slices (multi-slice over DCN; mesh.dcn_* sizes apply)")
flags.DEFINE_list("programs", ["train", "sample"], "what to compile: train, sample, serve")
flags.DEFINE_float("hbm_limit", 0.9, "fail when a program needs more than this fraction of HBM per chip")
flags.DEFINE_integer("sample_batch", 8, "sampler: rows decoded together")
flags.DEFINE_integer("sample_prompt_len", None, "sampler: prompt tokens per row (default data.seq_len / 2)")
flags.DEFINE_integer("serve_slots", 8, "serve: continuous-batching slots (edlm serve --slots)")
flags.DEFINE_integer("serve_max_prompt_tokens", None, "serve: prompt capacity per slot (default data.seq_len / 2)")
flags.DEFINE_string("json_out", None, "also write the reports as JSON to this path")
flags.DEFINE_bool("flops", True, "train: also count FLOPs (two more compiles with layers unrolled at depth 1 and 2)")
flags.DEFINE_string("quantize", None, "sampler: none | int8 | fp8 weights (sets sample.quantize; qwix, per channel)")

# Set before libtpu loads; the verb never opens a real accelerator.
MULTI_HOST = False


def run(config, FLAGS) -> int:
    if not FLAGS.topology:
        raise UserError("--topology is required (e.g. --topology=v5p-256)")
    set_quantize_flag(config, FLAGS.quantize)
    config = typed(config)  # the CLI's ConfigDict, typed once here
    require("libtpu", "tpu", "edlm aot (compiling for a TPU topology)")
    if FLAGS.json_out:
        check_output_file(FLAGS.json_out, "--json_out")
    unknown = sorted(set(FLAGS.programs) - set(aot.PROGRAMS))
    if unknown:
        raise UserError(f"unknown --programs {', '.join(unknown)}; choose from {', '.join(aot.PROGRAMS)}")
    if not 0 < FLAGS.hbm_limit <= 1:
        raise UserError(f"--hbm_limit must be in (0, 1], got {FLAGS.hbm_limit}")
    target = parse(FLAGS.topology, FLAGS.num_slices)
    devices = aot.tpu_devices(target)
    mesh = mesh_lib.make_mesh(config.mesh, devices)
    rules = mesh_lib.config_rules(config.mesh)
    print(f"target {target.describe()}; mesh {mesh_lib.describe(mesh)}")
    results, failed = {}, []
    for name in FLAGS.programs:
        options = {"sample": dict(batch=FLAGS.sample_batch, prompt_len=FLAGS.sample_prompt_len),
                   "serve": dict(slots=FLAGS.serve_slots, prompt_len=FLAGS.serve_max_prompt_tokens)}.get(name, {})
        program = aot.PROGRAMS[name](config, mesh, **options)
        start = time.perf_counter()
        compiled = aot.compile_or_explain(program, mesh, rules, config, target)
        flops = aot.train_flops(config, mesh, rules) if name == "train" and FLAGS.flops else None
        result = aot.report(compiled, target, program, flops)
        result.update(program=program.name, notes=program.notes, mesh=mesh_lib.describe(mesh), seconds=time.perf_counter() - start)
        results[name] = result
        print(aot.format_report(program.name, result, program.notes))
        if result["hbm_fraction"] > FLAGS.hbm_limit:
            failed.append(name)
            print(
                f"   DOES NOT FIT: {result['hbm_fraction']:.2%} of HBM > --hbm_limit={FLAGS.hbm_limit:g}. "
                f"Try: {aot.advice(program, config, result['memory']['arguments'] / result['hbm_bytes'])}"
            )
    if FLAGS.json_out:
        os.makedirs(os.path.dirname(os.path.abspath(FLAGS.json_out)), exist_ok=True)
        with open(FLAGS.json_out, "w") as f:
            json.dump(results, f, indent=2, default=str)
    return 1 if failed else 0
