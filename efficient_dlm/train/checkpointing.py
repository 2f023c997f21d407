"""Training checkpoints: an orbax CheckpointManager over the run directory.

Layout of `run_dir`:
    model_config.json, tokenizer/      written once at the start (efficient_dlm.checkpoints format)
    <step>/params                      the model parameters (what `efficient_dlm.load(run_dir)` reads)
    <step>/train_state                 step, optimizer state, PRNG key
    <step>/data                        the grain iterator state, one file per process
    <step>/prompts                     the same for the OPD prompt iterator (runs with OPD steps)
    <step>/checksums.json              size and CRC-32 of every file of the step (efficient_dlm.integrity)
Saves are asynchronous (device-to-host copy happens in `save`, the write in the background) and
atomic (orbax writes a temporary directory and renames it). A step's checksums are recorded once its
write is final (at the next save, `wait` or `close`) and verified before it is restored. Retention
keeps the last `train.keep_last` steps plus the one with the best evaluation loss.
"""
from __future__ import annotations

from typing import Any

import grain
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers as policies

from efficient_dlm import integrity
from efficient_dlm.parallel.distributed import is_main
from efficient_dlm.train.config import TrainConfig
from efficient_dlm.train.state import TrainState

BEST_METRIC = "eval_loss"


class Checkpointer:
    """Saves and restores (TrainState, data iterator) under run_dir; one per run."""

    def __init__(self, run_dir: str, t: TrainConfig):
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
        self._unrecorded: list[int] = []  # saved steps whose checksums are not written yet

    def _record_finished(self) -> None:
        """Waits for the write in flight, then records the checksums of every step saved since."""
        self.manager.wait_until_finished()
        for step in self._unrecorded:
            if is_main() and (self.directory / str(step)).exists():  # retention may have removed it
                integrity.record(self.directory / str(step))
        self._unrecorded = []

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, state: TrainState, iterators: dict[str, Any], metrics: dict[str, float] | None = None) -> None:
        """Saves the state and each named data iterator (e.g. {"data": text, "prompts": OPD prompts})."""
        step = int(state.step)
        self._record_finished()
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(state.params),
            train_state=ocp.args.StandardSave({"step": state.step, "opt_state": state.opt_state, "rng": state.rng}),
            **{name: grain.checkpoint.CheckpointSave(it) for name, it in iterators.items()},
        )
        self.manager.save(step, args=args, metrics=metrics, force=True)
        self._unrecorded.append(step)

    def verify(self, step: int) -> bool:
        """Checks `step` against its checksums; a finalized step without them (the run stopped between
        orbax's atomic rename and recording them) gets them now. Returns whether they were just recorded."""
        root = self.directory / str(step)
        recorded = False
        if root.exists() and not integrity.has_manifest(root) and is_main():
            integrity.record(root)
            recorded = True
        integrity.verify(root, f"{self.directory} step {step}")
        return recorded

    def restore(self, step: int, target: TrainState, iterators: dict[str, Any]) -> TrainState:
        """The state at `step` laid out like `target` (abstract, possibly sharded); the named data
        iterators are restored in place. Verify the step first (`verify`)."""
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
        self._record_finished()

    def close(self) -> None:
        try:
            self._record_finished()
        finally:
            self.manager.close()
