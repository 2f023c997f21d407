"""`edlm import-hf --hf_dir DIR --out CKPT_DIR`: convert a HF directory once into an orbax checkpoint."""
from __future__ import annotations

import os
import time

from absl import flags

flags.DEFINE_string("hf_dir", None, "local Hugging Face model directory (config.json + safetensors)")
flags.DEFINE_string("out", None, "output checkpoint directory")
flags.DEFINE_string("dtype", "float32", "parameter dtype of the checkpoint: float32, bfloat16 or float16")
flags.DEFINE_integer("mask_token_id", None, "record this token id as the [MASK] token")
flags.DEFINE_bool("overwrite", False, "replace an existing checkpoint at --out")


def run(config, FLAGS) -> int:
    from efficient_dlm.checkpoints import save
    from efficient_dlm.cli import UserError
    from efficient_dlm.port.hf_import import from_hf

    if not FLAGS.hf_dir or not FLAGS.out:
        raise UserError("--hf_dir and --out are required")
    if FLAGS.dtype not in ("float32", "bfloat16", "float16"):
        raise UserError(f"unknown --dtype {FLAGS.dtype!r}; choose float32, bfloat16 or float16")
    if os.path.exists(os.path.join(FLAGS.out, "params")) and not FLAGS.overwrite:
        raise UserError(f"{FLAGS.out}: a checkpoint already exists (pass --overwrite)")
    start = time.perf_counter()
    overrides = {} if FLAGS.mask_token_id is None else {"mask_token_id": FLAGS.mask_token_id}
    model = from_hf(FLAGS.hf_dir, dtype=FLAGS.dtype, progress=True, **overrides)
    save(model, FLAGS.out, tokenizer_dir=FLAGS.hf_dir, extra={"source": os.path.abspath(FLAGS.hf_dir)}, force=FLAGS.overwrite)
    print(f"wrote {FLAGS.out} ({model.config.model_type}, {time.perf_counter() - start:.1f}s)")
    return 0
