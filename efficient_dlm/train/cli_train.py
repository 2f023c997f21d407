"""`edlm train --config=configs/x.py [--config.section.key=value ...]`: block-diffusion (or AR) training.

Resumes from the newest checkpoint in config.run_dir; `efficient_dlm.load(run_dir)` afterwards
returns the trained model.
"""
from __future__ import annotations

import signal

from efficient_dlm.config import typed
from efficient_dlm.errors import UserError
from efficient_dlm.parallel.mesh import run_mesh
from efficient_dlm.train.loop import NonFiniteError, train


DEFAULT_CONFIG = "configs/tiny_train.py"


def run(config, FLAGS) -> int:
    config = typed(config)  # the CLI's ConfigDict, typed once here
    try:
        result = train(config, mesh=run_mesh(config.mesh))
    except NonFiniteError as err:
        raise UserError(str(err)) from None
    if result.stopped_by:  # train() printed where it stopped and how to resume
        return 128 + int(signal.Signals[result.stopped_by])
    last = result.history[-1] if result.history else {}
    summary = f"loss {last['loss']:.4f}" if last else "nothing to do (already at train.steps)"
    print(f"trained {config.diffusion.objective} to step {int(result.state.step)} in {result.run_dir}: {summary}")
    return 0
