"""`edlm demo`: block-diffusion continued pretraining of the shipped demo teacher on a CPU.

    edlm demo [--out runs/demo] [--config.train.steps=N ...]

The architecture and weights come from the teacher (demo.teacher, default the shipped
efficient_dlm/assets/demo_teacher; its <|mask|> token, id 1, is the [MASK]); this file sets the
objective (Efficient-DLM: clean-context block diffusion, position-dependent masking), the data
mixture, the optimizer and the evaluation. Data and run directories are set by the demo itself
under --out.
"""
from efficient_dlm.config import base_config


def get_config():
    c = base_config()
    c.model.eos_token_id = 0
    c.model.mask_token_id = 1
    d = c.diffusion
    d.objective = "block_diffusion"
    # Measured at this scale (docs/BENCHMARKS.md, demo section): token shift (the AR head's next-token
    # alignment kept) and block 4 (closest to the teacher's causal pattern) are what make the conversion
    # work in a CPU budget. ELBO weighting with the old 1/m weight (x1000 on one token of a block drawn at
    # m = 1e-3) failed and the recipe used mean CE (69.8% at TPF 2.09 against the teacher's 71.8%); with
    # the corrected weight n / k (docs/METHOD.md section 3) ELBO weighting reaches 70.3% at TPF 2.11.
    d.block_size = 4
    d.masking = "position"
    d.half_life = 0.25
    d.loss_weighting = "elbo"
    d.token_shift = True
    # Continued pretraining on the teacher's own mixture: tasks, text per document, about a quarter of
    # the tokens text (configs/demo_teacher.py).
    c.data.train_weights = "0.975,0.025"
    c.data.seq_len = 128
    t = c.train
    # 650 x 16 x 128 = 1.3M tokens: ~690 s of the 15-minute CPU budget (450 steps: 2.7 points below the
    # teacher at TPF 2.03; 650: 2.0 below at TPF 2.09; docs/BENCHMARKS.md, demo section).
    t.steps = 650
    t.batch_size = 16
    t.learning_rate = 1e-3
    t.warmup_steps = 20
    t.schedule = "cosine"
    t.min_lr_ratio = 0.1
    t.weight_decay = 0.0
    t.save_every = 50
    t.keep_last = 1
    t.keep_best = False
    t.eval_every = 0
    t.eval_batches = 2
    t.log_every = 10
    s = c.sample
    s.strategy = "threshold"
    s.threshold = 0.9
    s.block_size = 4
    c.demo.train_tasks = 50_000
    return c
