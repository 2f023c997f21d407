"""Multi-host (multi-controller) runs: initialisation, process-aware logging, per-process batches.

JAX's own multi-controller model is the engine: every host runs the same program, `jax.distributed`
connects them, and global arrays are assembled from what each process holds. This module only decides
*when* to initialise, keeps progress output on process 0, and turns process-local batches into global
arrays. Checkpoint I/O needs nothing here: orbax writes and reads from all processes.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from efficient_dlm.errors import UserError
from efficient_dlm.parallel.sharding import batch_sharding

# Environment variables that mean "this process is one of several": set by our launch scripts
# (EDLM_DISTRIBUTED=1), by users (JAX_COORDINATOR_ADDRESS), by multi-slice TPU (MEGASCALE_*) or by
# TPU pod runtimes that list several workers.
_EXPLICIT = "EDLM_DISTRIBUTED"
_EXPECTED = "EDLM_EXPECTED_PROCESSES"  # set by launch/: the worker count every process must see
_HINTS = ("JAX_COORDINATOR_ADDRESS", "MEGASCALE_COORDINATOR_ADDRESS")

log = logging.getLogger("efficient_dlm")
_initialized = False


def requested(environ: Mapping[str, str] | None = None) -> bool:
    """True when the environment asks for a multi-process run (see the variables above)."""
    env = os.environ if environ is None else environ
    flag = env.get(_EXPLICIT, "").strip().lower()
    if flag in ("0", "false", "no"):
        return False
    if flag in ("1", "true", "yes"):
        return True
    if flag:
        raise UserError(f"{_EXPLICIT}={env[_EXPLICIT]!r}: use 1 or 0")
    if any(env.get(name) for name in _HINTS):
        return True
    return len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]) > 1


def initialize(environ: Mapping[str, str] | None = None) -> bool:
    """Calls `jax.distributed.initialize()` (cluster auto-detection) once, if requested. Returns
    whether this is a multi-process run. Must run before anything touches a JAX backend."""
    global _initialized
    if _initialized:
        return True
    if not requested(environ):
        return False
    jax.distributed.initialize()
    _initialized = True
    setup_logging()
    expected = (os.environ if environ is None else environ).get(_EXPECTED)
    if expected and int(expected) != jax.process_count():
        raise RuntimeError(f"{_EXPECTED}={expected} but {jax.process_count()} processes joined; is every worker running?")
    log.info("process %d of %d, %d local devices", jax.process_index(), jax.process_count(), jax.local_device_count())
    return True


def is_main() -> bool:
    """Only process 0 prints progress, writes reports and shows a progress bar."""
    return jax.process_index() == 0


def setup_logging(level: int = logging.INFO) -> None:
    """Process 0 logs at `level`; the others only warnings, each line tagged with its process."""
    logger = logging.getLogger("efficient_dlm")
    logger.setLevel(level if is_main() else logging.WARNING)
    if jax.process_count() > 1:
        for handler in logger.handlers or logging.getLogger().handlers:
            handler.setFormatter(logging.Formatter(f"[p{jax.process_index()}] %(levelname)s %(message)s"))


def local_rows(sharding: NamedSharding, global_shape: tuple[int, ...]) -> list[slice]:
    """The distinct row ranges (dimension 0) of a global array that this process's devices hold."""
    index_map = sharding.addressable_devices_indices_map(global_shape)
    rows = {(idx[0].start or 0, idx[0].stop or global_shape[0]) for idx in index_map.values()}
    return [slice(a, b) for a, b in sorted(rows)]


def local_batch_size(sharding: NamedSharding, global_batch: int, shape_rest: tuple[int, ...] = ()) -> int:
    """Rows this process must load per step for a global batch of `global_batch` rows."""
    return sum(s.stop - s.start for s in local_rows(sharding, (global_batch, *shape_rest)))


def global_batch(local: Mapping[str, np.ndarray] | Any, mesh: Mesh, global_batch_size: int) -> Any:
    """Turns this process's rows (a pytree of [local_rows, ...] arrays) into global jax.Arrays sharded
    like a batch (rows over the data-parallel axes). On one process it is a plain device_put."""

    def put(x):
        x = np.asarray(x)
        shape = (global_batch_size, *x.shape[1:])
        sharding = batch_sharding(mesh, x.ndim, shape)
        expected = local_batch_size(sharding, global_batch_size, x.shape[1:])
        if x.shape[0] != expected:
            raise UserError(
                f"process {jax.process_index()} holds {x.shape[0]} batch rows, the mesh needs {expected} "
                f"(global batch {global_batch_size} over {jax.process_count()} process(es))"
            )
        return jax.make_array_from_process_local_data(sharding, x, shape)

    return jax.tree.map(put, local)
