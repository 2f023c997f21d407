"""Block-diffusion training of the tiny MoE model (configs/tiny_moe.py) on a laptop CPU.

    edlm train --config=configs/tiny_moe_train.py --config.data.train_files=corpus.jsonl

Everything but the model is configs/tiny_train.py. The router's selection bias moves every step
(model.router_bias_update_rate); the load-balancing loss enters with model.router_aux_loss_coef.
The log shows expert_load_max / expert_load_min (1.0 = balanced) and expert_load_cv.
"""
import importlib.util
import os


def _recipe(name: str):
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def get_config():
    c = _recipe("tiny_train")
    c.model = _recipe("tiny_moe").model
    c.model.router_aux_loss_coef = 0.01
    c.model.router_bias_update_rate = 0.01
    c.run_dir = "runs/tiny_moe_train"
    return c
