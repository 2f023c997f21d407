"""Block-diffusion training of the tiny model on a laptop CPU (tests, smoke runs, the demo).

    edlm train --config=configs/tiny_train.py --config.data.train_files=corpus.jsonl
    edlm train --config=configs/tiny_train.py --config.diffusion.objective=ar ...   # the AR baseline

The model is configs/tiny.py (random init); text is tokenized byte by byte with the tokenizer shipped
in efficient_dlm/assets/byte_tokenizer (<eos> = 1, [MASK] = 511).
"""
from efficient_dlm.config import sibling_recipe
from efficient_dlm.data.byte_tokenizer import ASSET_DIR


def get_config():
    c = sibling_recipe(__file__, "tiny")
    c.init.tokenizer = ASSET_DIR
    c.diffusion.objective = "block_diffusion"
    c.diffusion.block_size = 8
    c.data.seq_len = 64
    c.train.steps = 200
    c.train.batch_size = 8
    c.train.learning_rate = 1e-3
    c.train.warmup_steps = 20
    c.train.weight_decay = 0.01
    c.train.save_every = 100
    c.train.eval_every = 100
    c.train.log_every = 10
    c.run_dir = "runs/tiny_train"
    return c
