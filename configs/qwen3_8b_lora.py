"""Qwen3-8B dLM -> chat model with LoRA: configs/qwen3_8b_sft.py's chat SFT, adapters on a frozen bfloat16 base.

    edlm train --config=configs/qwen3_8b_lora.py --config.init.checkpoint=runs/qwen3_8b_bd \
        --config.data.train_files=chat.jsonl --config.run_dir=runs/qwen3_8b_lora
    edlm export-hf --ckpt=runs/qwen3_8b_lora --out=export/q8b_lora --merge_lora   # merged model
    edlm export-hf --ckpt=runs/qwen3_8b_lora --out=export/q8b_lora_peft --peft    # PEFT adapters
    edlm aot --config=configs/qwen3_8b_lora.py --topology=v5p-8    # --config.lora.rank=0: full fine-tuning

The base is the block-diffusion run of configs/qwen3_8b_bd.py (its [MASK] row appended: vocabulary
152064, [MASK] 151936, 151937 valid ids); the model section states that architecture so `edlm aot`
plans the step without weights (training reads it from init.checkpoint). Rank-16 adapters
(alpha 32, dropout 0.05) on every attention and MLP projection, float32 with their Adam moments;
the base is held in bfloat16 and never updated. Same objective as the base run (block diffusion,
clean context, block 32) and data as configs/qwen3_8b_sft.py (chat JSONL, Qwen3's template, only
assistant tokens supervised). Batch 64 in 8 micro-batches, so the same recipe with
--config.lora.rank=0 is full fine-tuning of the same step (docs/BENCHMARKS.md, "LoRA").
"""
from efficient_dlm.config import sibling_recipe


def get_config():
    c = sibling_recipe(__file__, "qwen3_8b_sft")
    c.model.vocab_size = 152064
    c.model.mask_token_id = 151936
    c.diffusion.valid_vocab_size = 151937
    lo = c.lora
    lo.rank = 16
    lo.alpha = 32.0
    lo.dropout = 0.05
    lo.targets = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    lo.base_dtype = "bfloat16"
    t = c.train
    t.steps = 2000
    t.batch_size = 64
    t.grad_accum = 8  # micro-batches of 8 rows: 1-2 rows of 8192 tokens (with the clean copy) per chip on 8 chips
    t.learning_rate = 1e-4
    t.warmup_steps = 50
    t.weight_decay = 0.0
    t.save_every = 200
    c.run_dir = "runs/qwen3_8b_lora"
    return c
