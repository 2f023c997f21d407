"""`edlm demo [--out DIR]`: the shipped AR teacher becomes a block-diffusion LM on this machine.

Runs the stages of efficient_dlm/demo/pipeline.py (data, convert, evaluate, export, report) with the
recipe configs/demo.py and writes DIR/report.md, DIR/results.json and DIR/accuracy_vs_tpf.png. Interrupt it at any
time: rerunning the same command continues where it stopped.
"""
from __future__ import annotations

import os

from absl import flags

from efficient_dlm.cli import invocation
from efficient_dlm.demo.pipeline import Interrupted, run_demo
from efficient_dlm.outputs import check_output_dir

DEFAULT_CONFIG = "configs/demo.py"

flags.DEFINE_string("out", "runs/demo", "output directory (data, checkpoints, export, report)")


def run(config, FLAGS) -> int:
    if FLAGS.out:
        check_output_dir(FLAGS.out)
    try:
        results = run_demo(config, FLAGS.out, command=invocation())
    except Interrupted as stopped:
        print(stopped)
        return stopped.exit_code
    report = results["report"]["report"]
    print(f"\nreport: {report}\nplot:   {results['report']['plot']}\nresults: {results['report']['results']}\n"
          f"total:  {results['total_seconds']:.0f} s")
    with open(report) as f:
        verdict = next((line for line in f if line.startswith("At ") and "(the default decoding)" in line), "")
    if verdict:
        print(verdict.strip())
    return 0 if os.path.exists(report) else 1
