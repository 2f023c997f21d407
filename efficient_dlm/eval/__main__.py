"""`python -m efficient_dlm.eval ARGS`: lm-eval's own command line (`lm_eval ARGS`) with the model `edlm`
registered; without an --include_path of its own, the shipped demo tasks (efficient_dlm/eval/tasks) are added.

lm-eval 0.4.13 does not read the `lm_eval.models` entry point that setup.py declares (later releases
do), so `lm_eval --model edlm` needs this wrapper there; the arguments are lm-eval's, unchanged:

    python -m efficient_dlm.eval --model edlm --model_args ckpt=DIR,strategy=threshold,threshold=0.9,batch_size=16 \\
        --tasks edlm_demo
"""
from __future__ import annotations

import sys

from lm_eval.__main__ import cli_evaluate

from efficient_dlm.eval import lm  # noqa: F401  (registers the model "edlm")


def main(argv: list[str] | None = None) -> None:
    """Runs lm-eval's CLI on argv (default sys.argv[1:])."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--model" in argv and not any(a.startswith("--include_path") for a in argv):
        argv += ["--include_path", lm.task_dir()]
    sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
