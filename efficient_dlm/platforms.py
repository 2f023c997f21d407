"""Keep libtpu quiet on hosts without TPUs.

With the `tpu` extra installed (libtpu; `edlm aot` needs it), JAX tries the TPU backend first on any
host, and on one without TPU chips libtpu prints start-up errors ("Failed to find host bounds for
accelerator type", "unexpected worker hostname ...") that look like failures although everything
then runs on the CPU. So when JAX_PLATFORMS is unset, libtpu is installed, no TPU chip (Google PCI
vendor 0x1ae0, as jax's own hardware_utils checks) and no GPU plugin is present, we select the CPU
platform before JAX starts a backend. `edlm aot` still reaches libtpu through
jax.experimental.topologies, which does not depend on the platform list.
"""
from __future__ import annotations

import glob
import importlib.util
import os
import sys

_GOOGLE_PCI_VENDOR = "0x1ae0"


def tpu_chips_present() -> bool:
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            with open(vendor) as f:
                if f.read().strip() == _GOOGLE_PCI_VENDOR:
                    return True
        except OSError:
            continue
    return bool(glob.glob("/dev/accel*"))


def _gpu_plugin_installed() -> bool:
    return any(importlib.util.find_spec(name) is not None for name in ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin"))


def quiet_libtpu() -> None:
    """Selects JAX_PLATFORMS=cpu when libtpu would only print noise (see the module docstring)."""
    if "JAX_PLATFORMS" in os.environ or importlib.util.find_spec("libtpu") is None:
        return
    if tpu_chips_present() or _gpu_plugin_installed():
        return
    os.environ["JAX_PLATFORMS"] = "cpu"
    if "jax" in sys.modules:  # imported already: its config read the environment at import
        sys.modules["jax"].config.update("jax_platforms", "cpu")
