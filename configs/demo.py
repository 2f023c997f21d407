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
    # - the joint AR objective (Nemotron-Labs Diffusion: diffusion.ar_weight, the same weights trained in
    #   causal mode too) and fused self-speculative decoding as the default (the dLM drafts a block in one
    #   step, its own causal mode verifies it while drafting the next; lossless w.r.t. the causal mode).
    #   Session 7, 600 steps each: ar_weight 0 / 0.5 / 2 / 4 give causal-mode (= self-speculative) accuracy
    #   70.0 / 91.6 / 97.4 / 98.8 % (teacher 99.2) at fused TPF 4.43 / 4.80 / 4.85 / 4.69, and also lift
    #   threshold decoding (0.99: 76.4 / 81.3 / 85.5 / 80.0 %). Threshold decoding alone stays 14-23 points
    #   below the teacher at this budget (the carry and sort computations); the copies are exact at TPF > 6.
    #   The AR term costs one causal forward per step (~1.5x a step).
    d.block_size = 16
    d.confidence_weight = 1.0
    d.ar_weight = 4.0
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
    # The default decoding travels with the model (its DiffusionSpec, the export's config): self-speculation,
    # so `generate(load(run))`, `edlm sample`, `edlm serve` and the exported PyTorch `generate` all decode as the
    # demo's summary line judges. The threshold is the draft-commit knob (and the threshold rows' default).
    s.strategy = "self_speculative"
    s.threshold = 0.95
    s.block_size = 16
    c.demo.thresholds = "0.9,0.95,0.99"
    c.demo.speculative = "self,teacher"  # lossless rows: the dLM's own causal mode verifies (fused), the teacher verifies
    c.demo.default = "speculative_self"  # the default decoding the summary line judges (edlm sample --verifier self)
    c.demo.train_tasks = 50_000
    return c
