"""`train(config)`: the training loop (data, jitted steps, evaluation, checkpoints, metrics).

The loop is thin host code around `make_train_step`: it resumes from the newest checkpoint in
run_dir (params, optimizer, step, PRNG key, data iterator), switches compiled step functions at the
block-size schedule's boundaries, reads each step's metrics, stops after
`train.max_nonfinite_steps` consecutive non-finite steps or when the parameter norm exceeds
`train.max_param_norm_ratio` times its value at the start of the call (NonFiniteError), evaluates on
a fixed set of held-out batches, and saves asynchronously (never a non-finite state). One writer per
run_dir (train/run_lock.py); SIGINT / SIGTERM stop after the current step with a checkpoint
(train/stop.py).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from typing import Any, Callable

import jax
import numpy as np
import optax

from efficient_dlm import checkpoints
from efficient_dlm.config import Config, ConfigLike, to_plain, typed
from efficient_dlm.data.chat import ChatEncoder, install_template
from efficient_dlm.data.pipeline import DataSpec, build_dataset, take
from efficient_dlm.diffusion.config import DiffusionConfig
from efficient_dlm.diffusion.schedule import block_size_at
from efficient_dlm.diffusion.spec import spec_from_recipe
from efficient_dlm.models.config import ModelConfig
from efficient_dlm.models.lora import LoraConfig
from efficient_dlm.parallel import distributed
from efficient_dlm.parallel import mesh as mesh_lib
from efficient_dlm.parallel.rules import axis_rules
from efficient_dlm.models.adapters import add_adapters
from efficient_dlm.train import model_init, opd_loop
from efficient_dlm.train.lora import require_base, run_record
from efficient_dlm.errors import UserError
from efficient_dlm.parallel.distributed import is_main
from efficient_dlm.train.checkpointing import BEST_METRIC, Checkpointer
from efficient_dlm.train.config import TrainConfig
from efficient_dlm.train.metrics import MetricsLogger
from efficient_dlm.train.optim import make_optimizer
from efficient_dlm.train.run_lock import RunLock
from efficient_dlm.train.stop import StopSignals
from efficient_dlm.train.state import (
    TrainState, abstract_state, cast_base, create_state, params_finite, split_model, state_shardings,
)
from efficient_dlm.train.step import make_eval_step, make_train_step, step_settings, summarize

BatchTransform = Callable[[int, dict[str, np.ndarray]], dict[str, np.ndarray]]


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with non-finite loss or gradients, or a diverging parameter norm."""


@dataclasses.dataclass
class TrainResult:
    state: TrainState
    model_config: ModelConfig
    history: list[dict[str, float]]  # one entry per step run in this call
    evals: list[dict[str, float]]
    run_dir: str
    skipped_steps: int
    resumed_from: int | None = None  # the checkpoint step this call restored
    stopped_by: str | None = None  # "SIGINT" / "SIGTERM" when a signal ended the run early


def data_spec(config: Config, cfg: ModelConfig, tokenizer: str | None) -> DataSpec:
    d, t = config.data, config.train
    count = jax.process_count()
    if t.batch_size % count:
        raise UserError(f"train.batch_size ({t.batch_size}) must be a multiple of the process count ({count})")
    return DataSpec(
        seq_len=d.seq_len,
        batch_size=t.batch_size // count,
        eos_id=cfg.eos_token_id,
        vocab_size=cfg.vocab_size,
        tokenizer=tokenizer or "",
        text_key=d.text_key,
        packing=d.packing,
        bos_id=cfg.bos_token_id if d.add_bos else None,
        pad_id=cfg.pad_token_id if cfg.pad_token_id is not None else (cfg.eos_token_id or 0),
        seed=config.seed,
        num_threads=d.num_threads,
        prefetch=d.prefetch,
        format=d.format,
        chat_template=d.chat_template,
        align=chat_alignment(config),
    )


def chat_alignment(config: Config) -> int:
    """Chat conversations start at a multiple of every block size the run trains with (the schedule's
    least common multiple), so each turn's blocks are where the sampler puts them (METHOD.md section 11)."""
    d = config.diffusion
    if config.data.format != "chat" or not d.has_blocks:
        return 1
    return math.lcm(*(size for _, size in d.block_sizes()))


def _build_data(config: Config, spec: DataSpec, train: bool):
    files = config.data.train_files if train else config.data.eval_files
    return build_dataset(
        files, spec, weights=config.data.train_weights if train else "", train=train,
        process_index=jax.process_index(), process_count=jax.process_count(),
    )


