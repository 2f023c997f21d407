"""efficient_dlm: turn pretrained autoregressive LLMs into fast block-diffusion LLMs (JAX/TPU-first).

`pip install -e ".[test]"` gives the library, the `edlm` command, the test tools (lm-eval included) and
(on Linux) libtpu for `edlm aot`; `.[tpu]` alone adds libtpu to a plain install;
`pip install -e ".[serve]"` the library with the `edlm serve` HTTP stack; `pip install -e ".[eval]"` the library with lm-evaluation-harness (`edlm eval`, the lm-eval model `edlm`). The pins are one
mutually compatible set, checked together in CI; bump them together.
"""
from setuptools import find_packages, setup

CORE = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "grain==0.2.18",
    "tensorstore==0.1.86",
    "ml-collections==1.1.0",
    "safetensors==0.8.0",
    "tokenizers==0.23.3",
    "numpy>=2.0,<3",
    "absl-py>=2.1",
    "etils[epath]>=1.10",
    "tqdm>=4.66",
    "tensorboardX>=2.6",
    "pyarrow>=16",
    "array-record>=0.8",
    "matplotlib>=3.8",
    "qwix==0.1.8",  # quantized inference (sample.quantize, edlm quantize): per-channel int8 / fp8 weights
]
TEST = [
    "pytest==9.2.0",
    "pytest-xdist==3.8.0",
    "torch==2.13.0",
    "transformers==5.23.0",
    "nbclient>=0.10",
    "nbformat>=5.10",
    "ipykernel>=6.29",
    "lm_eval==0.4.13",  # tests/test_eval_*.py call lm-eval's own entry points
    "peft==0.21.2",  # tests/test_lora.py: PEFT loads `edlm export-hf --peft` adapters (the independent reference)
    # libtpu: the AOT tests and `edlm aot` compile for TPU topologies on any Linux host (no TPU needed).
    "jax[tpu]==0.10.2; sys_platform == 'linux'",
]
# `edlm serve`: the OpenAI-compatible HTTP server (FastAPI on uvicorn) and its Prometheus metrics.
SERVE = ["fastapi==0.165.0", "uvicorn==0.54.0", "prometheus_client==0.26.0", "transformers==5.23.0"]  # transformers: chat templates
TEST += SERVE + ["openai==3.57.0", "httpx2==2.16.2"]  # tests/test_serve_*.py talk to the server with the official client
EVAL = ["lm_eval==0.4.13", "torch==2.13.0", "transformers==5.23.0"]  # `edlm eval`, the lm-eval model `edlm`

setup(
    name="efficient_dlm",
    version="0.1.0",
    description="Convert pretrained AR LLMs into block-diffusion LLMs with JAX/Flax on TPU.",
    python_requires=">=3.11",
    packages=find_packages(include=["efficient_dlm", "efficient_dlm.*", "pallas_kernels", "pallas_kernels.*"]),
    include_package_data=True,
    package_data={"efficient_dlm": ["assets/**/*", "eval/tasks/*.yaml", "eval/tasks/*.jsonl", "eval/tasks/*.py"]},
    install_requires=CORE,
    extras_require={
        "test": TEST,
        "tpu": ["jax[tpu]==0.10.2"],
        "hub": ["huggingface_hub>=0.30"],
        "eval": EVAL,
        "serve": SERVE,
    },
    entry_points={
        "console_scripts": ["edlm=efficient_dlm.cli:main"],
        # lm-eval's plugin group (lm-eval releases after 0.4.13 discover it; with 0.4.13 use `python -m efficient_dlm.eval`)
        "lm_eval.models": ["edlm=efficient_dlm.eval.lm:EdlmLM"],
    },
)
