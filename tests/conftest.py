"""Test setup: CPU only (cheap code generation: tests/devices.py), float32 matmuls exact enough for 1e-4 parity,
no network."""
import os

import pytest

from tests.devices import CHEAP_CODEGEN, with_flags

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["XLA_FLAGS"] = with_flags(os.environ.get("XLA_FLAGS", ""), CHEAP_CODEGEN)  # tests/devices.py: why

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory):
    """(directory, torch model) of one tiny random Qwen2 (q/k/v bias) saved as HF safetensors, float32.

    Shared read-only by the import, checkpoint and CLI tests; tests that damage a checkpoint copy it.
    """
    from tests.hf_factory import make_hf_model

    directory = tmp_path_factory.mktemp("hf_qwen2")
    return str(directory), make_hf_model("qwen2_bias", str(directory))


@pytest.fixture(scope="session")
def tiny_model():
    """A random tests.hf_factory.tiny_config() model (seed 0); shared, do not modify it."""
    from tests.hf_factory import random_model, tiny_config

    return random_model(tiny_config(), seed=0)
