"""SIGINT / SIGTERM end a training run cleanly instead of killing it mid-step.

The first signal only sets a flag: the loop finishes the step in flight, writes a checkpoint and
returns, and the CLI prints where to resume. A second signal restores the previous handler and
re-delivers itself (a second Ctrl-C interrupts at once). Handlers can be installed only from the
main thread; elsewhere (a notebook's worker thread) this is a no-op.
"""
from __future__ import annotations

import os
import signal
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def name(self) -> str | None:
        return signal.Signals(self.received).name if self.received else None

    def _handle(self, signum, frame) -> None:
        if self.received is not None:  # the second one: behave as if we were not here
            self.restore()
            os.kill(os.getpid(), signum)
            return
        self.received = signum

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def __exit__(self, *exc) -> None:
        self.restore()
