"""Chat SFT of the tiny model on a laptop CPU (tests, smoke runs): block diffusion on assistant turns only.

    edlm train --config=configs/tiny_sft.py --config.data.train_files=chat.jsonl [--config.init.checkpoint=RUN]
    edlm sample --config=configs/tiny_sft.py --ckpt runs/tiny_sft --prompt "hello"    # rendered as a user turn

chat.jsonl holds {"messages": [{"role": ..., "content": ...}, ...]} or {"prompt": ..., "response": ...}
per line (README, Chat SFT). The byte tokenizer ships no chat template, so the builtin one is used
("<|role|>" + content + <eos> per turn; efficient_dlm/data/chat.py) and written into the run's tokenizer/.
Start from a block-diffusion run with --config.init.checkpoint (configs/tiny_train.py), or from random
weights as here for the mechanics.
"""
from efficient_dlm.config import sibling_recipe


def get_config():
    c = sibling_recipe(__file__, "tiny_train")
    c.data.format = "chat"
    c.data.chat_template = "builtin"
    c.data.seq_len = 128  # whole conversations per row (first-fit packed, each starting on a block boundary)
    c.train.steps = 100
    c.train.learning_rate = 3e-4  # SFT: smaller than continued pretraining's 1e-3
    c.train.warmup_steps = 10
    c.train.save_every = 50
    c.train.eval_every = 0
    c.sample.chat = True  # edlm sample renders prompts as user turns
    c.run_dir = "runs/tiny_sft"
    return c
