"""Chat SFT of the demo's converted dLM on its tasks rendered as chat turns (README, Chat SFT).

    edlm demo --out runs/demo                                     # the converted dLM in runs/demo/train
    edlm demo-data --config=configs/demo_sft.py --out runs/demo_chat \
        --tokenizer_dir efficient_dlm/assets/demo_teacher --chat   # chat_train.jsonl, chat_eval.jsonl
    edlm train --config=configs/demo_sft.py --config.init.checkpoint=runs/demo/train \
        --config.data.train_files=runs/demo_chat/chat_train.jsonl --config.run_dir=runs/demo_sft
    edlm sample --config=configs/demo_sft.py --ckpt runs/demo_sft \
        --prompts_jsonl runs/demo_chat/chat_eval.jsonl --out runs/demo_sft/answers.jsonl

The objective and decoding are the demo conversion's (configs/demo.py: clean-context block diffusion,
block 4, token shift, ELBO weighting, threshold 0.9); only the data (tasks as a user turn and an
assistant reply, rendered with the builtin template "<|role|>" + content + EOS, since the demo
tokenizer ships none) and the optimizer (a smaller rate: the model is already converted) differ.
`edlm sample` with references reports exact-match accuracy and tokens per forward.
"""
from efficient_dlm.config import sibling_recipe


def get_config():
    c = sibling_recipe(__file__, "demo")
    c.data.format = "chat"
    c.data.chat_template = "builtin"
    c.data.train_weights = ""
    c.data.seq_len = 128  # a task conversation is ~40 tokens: whole conversations, packed first-fit on blocks
    t = c.train
    t.steps = 300  # 300 x 16 x 128 = 0.6M tokens, a few CPU minutes
    t.learning_rate = 3e-4
    t.warmup_steps = 10
    t.save_every = 100
    c.sample.chat = True
    c.sample.max_new_tokens = 32
    c.run_dir = "runs/demo_sft"
    return c
