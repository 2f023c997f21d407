"""`edlm ablate [--config=configs/demo_ablation.py] [--out DIR]`: the Efficient-DLM comparisons at demo scale.

Trains every variant of efficient_dlm/demo/ablate.py (or those in --config.demo.variants) from the
shipped teacher with the same token budget, evaluates them, and writes DIR/results.md and
DIR/ablation.png. Resumable like `edlm demo`: finished variants and stages are skipped.
"""
from __future__ import annotations

from absl import flags

from efficient_dlm.cli import invocation
from efficient_dlm.demo.ablate import run_ablation
from efficient_dlm.demo.pipeline import Interrupted

DEFAULT_CONFIG = "configs/demo_ablation.py"

flags.DEFINE_string("out", "runs/ablation", "output directory (one subdirectory per variant)")


def run(config, FLAGS) -> int:
    try:
        result = run_ablation(config, FLAGS.out, command=invocation())
    except Interrupted as stopped:
        print(stopped)
        return stopped.exit_code
    print("\n".join(result["table"]))
    print(f"plot: {result['plot']}")
    return 0