def _numerics(model: ModelConfig) -> dict[str, Any]:
    return {name: getattr(model, name) for name in model_init.NUMERIC_FIELDS}


class _Run:
    """Mutable pieces of one train() call, so the loop body stays short.

    `config` is the typed Config the steps are built from and the run records (model_config.json's
    train_config); only diffusion.valid_vocab_size changes, once the model decides it."""

    def __init__(self, config: Config, mesh, batch_transform: BatchTransform | None):
        self.config, self.mesh, self.batch_transform = config, mesh, batch_transform
        self.t = config.train
        self.run_dir = os.path.abspath(config.run_dir)
        self.tx = make_optimizer(self.t)
        self.lora = config.lora.adapters()  # None: full fine-tuning
        self.frozen = None  # LoRA: the frozen base state (TrainState.frozen)
        self.schedule = config.diffusion.block_sizes()
        self.step_fns: dict[int | None, Callable] = {}
        self.eval_fns: dict[int | None, Callable] = {}
        self.history: list[dict[str, float]] = []
        self.evals: list[dict[str, float]] = []
        self.skipped = 0
        self.text = config.diffusion.objective != opd_loop.OBJECTIVE  # OPD alone reads prompts, no text
        self.data_iter = None
        self.opd: opd_loop.OPDRun | None = None
        self.resumed_from: int | None = None
        self.stopped_by: str | None = None
        self.initial_norm = 0.0
        self.ckpt = Checkpointer(self.run_dir, self.t)  # last: nothing above can fail with it open

    # ---- setup ----------------------------------------------------------------------------------

    def setup(self) -> None:
        """Model, state and data iterator: restored from the newest checkpoint, or built fresh."""
        latest = self.ckpt.latest_step()
        if latest is not None and not self.t.resume:
            raise UserError(f"{self.run_dir} already holds checkpoints; set train.resume=True or a new run_dir")
        if self.config.opd.enabled(self.config.diffusion.objective):
            opd_loop.check_inputs(self.config.opd)
        tokenizer = self._resume(latest) if latest is not None else self._start()
        spec = data_spec(self.config, self.cfg, tokenizer)
        if latest is not None and self.text:
            self.data_iter = iter(_build_data(self.config, spec, True))
        if self.config.opd.enabled(self.config.diffusion.objective):
            self.opd = opd_loop.OPDRun(self.config, self.cfg, tokenizer, self.mesh)
        if latest is not None:
            if self.ckpt.verify(latest):
                print(f"step {latest} had no checksums (the run stopped before recording them); recorded them now")
            self.state = self.ckpt.restore(latest, self._restore_target(), self.iterators()).replace(frozen=self.frozen)
            self.resumed_from = latest
        if self.t.max_param_norm_ratio:
            self.initial_norm = float(jax.jit(optax.tree.norm)(self.state.params))
        text_eval = self.text and self.config.data.eval_files  # OPD alone evaluates on opd.eval_files
        self.eval_batches = take(_build_data(self.config, spec, False), self.t.eval_batches) if text_eval else []

    def _resume(self, latest: int) -> str | None:
        """Reads the run's model config (architecture fixed at its start); returns the tokenizer path."""
        cfg, extra = checkpoints.read_model_config(self.run_dir)
        check_same_architecture(self.config.model, extra.get("train_config") or {}, self.run_dir)
        self.cfg = cfg.replace(**_numerics(self.config.model))
        self._set_valid_vocab(extra.get("valid_vocab_size"))
        if self.lora is not None or extra.get("lora"):
            self.frozen = self._lora_base(extra.get("lora"))
        return checkpoints.tokenizer_dir(self.run_dir) or self.config.init.tokenizer

    def _start(self) -> str | None:
        """A new run: opens the data first (a bad path or tokenizer fails before any weights load),
        loads the model, records model_config.json and the tokenizer, builds the initial state."""
        if self.lora is not None:
            require_base(self.config.init)
        source_cfg = model_init.source_config(self.config)
        model_init.check_mask_token(self.config.diffusion, source_cfg)
        tokenizer = self.config.init.tokenizer or self._source_tokenizer()
        if self.text:
            self.data_iter = iter(_build_data(self.config, data_spec(self.config, source_cfg, tokenizer), True))
        init = model_init.prepare_model(self.config, self.mesh)
        self.cfg = init.model.config
        self._set_valid_vocab(init.valid_vocab_size)
        extra = {"valid_vocab_size": init.valid_vocab_size, "source": init.source, "train_config": to_plain(self.config)}
        if self.lora is not None:  # adapters on the frozen base; the run records which base
            add_adapters(init.model, self.lora, self.config.seed)
            extra["lora"] = run_record(self.lora, self.config.init)
        checkpoints.write_model_config(self.run_dir, self.cfg, extra)
        spec = spec_from_recipe(extra["train_config"], self.cfg, init.valid_vocab_size)
        if spec is not None:  # what load / generate / export read: the run decodes as it trains
            checkpoints.write_diffusion_spec(self.run_dir, spec)
        copied = checkpoints.copy_tokenizer(_tokenizer_folder(init.tokenizer_dir), self.run_dir)
        if copied and self.config.data.format == "chat" and self.config.data.chat_template:
            encoder = ChatEncoder(copied, eos_id=self.cfg.eos_token_id, chat_template=self.config.data.chat_template)
            install_template(copied, encoder.template, encoder.hf.eos_token)  # sample --chat / serve render as trained
        self.state = create_state(init.model, self.tx, self.config.seed, self.mesh, self.lora)
        return init.tokenizer_dir

    def _lora_base(self, record: dict | None):
        """The frozen base state of a resumed LoRA run: the recorded base, checked unchanged, loaded with
        the recipe's numerics as at the start; the lora section must be the one the run started with."""
        started = None if record is None else {k: v for k, v in record.items() if k != "base"}
        now = None if self.lora is None else {**dataclasses.asdict(self.lora), "targets": list(self.lora.targets)}
        if started is None or now is None or {**started, "targets": list(started["targets"])} != now:
            raise UserError(f"lora is {now} but the run in {self.run_dir} started with {started}; the adapters "
                            "cannot change on resume (use a new run_dir)")
        base = checkpoints.lora_base(record["base"], self.mesh, self.run_dir, **model_init.numeric_overrides(self.config.model))
        return cast_base(split_model(base)[1], self.lora)

    def _set_valid_vocab(self, size: int | None) -> None:
        """diffusion.valid_vocab_size as the model decides it (an appended [MASK] row)."""
        self.config = dataclasses.replace(self.config, diffusion=self.config.diffusion.replace(valid_vocab_size=size))

    def iterators(self) -> dict[str, Any]:
        """The run's data iterators by checkpoint item name (text batches, OPD prompts)."""
        named = {"data": self.data_iter, opd_loop.OPDRun.ITERATOR_NAME: self.opd and self.opd.iterator}
        return {name: it for name, it in named.items() if it is not None}

    def _source_tokenizer(self) -> str | None:
        if self.config.init.checkpoint:
            return checkpoints.tokenizer_dir(self.config.init.checkpoint)
        hf = self.config.init.hf_dir
        return hf if hf and os.path.exists(os.path.join(hf, "tokenizer.json")) else None

    def _restore_target(self) -> TrainState:
        target = abstract_state(self.cfg, self.tx, self.config.seed, self.lora)
        if self.mesh is None:
            return target
        shardings = state_shardings(self.cfg, self.tx, self.mesh, self.lora)
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), target, shardings)

    # ---- per step -------------------------------------------------------------------------------

    def block_size(self, step: int) -> int | None:
        """The block size in force at `step`; None for objectives without blocks (ar, bidirectional)."""
        return block_size_at(self.schedule, step) if self.config.diffusion.has_blocks else None

    def step_fn(self, block_size):
        if block_size not in self.step_fns:
            self.step_fns[block_size] = cached_step(
                make_train_step, self.config.diffusion, self.t, self.cfg, block_size, self.lora)
        return self.step_fns[block_size]

    def device_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        if self.mesh is None:
            return jax.device_put(batch)
        return distributed.global_batch(batch, self.mesh, self.t.batch_size)

    def has_eval(self) -> bool:
        return bool(self.eval_batches or (self.opd and self.opd.eval_batches))

    def evaluate(self, step: int) -> dict[str, float]:
        """Held-out text metrics (loss, nll, accuracy, ...) and/or OPD prompt metrics (kl, ...); "loss" is
        the text loss, else the KL, and selects the best checkpoint."""
        out = self.evaluate_text(self.block_size(step)) if self.eval_batches else {}
        if self.opd and self.opd.eval_batches:
            opd = self.opd.evaluate(self.state.params, step, self.device_batch, self.state.frozen)
            loss = opd.pop("loss")  # the KL (or the self target's trajectory NLL) unless text set one
            out.update(opd)
            out.setdefault("loss", loss)
        return out

    def evaluate_text(self, block_size) -> dict[str, float]:
        if block_size not in self.eval_fns:
            self.eval_fns[block_size] = cached_step(
                make_eval_step, self.config.diffusion, self.t, self.cfg, block_size, self.lora)
        fn, key = self.eval_fns[block_size], jax.random.PRNGKey(self.config.seed + 1)
        totals = None
        for j, batch in enumerate(self.eval_batches):
            sums = fn(self.state.params, self.device_batch(batch), jax.random.fold_in(key, j), self.state.frozen)
            totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
        totals = jax.device_get(totals)
        out = {k: float(v) for k, v in summarize(totals).items()}
        return {"loss": float(totals["loss"] / max(totals["count"], 1.0)), **out}

    def save(self, metrics: dict[str, float] | None) -> None:
        if not params_finite(self.state):
            raise NonFiniteError(f"step {int(self.state.step)}: parameters are not finite; refusing to write a checkpoint")
        self.ckpt.save(self.state, self.iterators(), metrics)


