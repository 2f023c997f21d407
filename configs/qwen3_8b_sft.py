"""Qwen3-8B dLM -> chat model: block-diffusion SFT (full fine-tune) after configs/qwen3_8b_bd.py.

    edlm train --config=configs/qwen3_8b_sft.py --config.init.checkpoint=gs://bucket/runs/q8b_bd \
        --config.data.train_files='gs://bucket/sft/*.jsonl' --config.run_dir=gs://bucket/runs/q8b_sft
    edlm sample --ckpt gs://bucket/runs/q8b_sft --chat --prompt "Why is the sky blue?"

Data: JSONL conversations ({"messages": [...]} multi-turn, or {"prompt", "response"}), rendered with
Qwen3's own chat template (the checkpoint's tokenizer_config.json); only assistant tokens (and each
turn's <|im_end|>) are masked and supervised, every conversation starts on a block boundary so each
reply's first block holds the prompt's last tokens exactly where `edlm sample --chat` puts them
(docs/METHOD.md section 11). The objective is the conversion's (clean-context block diffusion, block
32, position-dependent masking, ELBO / masked-token count); the [MASK] row already exists in the
converted checkpoint, so nothing is appended.

Hyper-parameters follow the published dLM SFT recipes at this size (LLaDA 8B SFT: lr 2.5e-5, batch
256 x 4096; SDAR / Fast-dLLM v2 chat models: 1e-5 to 2e-5, a few epochs over ~1M conversations): a full
fine-tune of an already converted model wants a learning rate at or below the conversion's, a short
warm-up and decay to 10%, and about 3 epochs of the SFT set (here 128 x 4096 packed tokens per step,
4000 steps = 2.1B tokens, ~3 epochs of ~300k conversations of ~2k tokens).
"""
from efficient_dlm.config import sibling_recipe


def get_config():
    c = sibling_recipe(__file__, "qwen3_8b_bd")
    c.diffusion.mask_token = "model"  # the converted checkpoint's [MASK] (id 151936, valid vocab 151937)
    c.diffusion.block_size_schedule = ""  # the converted model is already at block 32 (no warm-up again)
    d = c.data
    d.format = "chat"
    d.chat_template = ""  # Qwen3's own (tokenizer_config.json), written with the run's tokenizer
    d.seq_len = 4096  # conversations are packed whole (first-fit), longer ones truncated to 4096
    t = c.train
    t.steps = 4000
    t.batch_size = 128
    t.learning_rate = 1e-5  # the conversion's rate; LLaDA's 2.5e-5 is the upper end for 8B
    t.schedule = "cosine"
    t.warmup_steps = 100
    t.min_lr_ratio = 0.1
    t.weight_decay = 0.1
    t.grad_clip = 1.0
    t.save_every = 500
    t.eval_every = 250  # data.eval_files: held-out conversations (masked-token NLL on replies)
    t.eval_batches = 16
    # LLaDA2.0 trains its chat models with CAP (confidence-aware parallel training, docs/METHOD.md
    # section 9): --config.diffusion.confidence_weight=0.5 adds the entropy of the masked reply tokens
    # the model already gets right (only reply tokens: CAP reads the same masked-token counts), which
    # sharpens them so threshold decoding commits more per forward. Off here: its effect at 8B is unmeasured.
    c.diffusion.confidence_weight = 0.0
    c.sample.chat = True
    c.run_dir = "runs/qwen3_8b_sft"
    return c
