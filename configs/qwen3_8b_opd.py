"""Qwen3-8B dLM -> on-policy distillation from the original Qwen3-8B (OPDLM), after block diffusion.

    edlm train --config=configs/qwen3_8b_opd.py --config.init.checkpoint=gs://bucket/runs/q8b_bd \
        --config.opd.teacher=ckpt/qwen3_8b --config.opd.prompt_files='gs://bucket/prompts/*.jsonl' \
        --config.run_dir=gs://bucket/runs/q8b_opd

The student is the block-diffusion run of configs/qwen3_8b_bd.py (its [MASK] row appended); the
teacher is the imported AR checkpoint (`edlm import-hf`), held in bf16 and sharded like the student.
Rollouts decode block 4 with 4 steps per block (one token per forward, as in the paper) from
chat-templated prompts, growing from 256 to 1024 new tokens; the loss is the top-16 forward KL at one
state per rollout, logits 512 positions at a time for the 152k vocabulary. The same run can instead
interleave OPD with block diffusion: keep diffusion.objective=block_diffusion, set data.train_files,
opd.start_step=0 and opd.every=4.
"""
from efficient_dlm.config import sibling_recipe


def get_config():
    c = sibling_recipe(__file__, "qwen3_8b_bd")
    c.diffusion.objective = "opd"
    c.diffusion.block_size_schedule = ""  # the converted model is already at block 32 (no warm-up again)
    o = c.opd
    o.teacher_dtype = "bfloat16"
    o.chat_template = True
    o.max_prompt_len = 512
    o.max_new_tokens_schedule = "0:256,300:512,800:1024"
    o.block_size = 4
    o.strategy = "topk"
    o.steps_per_block = 4
    o.temperature = 0.0
    o.states = "sequence"
    o.top_k = 16
    o.kl_chunk = 512
    o.eval_batches = 4
    t = c.train
    t.steps = 1500
    t.batch_size = 64
    t.learning_rate = 2e-6
    t.warmup_steps = 50
    t.schedule = "constant"
    t.save_every = 100
    t.eval_every = 100
    c.run_dir = "runs/qwen3_8b_opd"
    return c
