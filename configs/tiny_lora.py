"""LoRA chat SFT of the tiny model on a laptop CPU: configs/tiny_sft.py with adapters on a frozen base.

    edlm train --config=configs/tiny_train.py --config.data.train_files=corpus.jsonl     # the base: runs/tiny_train
    edlm train --config=configs/tiny_lora.py --config.data.train_files=chat.jsonl
    edlm sample --config=configs/tiny_lora.py --ckpt=runs/tiny_lora --prompt="hello"   # base + adapters merged
    edlm export-hf --ckpt=runs/tiny_lora --out=export/tiny_lora --merge_lora
    edlm export-hf --ckpt=runs/tiny_lora --out=export/tiny_lora_peft --peft

Rank 8, alpha 16, on every attention and MLP projection; checkpoints hold the adapters only and
name the base (runs/tiny_train, with its checksum). Data, template and objective as configs/tiny_sft.py.
"""
from efficient_dlm.config import sibling_recipe


def get_config():
    c = sibling_recipe(__file__, "tiny_sft")  # chat data, builtin template, assistant turns supervised
    c.init.checkpoint = "runs/tiny_train"
    c.diffusion.mask_token = "model"  # tiny.py's [MASK] (511) is in the base vocabulary
    c.lora.rank = 8
    c.lora.alpha = 16.0
    c.lora.dropout = 0.05
    c.train.learning_rate = 3e-3  # adapters start at zero: a higher rate than full SFT's
    c.train.weight_decay = 0.0
    c.run_dir = "runs/tiny_lora"
    return c
