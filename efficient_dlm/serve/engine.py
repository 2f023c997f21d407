"""The continuous-batching engine: a fixed set of slots advanced by one compiled step per call, on one thread.

Requests wait in a bounded queue (full: `QueueFull`, the HTTP layer's 429). Between calls, i.e. at
block boundaries, finished and cancelled requests leave their slots and waiting ones take the free
slots; every call then advances all occupied slots by one block (dLM) or one token (AR). All JAX work
runs on the engine thread, never on the web server's event loop: requests talk to it through
`submit` / `Request.cancel` and receive their tokens through `Request.on_tokens`, called on the
engine thread after every call that committed some (the web layer hops back to its loop).

Greedy requests get exactly what `generate(model, [prompt], ...)` gives them alone (tested): each
slot runs its own batch-of-one computation (step_program.py), however the other slots are filled.
With a verifier (an AR model, or "self") the engine serves lossless speculative decoding: every call
runs one draft + verify iteration per slot (speculative.py). Under a mesh the slots shard over the
data axes (runners.py).
"""
from __future__ import annotations

import collections
import dataclasses
import math
import threading
import time
from typing import Callable

import numpy as np

from efficient_dlm.diffusion.spec import resolve_decoding, spec_of
from efficient_dlm.errors import UserError
from efficient_dlm.sample.api import check_model, self_verified
from efficient_dlm.sample.layout import position_limit
from efficient_dlm.sample.choice import Sampling
from efficient_dlm.sample.program import MAX_STOP_TOKENS, Plan
from efficient_dlm.sample.speculative import check_verifier, spec_plan
from efficient_dlm.sample.strategies import STRATEGIES
from efficient_dlm.serve import slots as slots_lib
from efficient_dlm.serve import speculative as spec_lib
from efficient_dlm.serve.metrics import EngineMetrics
from efficient_dlm.serve.runners import BlockRunner, Placement, SpecRunner
from efficient_dlm.serve.step_program import SlotPlan


class QueueFull(Exception):
    """The waiting queue is at its bound; the client should retry later (HTTP 429)."""


