"""On-policy distillation of the tiny model on a laptop CPU (tests, smoke runs, the OPD benchmark).

    edlm train --config=configs/opd_tiny.py --config.opd.teacher=AR_CKPT --config.init.checkpoint=DLM_CKPT \
        --config.opd.prompt_files=prompts.jsonl [--config.opd.eval_files=held_out.jsonl]

The student (init.checkpoint: usually a block-diffusion run such as configs/tiny_train.py's, or the
AR checkpoint itself) decodes each prompt with block 4 and 4 steps per block (OPDLM's setting) and
learns the teacher's top-16 next-token distributions at the [MASK] positions of one state per rollout.
Mixed recipes: set diffusion.objective=block_diffusion, data.train_files and opd.start_step (phases)
/ opd.every (interleaving) instead. Trajectory self-distillation (no teacher; docs/METHOD.md section 13):
--config.opd.target=self (these rollouts, one token per step, are its slow trajectories), best with
--config.opd.states=block and --config.diffusion.confidence_weight=0.5.
"""
from efficient_dlm.config import sibling_recipe


def get_config():
    c = sibling_recipe(__file__, "tiny_train")
    c.diffusion.objective = "opd"
    o = c.opd
    o.block_size = 4
    o.strategy = "topk"
    o.steps_per_block = 4
    o.max_prompt_len = 32
    o.max_new_tokens_schedule = "0:16,100:32"  # rollouts grow as the student improves
    o.top_k = 16
    o.teacher_dtype = "float32"  # tiny model on CPU: bf16 brings no saving
    c.train.steps = 200
    c.train.batch_size = 8
    c.train.learning_rate = 3e-4
    c.train.warmup_steps = 10
    c.train.eval_every = 50
    c.run_dir = "runs/opd_tiny"
    return c
