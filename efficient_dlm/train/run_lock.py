"""One writer per run directory: an exclusive lock file taken before a run touches run_dir.

Two trainers on one run_dir would both resume from its checkpoints, write the same steps and
interleave metrics. `RunLock` creates `run_dir/.edlm.lock` with O_EXCL holding the owner's pid and
host; a second run refuses with one line naming the holder. A lock whose pid is dead on this host is
stale (a killed run) and is taken over. Only the main process of a multi-host run takes it (the
others write through it). A remote run_dir (gs://...) has no atomic create here and is not locked.
"""
from __future__ import annotations

import json
import os
import socket
import time

from efficient_dlm.errors import UserError

LOCK_NAME = ".edlm.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


class RunLock:
    """Context manager; `acquire` raises UserError when another live process holds the lock."""

    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, LOCK_NAME)
        self.held = False

    def _holder(self) -> dict:
        try:
            with open(self.path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}

    def acquire(self) -> "RunLock":
        if "://" in self.path:
            return self
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                pid, host = holder.get("pid"), holder.get("host")
                if isinstance(pid, int) and host == me["host"] and not _alive(pid):
                    os.remove(self.path)  # stale: its process is gone
                    continue
                if not holder and time.time() - os.path.getmtime(self.path) > 5:
                    os.remove(self.path)  # empty / unreadable and not being written: stale
                    continue
                raise UserError(
                    f"{os.path.dirname(self.path)} is in use by another run (pid {pid} on {host}, started "
                    f"{holder.get('started', '?')}); stop it, or delete {self.path} if that process is gone"
                ) from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise UserError(f"{self.path}: could not take the run lock")

    def release(self) -> None:
        if self.held:
            self.held = False
            if self._holder().get("pid") == os.getpid():
                os.remove(self.path)

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
