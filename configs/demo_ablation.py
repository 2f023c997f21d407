"""`edlm ablate`: the demo recipe (configs/demo.py) per variant, at an equal token budget.

    edlm ablate --out runs/ablation [--config.demo.variants=block_clean,block16]

Variants are defined in efficient_dlm/demo/ablate.py. Every variant trains train.steps x
train.batch_size x data.seq_len tokens from the same teacher, data order and seed, and is decoded at
threshold 0.9 (the AR variant: greedily, token by token).
"""
import importlib.util
import os


def _demo():
    spec = importlib.util.spec_from_file_location("demo_recipe", os.path.join(os.path.dirname(__file__), "demo.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def get_config():
    c = _demo()
    c.demo.thresholds = "0.9"
    c.demo.hf_samples = 0
    return c
