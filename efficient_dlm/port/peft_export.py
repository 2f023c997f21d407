"""`edlm export-hf --peft`: a LoRA run's adapters, unmerged, in PEFT's adapter format.

The directory holds adapter_config.json (peft_type LORA, r, lora_alpha, lora_dropout, and the exact
module names adapted as target_modules) and adapter_model.safetensors with PEFT's key names
(`base_model.model.<module>.lora_A.weight` [r, in], `.lora_B.weight` [out, r]), for the Hugging
Face model `edlm export-hf` writes from the run's base: `PeftModel.from_pretrained(base, dir)` or
`model.load_adapter(dir)` then computes what the run's adapters compute. Module names and the
[out, in] flattening of our [embed, heads, head_dim]-style weights come from the same keymaps table
as the weights' export (port/keymaps.py), so an adapter lands on the tensor its weight went to.
Routed experts export per expert (`mlp.experts.<j>.gate_proj`), the exported MoE's nn.Linear modules.
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from efficient_dlm import checkpoints
from efficient_dlm.errors import UserError
from efficient_dlm.models.adapters import split_adapted
from efficient_dlm.models.lora import SUFFIX_A, SUFFIX_B
from efficient_dlm.port import keymaps

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def peft_tensors(model) -> tuple[dict[str, np.ndarray], list[str]]:
    """({PEFT key: float32 array}, adapted module names) of an adapted model (load(..., merge_lora=False))."""
    cfg = model.config
    flat = {tuple(str(p) for p in path): v[...] for path, v in nnx.to_flat_state(split_adapted(model)[1])}
    tensors, modules = {}, []
    for rule in keymaps.rules_for(cfg):
        a = flat.get((*rule.path[:-1], rule.path[-1] + SUFFIX_A))
        if a is None:
            continue
        b = flat[(*rule.path[:-1], rule.path[-1] + SUFFIX_B)]
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        for name, index in keymaps.named_slices(rule, cfg):
            module = name.removesuffix(".weight")
            a_i, b_i = a[index], b[index]  # [contracted..., r], [r, remaining...]
            rank = a_i.shape[-1]
            tensors[f"base_model.model.{module}.lora_A.weight"] = np.ascontiguousarray(a_i.reshape(-1, rank).T)
            tensors[f"base_model.model.{module}.lora_B.weight"] = np.ascontiguousarray(b_i.reshape(rank, -1).T)
            modules.append(module)
    return tensors, modules


def to_peft(run_dir: str, out_dir: str, *, step: int | None = None, base_model: str = "", overwrite: bool = False) -> str:
    """Writes the adapters of LoRA run `run_dir` (its newest step, or `step`) as a PEFT adapter directory.
    base_model: what adapter_config.json names as base_model_name_or_path (the base's HF export)."""
    _, extra = checkpoints.read_model_config(run_dir)
    record = extra.get("lora")
    if not record:
        raise UserError(f"{run_dir}: not a LoRA run (no lora record in its model_config.json); --peft exports adapters")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise UserError(f"{out_dir}: directory is not empty (pass --overwrite to replace it)")
    tensors, modules = peft_tensors(checkpoints.load(run_dir, step=step, merge_lora=False))
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": record["rank"], "lora_alpha": record["alpha"],
        "lora_dropout": record["dropout"], "target_modules": modules, "bias": "none", "fan_in_fan_out": False,
        "use_rslora": False, "use_dora": False, "inference_mode": True, "base_model_name_or_path": base_model,
        "revision": None, "modules_to_save": None,
    }
    tmp = os.path.abspath(out_dir).rstrip(os.sep) + ".tmp-peft"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_file(tensors, os.path.join(tmp, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    with open(os.path.join(tmp, ADAPTER_CONFIG), "w") as f:
        json.dump(config, f, indent=2)
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir
