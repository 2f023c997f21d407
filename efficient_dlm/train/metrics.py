"""Training metrics: TensorBoard event files (tensorboardX), metrics.jsonl, and a tqdm progress bar.

Every logged value goes to all three sinks: TensorBoard under run_dir/tensorboard (loss, learning
rate, grad norm, tokens/s, masked fraction, step time, eval metrics), one JSON line per log event
in run_dir/metrics.jsonl (easy to read back in tests, notebooks and the demo), and the progress bar's
postfix (loss, tokens/s; tqdm supplies the ETA).
"""
from __future__ import annotations

import json
import math
import os
from typing import Any

from tqdm.auto import tqdm

from efficient_dlm.parallel.distributed import is_main


def drop_after(path: str, step: int) -> None:
    """Removes records of steps after `step` (a resumed run replays them), atomically, so that
    metrics.jsonl holds each step once; a line cut by a killed run goes too."""
    if not os.path.exists(path):
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line if line.endswith("\n") else line + "\n")
            except (ValueError, KeyError, TypeError):
                continue
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(kept)
    os.replace(tmp, path)


class MetricsLogger:
    def __init__(self, run_dir: str, *, total_steps: int, start_step: int, tensorboard: bool = True, progress: bool = True):
        os.makedirs(run_dir, exist_ok=True)
        self._main = is_main()  # multi-host: only process 0 writes metrics and shows progress
        path = os.path.join(run_dir, "metrics.jsonl")
        if self._main:
            drop_after(path, start_step)
        self._jsonl = open(path if self._main else os.devnull, "a")
        self._tb = None
        if tensorboard and self._main:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))
        disable = not (progress and self._main)
        self._bar = tqdm(total=total_steps, initial=start_step, disable=disable, unit="step", dynamic_ncols=True)

    def write(self, step: int, values: dict[str, Any], prefix: str = "train") -> None:
        """Records scalar `values` at `step` under `prefix/` (TensorBoard tags, JSON keys)."""
        scalars = {k: float(v) for k, v in values.items()}
        self._jsonl.write(json.dumps({"step": step, "kind": prefix, **scalars}) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for name, value in scalars.items():
                if math.isfinite(value):  # non-finite steps are reported on the console and in the JSON log
                    self._tb.add_scalar(f"{prefix}/{name}", value, step)

    def advance(self, step: int, loss: float, tokens_per_s: float) -> None:
        self._bar.update(step - self._bar.n)
        self._bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)

    def message(self, text: str) -> None:
        """A line printed above the progress bar (skipped steps, evaluations, checkpoints)."""
        if self._main:
            self._bar.write(text)

    def close(self) -> None:
        self._bar.close()
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
