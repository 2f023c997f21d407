"""LoRA on the tiny model on a laptop CPU: adapters on a frozen base from configs/tiny_train.py.

    edlm train --config=configs/tiny_train.py --config.data.train_files=corpus.jsonl     # the base: runs/tiny_train
    edlm train --config=configs/tiny_lora.py --config.data.train_files=chat.jsonl
    edlm sample --ckpt=runs/tiny_lora --prompt="..."                 # the base with the adapters merged
    edlm export-hf --ckpt=runs/tiny_lora --out=export/tiny_lora --merge_lora
    edlm export-hf --ckpt=runs/tiny_lora --out=export/tiny_lora_peft --peft

Rank 8, alpha 16, on every attention and MLP projection; checkpoints hold the adapters only and
name the base (runs/tiny_train, with its checksum).
"""
from efficient_dlm.config import sibling_recipe


def get_config():
    c = sibling_recipe(__file__, "tiny_train")
    c.init.checkpoint = "runs/tiny_train"
    c.init.tokenizer = ""  # the base run's tokenizer
    c.diffusion.mask_token = "model"  # tiny.py's [MASK] (511) is in the base vocabulary
    c.data.format = "chat"  # chat SFT (README, Chat SFT): only assistant turns supervised
    c.data.chat_template = "builtin"  # the byte tokenizer ships no chat template
    c.lora.rank = 8
    c.lora.alpha = 16.0
    c.lora.dropout = 0.05
    c.train.steps = 100
    c.train.learning_rate = 3e-3
    c.train.weight_decay = 0.0
    c.run_dir = "runs/tiny_lora"
    return c