class RequestError(ValueError):
    """A request the engine cannot run (HTTP 400); `param` names the offending field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclasses.dataclass
class Request:
    """One generation. on_tokens(new_tokens, finish_reason or None) returns True to stop it early (a
    stop string matched); it runs on the engine thread."""

    prompt: list[int]
    max_new: int
    settings: dict  # threshold, factor, entropy_bound, temperature, top_p, seed, stop_ids
    on_tokens: Callable[[list[int], str | None], bool | None]
    arrived: float = dataclasses.field(default_factory=time.perf_counter)
    first_token: float | None = None
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)

    def cancel(self) -> None:
        """Frees the request's slot at the next block boundary (client gone)."""
        self.cancelled.set()


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    slots: int = 8
    max_prompt_tokens: int = 256
    max_new_tokens: int = 256  # the most a request may ask for (sizes every slot's cache region)
    queue_size: int = 64
    strategy: str | None = None  # None: the model's spec ("ar" for a model without [MASK]; "speculative" with a verifier)
    block_size: int | None = None
    draft_steps: int = 1  # speculative: drafter denoising steps per draft, the last commits the rest

    def validate(self) -> None:
        for name in ("slots", "max_prompt_tokens", "max_new_tokens", "queue_size", "draft_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"serve: {name} must be an integer >= 1, got {value!r}")


@dataclasses.dataclass(frozen=True)
class Layout:
    """What an engine serves, decided before anything is allocated (`edlm aot --programs=serve` uses it
    with abstract models): the strategy, the request defaults, the slot geometry and the static plan."""

    strategy: str
    kind: str  # "diffusion" | "ar" | "speculative"
    defaults: dict
    geometry: slots_lib.SlotGeometry
    plan: SlotPlan | None = None  # diffusion / AR
    spec_geometry: spec_lib.SpecGeometry | None = None  # speculative
    spec: spec_lib.SpecSlotPlan | None = None


def engine_layout(model, config: EngineConfig, verifier=None) -> Layout:
    """Resolves the strategy (the model's spec; "ar" without [MASK]; "speculative" with a verifier) and
    the decoding settings as `generate` does, and sizes the slots."""
    config.validate()
    cfg, spec = model.config, spec_of(model)
    default = "speculative" if verifier is not None else (
        "ar" if cfg.mask_token_id is None else (spec.strategy if spec else "threshold"))
    strategy, verifier = self_verified(config.strategy or default, verifier)
    if strategy not in ("ar", "speculative", *STRATEGIES):
        raise UserError(f"serve: strategy must be ar, speculative or one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if strategy == "speculative":
        check_verifier(model, verifier, config.draft_steps)
    elif verifier is not None:
        raise UserError(f"serve: a verifier is used by strategy speculative only, got strategy {strategy!r}")
    check_model(model, strategy)
    d = resolve_decoding(None if strategy == "ar" else spec, block_size=config.block_size, strategy=strategy)
    kind = {"ar": "ar", "speculative": "speculative"}.get(strategy, "diffusion")
    size = 1 if kind == "ar" else int(d["block_size"])
    defaults = {"threshold": float(d["threshold"]), "factor": float(d["factor"]),
                "entropy_bound": float(d["entropy_bound"]), "temperature": 0.0, "top_p": 1.0, "seed": 0,
                "stop_ids": () if cfg.eos_token_id is None else (int(cfg.eos_token_id),)}
    pad_id = next((t for t in (cfg.pad_token_id, cfg.eos_token_id) if t is not None), 0)
    geometry = slots_lib.SlotGeometry(
        "ar" if kind == "ar" else "diffusion", config.slots, size, config.max_prompt_tokens, config.max_new_tokens,
        -1 if cfg.mask_token_id is None else cfg.mask_token_id, pad_id)
    if kind == "speculative":  # the plans `generate(..., strategy="speculative")` builds (greedy; sampled rows
        # get the sampled variant inside the program)
        plan = Plan(strategy="speculative", max_new_tokens=config.max_new_tokens, sampling=Sampling(greedy=True),
                    pad_id=pad_id, banned_ids=(cfg.mask_token_id,), valid_vocab_size=d["valid_vocab_size"],
                    vocab_size=cfg.vocab_size)
        plans = spec_plan(model, verifier, plan, block_size=size, num_blocks=1, draft_steps=config.draft_steps,
                          token_shift=bool(d["token_shift"]), valid_vocab_size=d["valid_vocab_size"])
        return Layout(strategy, kind, defaults, geometry, spec_geometry=spec_lib.SpecGeometry(geometry, plans.verify.pad_id),
                      spec=spec_lib.SpecSlotPlan(plans, False))
    plan = SlotPlan(
        kind=kind, strategy=strategy, block_size=size, tokens_per_step=int(d["tokens_per_step"]), sampled=False,
        entropy=strategy == "entropy", token_shift=bool(d["token_shift"]) and kind == "diffusion",
        vocab_size=cfg.vocab_size, banned_ids=() if cfg.mask_token_id is None else (cfg.mask_token_id,),
        valid_vocab_size=d["valid_vocab_size"])
    return Layout(strategy, kind, defaults, geometry, plan=plan)


class Engine:
    """Owns the model(s), the slots' KV caches (runners.py) and the engine thread (start / stop).

    verifier: an AR model or "self" serves strategy "speculative" (the output is the verifier's own
    decoding); mesh / rules: shard the slots over the mesh's data axes."""

    def __init__(self, model, config: EngineConfig = EngineConfig(), *, verifier=None, mesh=None, rules=None):
        layout = engine_layout(model, config, verifier)
        self.config, self.model, self.layout = config, model, layout
        self.strategy, self.kind, self.defaults, self.geometry = layout.strategy, layout.kind, layout.defaults, layout.geometry
        placement = Placement(mesh, rules)
        if layout.kind == "speculative":
            self.runner = SpecRunner(model, verifier, layout.spec_geometry, layout.spec, placement)
        else:
            self.runner = BlockRunner(model, layout.geometry, layout.plan, placement)
        self.slots: list[slots_lib.SlotState | None] = [None] * config.slots
        self.waiting: collections.deque[Request] = collections.deque()
        self.metrics = EngineMetrics(config.slots)
        self._wake = threading.Condition()
        self._running = False
        self._draining = False
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def _spec_runner(self, model, verifier, d: dict, pad_id: int, placement: Placement) -> SpecRunner:
        """The speculative plans as `generate(..., strategy="speculative")` builds them (greedy; sampled
        rows get the sampled variant in the program)."""
        cfg = model.config
        plan = Plan(strategy="speculative", max_new_tokens=self.config.max_new_tokens, sampling=Sampling(greedy=True),
                    pad_id=pad_id, banned_ids=(cfg.mask_token_id,), valid_vocab_size=d["valid_vocab_size"],
                    vocab_size=cfg.vocab_size)
        spec = spec_plan(model, verifier, plan, block_size=self.geometry.block_size, num_blocks=1,
                         draft_steps=self.config.draft_steps, token_shift=bool(d["token_shift"]),
                         valid_vocab_size=d["valid_vocab_size"])
        geometry = spec_lib.SpecGeometry(self.geometry, spec.verify.pad_id)
        return SpecRunner(model, verifier, geometry, spec_lib.SpecSlotPlan(spec, False), placement)

    # ---- requests -------------------------------------------------------------------------------
    def check(self, prompt: list[int], max_new: int, settings: dict) -> None:
        """Raises RequestError for a request this engine cannot run (before it is queued)."""
        cfg = self.model.config
        if not prompt:
            raise RequestError("the prompt is empty", "prompt")
        bad = [t for t in prompt if not 0 <= t < cfg.vocab_size]
        if bad:
            raise RequestError(f"prompt token id {bad[0]} is outside the vocabulary (size {cfg.vocab_size})", "prompt")
        if len(prompt) > self.config.max_prompt_tokens:
            raise RequestError(f"the prompt has {len(prompt)} tokens, more than this server's cache holds "
                               f"(max_prompt_tokens={self.config.max_prompt_tokens})", "prompt")
        if not 1 <= max_new <= self.config.max_new_tokens:
            raise RequestError(f"max_tokens must be in [1, {self.config.max_new_tokens}], got {max_new}", "max_tokens")
        limit = position_limit(cfg)
        if limit is not None and len(prompt) + max_new > limit:
            raise RequestError(f"prompt ({len(prompt)} tokens) plus max_tokens ({max_new}) exceeds the model's "
                               f"{limit} positions", "max_tokens")
        for name, low, high in (("threshold", 0.0, 1.0), ("top_p", 1e-12, 1.0)):
            if not (math.isfinite(settings[name]) and low <= settings[name] <= high):
                raise RequestError(f"{name} must be a finite number in [{low:g}, {high:g}], got {settings[name]}", name)
        for name in ("temperature", "factor", "entropy_bound"):
            if not (math.isfinite(settings[name]) and settings[name] >= 0):
                raise RequestError(f"{name} must be a finite number >= 0, got {settings[name]}", name)
        if len(settings["stop_ids"]) > MAX_STOP_TOKENS:
            raise RequestError(f"at most {MAX_STOP_TOKENS} stop token ids", "stop")

    def submit(self, request: Request) -> None:
        """Queues a checked request; QueueFull when the queue is at its bound, RuntimeError when draining."""
        self.check(request.prompt, request.max_new, request.settings)
        with self._wake:
            if self._draining or not self._running:
                raise RuntimeError("the server is shutting down")
            if len(self.waiting) >= self.config.queue_size:
                self.metrics.rejected.inc()
                raise QueueFull(f"{len(self.waiting)} requests are waiting (queue_size={self.config.queue_size})")
            self.waiting.append(request)
            self.metrics.queue_depth.set(len(self.waiting))
            self._wake.notify()

    def warmup(self, sampled: tuple[bool, ...] = (False, True)) -> int:
        """Compiles the step program for every chunk width (and sampling variant) before serving, so no
        request ever waits for a compilation; returns the number of programs. Empty slots write nothing."""
        return self.runner.warmup(slots_lib.build_knobs(self.slots, self.defaults), sampled)

    # ---- thread ---------------------------------------------------------------------------------
    def start(self) -> "Engine":
        self._running = True
        self._thread = threading.Thread(target=self._loop, name="edlm-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """drain: finish queued and in-flight requests first (SIGTERM); else cancel them."""
        with self._wake:
            self._draining = True
            if not drain:
                for request in list(self.waiting) + [s.request for s in self.slots if s is not None]:
                    request.cancel()
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def busy(self) -> bool:
        return bool(self.waiting) or any(s is not None for s in self.slots)

    def _loop(self) -> None:
        try:
            while True:
                with self._wake:
                    self._admit()
                    while not any(s is not None for s in self.slots):
                        if self._draining and not self.waiting:
                            self._running = False
                            return
                        self._wake.wait()
                        self._admit()
                self.step()
        except BaseException as err:  # noqa: BLE001 - an internal bug: fail every request, keep the traceback
            self.error = err
            self._running = False
            for request in list(self.waiting) + [s.request for s in self.slots if s is not None]:
                request.on_tokens([], "error")
            raise

    def _admit(self) -> None:
        """Frees cancelled slots and fills free ones from the queue (caller holds the lock)."""
        for i, slot in enumerate(self.slots):
            if slot is not None and slot.request.cancelled.is_set():
                self._leave(i, "cancelled")
        while self.waiting and None in self.slots:
            request = self.waiting.popleft()
            if request.cancelled.is_set():
                self.metrics.finished("cancelled")
                continue
            self.slots[self.slots.index(None)] = slots_lib.SlotState(
                request, np.asarray(request.prompt, np.int32), request.max_new)
        self.metrics.queue_depth.set(len(self.waiting))
        self.metrics.occupancy.set(sum(s is not None for s in self.slots))

    def _leave(self, index: int, reason: str) -> None:
        slot = self.slots[index]
        self.slots[index] = None
        self.metrics.finished(reason, time.perf_counter() - slot.request.arrived)

    def step(self) -> None:
        """One call of the step program over all slots, then the host-side bookkeeping."""
        knobs = slots_lib.build_knobs(self.slots, self.defaults)
        results = self.runner.step(self.slots, knobs)
        self.metrics.step(len(results), sum(forwards - int(knobs["forwards"][i]) for i, (_, _, forwards) in results.items()))
        if self.kind == "speculative":
            self.metrics.drafted(*self.runner.drafts)
        for i, (new, stopped, forwards) in results.items():
            self._advance(i, new, stopped, forwards)

    def _advance(self, index: int, new: list[int], stopped: bool, forwards: int) -> None:
        slot = self.slots[index]
        request = slot.request
        slot.generated += new
        slot.forwards = forwards
        self.metrics.generated.inc(len(new))
        if new and request.first_token is None:
            request.first_token = time.perf_counter()
            self.metrics.first_token.observe(request.first_token - request.arrived)
        reason = "stop" if stopped else ("length" if len(slot.generated) >= slot.max_new else None)
        if request.on_tokens(new, reason) and reason is None:
            reason = "stop"  # a stop string matched on the host
        if reason is not None or request.cancelled.is_set():
            with self._wake:
                self._leave(index, reason or "cancelled")