_COMPILED: dict[tuple, Callable] = {}


def cached_step(
    factory, diffusion: DiffusionConfig, train: TrainConfig, cfg: ModelConfig, block_size: int | None,
    lora: LoraConfig | None = None,
) -> Callable:
    """`factory(diffusion, train, cfg, lora=..., block_size=...)`, reused across train() calls in one process
    while the settings that shape the step (the frozen diffusion and lora sections, train.step_settings) are
    unchanged: a resumed or repeated run in the same process does not recompile."""
    key = (factory.__name__, diffusion, lora, step_settings(train), cfg, block_size)
    if key not in _COMPILED:
        _COMPILED[key] = factory(diffusion, train, cfg, lora=lora, block_size=block_size)
    return _COMPILED[key]


def _tokenizer_folder(path: str | None) -> str | None:
    """The directory holding the tokenizer files (init.tokenizer may name tokenizer.json itself)."""
    return os.path.dirname(path) if path and os.path.isfile(path) else path


def check_same_architecture(model: ModelConfig, started: dict, run_dir: str) -> None:
    """A resumed run keeps the architecture it started with: a model key that differs from the run's
    recorded start config is an error, not silently ignored (numerics may change)."""
    before = started.get("model") or {}
    for key, value in model.to_dict().items():
        if key in model_init.NUMERIC_FIELDS or key not in before:
            continue
        if value != before[key] and not (isinstance(value, (list, tuple)) and list(value) == before[key]):
            raise UserError(
                f"model.{key} is {value!r} but the run in {run_dir} started with {before[key]!r}; the architecture "
                "cannot change on resume (use a new run_dir)"
            )


