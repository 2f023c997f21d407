"""The demo teacher: a ~2M-parameter Qwen3-architecture AR model trained from scratch on a CPU.

It is what `edlm demo` converts; the trained result ships in efficient_dlm/assets/demo_teacher.
Recipe, from the repository root (the corpus is this interpreter's standard library, so the text
part of the data depends on the Python version; the tasks do not):

    edlm demo-data --config=configs/demo_teacher.py --out runs/demo_teacher_data
    edlm train --config=configs/demo_teacher.py
    edlm export-hf --ckpt runs/demo_teacher --out efficient_dlm/assets/demo_teacher --format ar
    python -m efficient_dlm.demo.teacher --record efficient_dlm/assets/demo_teacher

The last step measures the teacher on the fixed held-out task set and records the accuracy in the
asset's demo_teacher.json (tests/test_demo_teacher.py checks the shipped model reproduces it).
Data: task documents ("<task>: <input> -><answer>" + EOS, answers of 16-20 tokens) mixed with
standard-library text; weights are per document, and a text document is ~6x longer than a task
(277 vs ~45 tokens), so 0.975 : 0.025 gives about an eighth of the tokens to text. 4,500 steps x 16
x 128 = 9.2M tokens, 44 min on this project's 2-core dev machine (session 6). Held-out check set
(10 per task): add, sub, upper, shift, sort 100%, reverse 0% (demo/tasks.py says why; on the demo's
200 held-out prompts per task: sort 96.5%, add 99.5%, the rest 100%; the demo
evaluates the five it solves). The first teachers (sessions 1-5: 3-8-symbol answers, sums without
carry tokens) are in docs/BENCHMARKS.md's demo section.
"""
from efficient_dlm.config import base_config

DATA = "runs/demo_teacher_data"


def get_config():
    c = base_config()
    m = c.model
    m.model_type = "qwen3"
    m.vocab_size = 3072  # the BPE's size (demo.tokenizer_vocab)
    m.hidden_size = 192
    m.intermediate_size = 512
    m.num_layers = 4
    m.num_heads = 6
    m.num_kv_heads = 2
    m.head_dim = 32
    m.qk_norm = True
    m.tie_word_embeddings = True
    m.max_position_embeddings = 1024
    m.rope_theta = 10000.0
    m.eos_token_id = 0  # <|endoftext|>
    m.pad_token_id = 0
    m.mask_token_id = 1  # <|mask|>: in the vocabulary from the start, unused by the AR teacher
    c.demo.train_tasks = 500_000
    c.init.tokenizer = f"{DATA}/tokenizer"
    c.init.seed = 0
    c.diffusion.objective = "ar"
    c.data.train_files = f"{DATA}/tasks_train.jsonl,{DATA}/text_train.jsonl"
    c.data.train_weights = "0.975,0.025"
    c.data.eval_files = f"{DATA}/text_eval.jsonl"
    c.data.seq_len = 128
    t = c.train
    t.steps = 4500
    t.batch_size = 16
    t.learning_rate = 2e-3
    t.warmup_steps = 100
    t.schedule = "cosine"
    t.min_lr_ratio = 0.05
    t.weight_decay = 0.1
    t.save_every = 250
    t.keep_last = 2
    t.keep_best = False
    t.eval_every = 1000
    t.eval_batches = 8
    t.log_every = 25
    c.seed = 0
    c.run_dir = "runs/demo_teacher"
    return c
