"""Block-diffusion training of the tiny MoE model (configs/tiny_moe.py) on a laptop CPU.

    edlm train --config=configs/tiny_moe_train.py --config.data.train_files=corpus.jsonl

Everything but the model is configs/tiny_train.py. The router's selection bias moves every step
(model.router_bias_update_rate); the load-balancing loss enters with model.router_aux_loss_coef.
The log shows expert_load_max / expert_load_min (1.0 = balanced) and expert_load_cv.
"""
from efficient_dlm.config import sibling_recipe


def get_config():
    c = sibling_recipe(__file__, "tiny_train")
    c.model = sibling_recipe(__file__, "tiny_moe").model
    c.model.router_aux_loss_coef = 0.01
    c.model.router_bias_update_rate = 0.01
    c.run_dir = "runs/tiny_moe_train"
    return c
