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
    # Measured on the session-6 demo (tasks with 16-20-token answers; docs/BENCHMARKS.md, demo section,
    # every row 600 steps x 16 x 128 tokens from the same teacher):
    # - block 16 (answers span two blocks: TPF can pass 4; block 4 capped it near 2.7 on the old tasks);
    # - prompt-clean conversion: the tasks as prompt/response records with the "plain" template (the
    #   teacher's own document format), so only answers are masked and supervised, as the sampler sees
    #   them; with raw documents half the masked tokens are the prompts' random symbols (TPF 3.47 -> 5.31);
    # - token shift (the AR head's next-token alignment kept) and the corrected ELBO weight n / k;
    # - CAP (LLaDA2.0 confidence-aware training, weight 1): at equal accuracy it commits more tokens per
    #   forward (72.9% at TPF 5.70 at threshold 0.95, against 72.7% at 5.31 without it at 0.9).
    # Not met at this budget: the computation tasks (add, sub, sort) stay 25-50 points below the teacher
    # in parallel decoding after 1.2M tokens; the copies (upper, shift) are exact at TPF > 6.
    d.block_size = 16
    d.confidence_weight = 1.0
    d.masking = "position"
    d.half_life = 0.25
    d.loss_weighting = "elbo"
    d.token_shift = True
    c.data.format = "chat"
    c.data.chat_template = "plain"
    c.data.train_weights = ""
    c.data.seq_len = 128
    t = c.train
    # 600 x 16 x 128 = 1.2M tokens: ~600-700 s of the 15-minute CPU budget.
    t.steps = 600
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
    s.threshold = 0.95
    s.block_size = 16
    c.demo.thresholds = "0.9,0.95,0.99"
    c.demo.train_tasks = 50_000
    return c
