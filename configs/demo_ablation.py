"""`edlm ablate`: the demo recipe (configs/demo.py) per variant, at an equal token budget.

    edlm ablate --out runs/ablation [--config.demo.variants=block_clean,block8]

Variants are defined in efficient_dlm/demo/ablate.py. Every variant trains train.steps x
train.batch_size x data.seq_len tokens from the same teacher, data order and seed, and is decoded at
threshold 0.9 (the AR variant: greedily, token by token).
"""
from efficient_dlm.config import sibling_recipe


def get_config():
    c = sibling_recipe(__file__, "demo")
    c.demo.thresholds = "0.9"
    c.demo.hf_samples = 0
    return c
