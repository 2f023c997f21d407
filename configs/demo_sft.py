"""Chat SFT of the demo's converted dLM on its tasks rendered as chat turns (README, Chat SFT).

    edlm demo --out runs/demo                                     # the converted dLM in runs/demo/train
    edlm demo-data --config=configs/demo_sft.py --out runs/demo_chat \
        --tokenizer_dir efficient_dlm/assets/demo_teacher --chat   # chat_train.jsonl, chat_eval.jsonl
    edlm train --config=configs/demo_sft.py --config.init.checkpoint=runs/demo/train \
        --config.data.train_files=runs/demo_chat/chat_train.jsonl --config.run_dir=runs/demo_sft
    edlm sample --config=configs/demo_sft.py --ckpt runs/demo_sft --batch_size 64 \
        --prompts_jsonl runs/demo_chat/chat_eval.jsonl --out runs/demo_sft/answers.jsonl

The objective is the demo conversion's (configs/demo.py: clean-context block diffusion, block 16,
position-dependent masking, token shift, ELBO weighting, CAP weight 1, the joint AR term ar_weight 4),
decoding its default, self-speculation (`--config.sample.strategy=threshold` for threshold 0.95). The
demo already converts on the tasks as prompt / response records with the "plain" template (prompt
clean, answers supervised); this recipe renders the same tasks with the builtin chat template instead
("<|role|>" + content + EOS per turn, generation prompt "<|assistant|>", since the demo tokenizer ships
none), so the dLM learns to answer a user turn, at the conversion's rate (below). The held-out prompts
are the demo's (same seed and tasks). `edlm sample` with references reports exact-match accuracy and tokens per forward (docs/BENCHMARKS.md, "Chat SFT on the demo").
"""
from efficient_dlm.config import sibling_recipe


def get_config():
    c = sibling_recipe(__file__, "demo")
    c.data.format = "chat"
    c.data.chat_template = "builtin"
    c.data.train_weights = ""
    c.data.seq_len = 128  # a task conversation is ~40 tokens: whole conversations, packed first-fit on blocks
    t = c.train
    # Measured (docs/BENCHMARKS.md, "Chat SFT on the demo", session 8): the converted demo dLM fails on any
    # text before or inside its task prompt (role markers shift the positions its carry / sort circuits
    # were learnt at; the EOS after the user turn ends a document for the teacher), so SFT must re-learn
    # the tasks in the new layout, as the conversion did: at the conversion's rate 1e-3 it does, suddenly,
    # between ~350 and ~450 steps (300 steps: 39.6%; 300 + 600: 99.6% self-speculative at TPF 6.16).
    # At 3e-4, 150 steps reached 0.1%. 900 x 16 x 128 = 1.8M tokens, ~20 CPU minutes.
    t.steps = 900
    t.learning_rate = 1e-3
    t.warmup_steps = 10
    t.save_every = 100
    c.sample.chat = True
    c.sample.max_new_tokens = 32
    c.run_dir = "runs/demo_sft"
    return c
