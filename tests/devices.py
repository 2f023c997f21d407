"""How the suite runs XLA:CPU: cheap code generation, and the environment of subprocesses on fake devices.

The suite is compile-bound (tiny models, each program run a few times), and LLVM's optimisation passes are
most of an XLA:CPU compile, so every test process, subprocesses included, compiles at -O0 without the
expensive passes: about a third less wall time. The HLO XLA runs is the same (its passes run as always);
only the machine code of each kernel is less optimised, and floating-point semantics do not change (no
fast-math either way). Benchmarks and `edlm` itself never set these flags.
"""
from __future__ import annotations

import os

CHEAP_CODEGEN = ("--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def with_flags(flags: str, extra: tuple[str, ...]) -> str:
    """XLA_FLAGS `flags` with each of `extra` appended unless already present."""
    present = flags.split()
    return " ".join(present + [flag for flag in extra if flag not in present])


def subprocess_env(devices: int = 1, **extra: str) -> dict[str, str]:
    """This process's environment for a CPU subprocess of the suite: the repository importable, JAX on CPU
    with `devices` fake host devices, the suite's XLA flags kept; `extra` variables on top."""
    flags = with_flags(os.environ.get("XLA_FLAGS", ""), CHEAP_CODEGEN)
    if devices > 1:
        flags = with_flags(flags, (f"--xla_force_host_platform_device_count={devices}",))
    return {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags, **extra}
