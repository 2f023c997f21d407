"""Training checkpoints: an orbax CheckpointManager over the run directory.

Layout of `run_dir`:
    model_config.json, tokenizer/      written once at the start (efficient_dlm.checkpoints format)
    <step>/params                      the model parameters (what `efficient_dlm.load(run_dir)` reads)
    <step>/train_state                 step, optimizer state, PRNG key
    <step>/data                        the grain iterator state, one file per process
    <step>/prompts                     the same for the OPD prompt iterator (runs with OPD steps)
Saves are asynchronous (device-to-host copy happens in `save`, the write in the background) and
atomic (orbax writes a temporary directory and renames it). Retention keeps the last
`train.keep_last` steps plus the one with the best evaluation loss.
"""
from __future__ import annotations

from typing import Any

import grain
import orbax.checkpoint as ocp
from etils import epath
from ml_collections import ConfigDict
from orbax.checkpoint import checkpoint_managers as policies

from efficient_dlm.train.state import TrainState

BEST_METRIC = "eval_loss"


class Checkpointer:
    """Saves and restores (TrainState, data iterator) under run_dir; one per run."""

    def __init__(self, run_dir: str, t: ConfigDict):
        keep = [policies.LatestN(n=t.keep_last)]
        if t.keep_best:
            keep.append(
                policies.BestN(
                    get_metric_fn=lambda m: m[BEST_METRIC], reverse=True, n=1, keep_checkpoints_without_metrics=False
                )
            )
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=t.async_checkpoint,
            preservation_policy=policies.AnyPreservationPolicy(keep),
            cleanup_tmp_directories=True,
            create=True,
        )
        self.directory = epath.Path(run_dir).absolute()
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, state: TrainState, iterators: dict[str, Any], metrics: dict[str, float] | None = None) -> None:
        """Saves the state and each named data iterator (e.g. {"data": text, "prompts": OPD prompts})."""
        step = int(state.step)
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(state.params),
            train_state=ocp.args.StandardSave({"step": state.step, "opt_state": state.opt_state, "rng": state.rng}),
            **{name: grain.checkpoint.CheckpointSave(it) for name, it in iterators.items()},
        )
        self.manager.save(step, args=args, metrics=metrics, force=True)

    def restore(self, step: int, target: TrainState, iterators: dict[str, Any]) -> TrainState:
        """The state at `step` laid out like `target` (abstract, possibly sharded); the named data
        iterators are restored in place."""
        rest = {"step": target.step, "opt_state": target.opt_state, "rng": target.rng}
        out = self.manager.restore(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardRestore(target.params),
                train_state=ocp.args.StandardRestore(rest),
                **{name: grain.checkpoint.CheckpointRestore(it) for name, it in iterators.items()},
            ),
        )
        ts: dict[str, Any] = out["train_state"]
        return TrainState(ts["step"], out["params"], ts["opt_state"], ts["rng"])

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
