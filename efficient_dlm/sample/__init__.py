"""Jitted samplers: block diffusion with an exact prefix KV cache and parallel decoding strategies,
and the AR baseline, behind one API (`generate`) and two verbs (`edlm sample`, `edlm bench`)."""
from efficient_dlm.sample.api import ALL_STRATEGIES, GenerateResult, generate

__all__ = ["ALL_STRATEGIES", "GenerateResult", "generate"]