def train(config: ConfigLike, *, mesh=None, batch_transform: BatchTransform | None = None) -> TrainResult:
    """Runs (or resumes) the training described by `config` until train.steps; returns the final state.

    config: the typed Config, or the CLI's ConfigDict (converted here, once, by `typed`).
    mesh: a jax.sharding.Mesh to shard state and batches over (None: default device).
    batch_transform(step, batch) -> batch: applied to each host batch before it goes to the device.
    SIGINT / SIGTERM (main thread) end the loop after the current step with a checkpoint; the result
    says which signal (`stopped_by`).
    """
    config = typed(config)  # every section checked before the run directory is locked
    lock = RunLock(os.path.abspath(config.run_dir))
    if is_main():
        lock.acquire()
    run, logger = None, None
    try:
        with StopSignals() as stop, axis_rules(mesh_lib.config_rules(config.mesh)):  # mesh.rules: shardings
            run = _Run(config, mesh, batch_transform)
            run.setup()  # models and state are built outside the mesh context (state_shardings places them)
            t = run.t
            logger = MetricsLogger(run.run_dir, total_steps=t.steps, start_step=int(run.state.step),
                                   tensorboard=t.tensorboard, progress=t.progress)
            with mesh_lib.use(mesh) if mesh is not None else contextlib.nullcontext():
                _loop(run, logger, stop)
    finally:
        try:
            if run is not None:
                run.ckpt.close()
        finally:
            if logger is not None:
                logger.close()
            lock.release()
    return TrainResult(run.state, run.cfg, run.history, run.evals, run.run_dir, run.skipped, run.resumed_from, run.stopped_by)


