"""efficient_dlm: turn pretrained autoregressive LLMs into fast block-diffusion LLMs.

Public API (DESIGN.md "Contracts"): from_hf, Model, ModelConfig, save, load, generate, to_hf, quantize_model.
Heavy submodules are imported lazily so `import efficient_dlm` stays cheap.
"""
from __future__ import annotations

import importlib

from efficient_dlm.platforms import quiet_libtpu

quiet_libtpu()  # before anything starts a JAX backend: no libtpu start-up noise on hosts without TPUs

__version__ = "0.1.0"

_EXPORTS = {
    "Model": "efficient_dlm.models.decoder:Decoder",
    "ModelConfig": "efficient_dlm.models.config:ModelConfig",
    "init_model": "efficient_dlm.models.decoder:init_model",
    "from_hf": "efficient_dlm.port.hf_import:from_hf",
    "save": "efficient_dlm.checkpoints:save",
    "load": "efficient_dlm.checkpoints:load",
    "to_hf": "efficient_dlm.port.hf_export:to_hf",
    "generate": "efficient_dlm.sample.api:generate",
    "quantize_model": "efficient_dlm.models.quantize:quantize_model",
}


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'efficient_dlm' has no attribute {name!r}")
    module, attr = _EXPORTS[name].split(":")
    return getattr(importlib.import_module(module), attr)


__all__ = sorted(_EXPORTS)
