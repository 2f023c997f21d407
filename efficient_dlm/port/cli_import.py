"""`edlm import-hf --hf_dir DIR --out CKPT_DIR`: convert a HF directory once into an orbax checkpoint.

The architecture comes from the directory's config.json, not from the recipe; --hf_dir defaults to
the recipe's init.hf_dir. Tokenizer files found in DIR are copied into CKPT_DIR/tokenizer.
"""
from __future__ import annotations

import os
import time

from absl import flags

from efficient_dlm.errors import UserError
from efficient_dlm.models.config import DTYPES
from efficient_dlm.outputs import check_output_dir
from efficient_dlm.checkpoints import save
from efficient_dlm.port.hf_import import from_hf

flags.DEFINE_string("hf_dir", None, "local Hugging Face model directory (default: --config.init.hf_dir)")
flags.DEFINE_string("out", None, "output checkpoint directory")
flags.DEFINE_string("dtype", "float32", "parameter dtype of the checkpoint: float32, bfloat16 or float16")
flags.DEFINE_integer("mask_token_id", None, "record this token id as the [MASK] token")
flags.DEFINE_bool("overwrite", False, "replace an existing checkpoint at --out")


def check_tokenizer_files(hf_dir: str) -> None:
    """A tokenizer.json that `tokenizers` cannot read is refused here, naming the file, instead of being
    copied into the checkpoint and failing later at sample time."""
    import tokenizers


    path = os.path.join(hf_dir, "tokenizer.json")
    if not os.path.exists(path):
        return
    try:
        tokenizers.Tokenizer.from_file(path)
    except Exception as err:  # tokenizers raises a bare Exception for every parse failure
        reason = str(err).splitlines()[0][:120] if str(err) else type(err).__name__
        raise UserError(f"{path}: not a readable tokenizer.json ({reason})") from None


def run(config, FLAGS) -> int:

    hf_dir = FLAGS.hf_dir or config.init.hf_dir
    if not hf_dir or not FLAGS.out:
        raise UserError("--hf_dir (or --config.init.hf_dir) and --out are required")
    if FLAGS.dtype not in DTYPES:
        raise UserError(f"unknown --dtype {FLAGS.dtype!r}; choose {', '.join(DTYPES[:-1])} or {DTYPES[-1]}")
    if os.path.exists(os.path.join(FLAGS.out, "params")) and not FLAGS.overwrite:
        raise UserError(f"{FLAGS.out}: a checkpoint already exists (pass --overwrite)")
    check_output_dir(FLAGS.out)
    check_tokenizer_files(hf_dir)
    start = time.perf_counter()
    overrides = {} if FLAGS.mask_token_id is None else {"mask_token_id": FLAGS.mask_token_id}
    model = from_hf(hf_dir, dtype=FLAGS.dtype, progress=True, **overrides)
    save(model, FLAGS.out, tokenizer_dir=hf_dir, extra={"source": os.path.abspath(hf_dir)}, force=FLAGS.overwrite)
    print(f"wrote {FLAGS.out} ({model.config.model_type}, {time.perf_counter() - start:.1f}s)")
    return 0