def _loop(run: _Run, logger: MetricsLogger, stop: StopSignals) -> None:
    t, config = run.t, run.config
    step = int(run.state.step)
    tokens_per_step = t.batch_size * config.data.seq_len
    if run.resumed_from is not None:
        logger.message(f"resumed {run.run_dir} from step {run.resumed_from}")
    run.stopped_by = None
    while step < t.steps and not stop.received:
        _one_step(run, logger, step, tokens_per_step)
        step += 1
        evaluation = None
        if run.has_eval() and ((t.eval_every and step % t.eval_every == 0) or step == t.steps):
            evaluation = run.evaluate(step - 1)
            run.evals.append({"step": step, **evaluation})
            logger.write(step, evaluation, "eval")
            shown = [k for k in ("loss", "accuracy", "kl", "teacher_accuracy", "trajectory_nll") if k in evaluation]
            logger.message(f"step {step}: eval " + " ".join(f"{k} {evaluation[k]:.4f}" for k in shown))
        if step % t.save_every == 0 or step == t.steps or evaluation is not None or stop.received:
            run.save({BEST_METRIC: evaluation["loss"]} if evaluation else None)
    run.ckpt.wait()
    if stop.received:
        run.stopped_by = stop.name
        saved = run.ckpt.latest_step()
        where = f"checkpoint step {saved} in {run.run_dir}" if saved is not None else f"no checkpoint in {run.run_dir}"
        logger.message(f"{stop.name}: stopped after step {step}; {where}; run the same command to resume")


def _one_step(run: _Run, logger: MetricsLogger, step: int, tokens_per_step: int) -> None:
    opd = run.opd is not None and opd_loop.is_opd_step(run.config, step)
    if opd:  # on-policy distillation: prompts in, the student's rollouts are the batch (train/opd.py)
        block_size, fn, batch = run.config.opd.block_size, run.opd.step_fn(step), next(run.opd.iterator)
    else:
        block_size = run.block_size(step)
        fn, batch = run.step_fn(block_size), next(run.data_iter)
    if run.batch_transform is not None:
        batch = run.batch_transform(step, batch)
    batch = run.device_batch(batch)
    start = time.perf_counter()
    run.state, metrics = fn(run.state, batch, jax.random.fold_in(run.state.rng, step))
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    elapsed = time.perf_counter() - start
    tokens = metrics["tokens"] if opd else tokens_per_step
    metrics.update(step_time=elapsed, tokens_per_s=tokens / elapsed, block_size=block_size or 0)
    if run.opd is not None:
        metrics["opd"] = float(opd)
    run.history.append({"step": step + 1, **metrics})
    if metrics["skipped"]:
        run.skipped += 1
        streak = int(metrics["nonfinite_streak"])
        logger.message(f"step {step + 1}: non-finite loss or gradients; update skipped ({streak} in a row)")
        if streak >= run.t.max_nonfinite_steps:
            _stop(run, f"stopped at step {step + 1}: {streak} consecutive steps with non-finite loss or gradients "
                       f"(train.max_nonfinite_steps={run.t.max_nonfinite_steps})")
    _check_param_norm(run, step + 1, metrics.get("param_norm"))
    if (step + 1) % run.t.log_every == 0 or step + 1 == run.t.steps or metrics["skipped"]:
        logger.write(step + 1, metrics)
    logger.advance(step + 1, metrics["loss"], metrics["tokens_per_s"])


def _check_param_norm(run: _Run, step: int, norm: float | None) -> None:
    """The divergence guard beside the non-finite one: a learning rate far too high leaves finite but
    exploding parameters (no NaN) that would otherwise be checkpointed as if nothing happened."""
    ratio = run.t.max_param_norm_ratio
    if not ratio or norm is None or not run.initial_norm or norm <= ratio * run.initial_norm:
        return
    _stop(run, f"stopped at step {step}: parameter norm {norm:.4g} is {norm / run.initial_norm:.3g} times its value at "
               f"the start ({run.initial_norm:.4g}; train.max_param_norm_ratio={ratio:g}, 0 disables), so "
               f"train.learning_rate {run.t.learning_rate:g} is likely too high")


def _stop(run: _Run, reason: str) -> None:
    """Raises NonFiniteError(reason + the last checkpoint), once the saves in flight are final."""
    run.ckpt.wait()
    latest = run.ckpt.latest_step()
    raise NonFiniteError(f"{reason}; last checkpoint: {'none' if latest is None else f'step {latest}'}")
