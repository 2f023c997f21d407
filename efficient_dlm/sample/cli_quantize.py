"""`edlm quantize --ckpt DIR --out QDIR`: write a quantized checkpoint (orbax) for inference.

The weights are quantized per channel with qwix as the config's sample section asks (--quantize int8 |
fp8, default int8; --config.sample.quantize_lm_head / quantize_embed / quantize_activations /
quantize_kv), and QDIR is an ordinary checkpoint directory whose model_config.json records the
quantization: `edlm sample / bench / serve --ckpt QDIR` and `load(QDIR)` restore the int8 / fp8 values
and scales directly, never a float copy. `edlm export-hf` refuses a quantized checkpoint.
"""
from __future__ import annotations

import os

from absl import flags

from efficient_dlm import checkpoints
from efficient_dlm.errors import UserError
from efficient_dlm.models.quantize import Quantization, quantize_model
from efficient_dlm.outputs import check_output_dir
from efficient_dlm.sample.config import quantization_kwargs, set_quantize_flag

flags.DEFINE_string("ckpt", None, "float checkpoint directory (edlm import-hf / train / save)")
flags.DEFINE_string("out", None, "directory of the quantized checkpoint")
flags.DEFINE_string("quantize", None, "weight type: int8 (default) or fp8 (sets sample.quantize)")
flags.DEFINE_integer("step", None, "training run directory: the step to quantize (default: the newest)")
flags.DEFINE_bool("overwrite", False, "replace an existing checkpoint in --out")


def run(config, FLAGS) -> int:
    if not FLAGS.ckpt or not FLAGS.out:
        raise UserError("--ckpt and --out are required")
    if not os.path.isdir(FLAGS.ckpt):
        raise UserError(f"checkpoint directory {FLAGS.ckpt!r} does not exist")
    set_quantize_flag(config, FLAGS.quantize or config.sample.quantize or "int8")
    check_output_dir(FLAGS.out, "--out")
    model = checkpoints.load(FLAGS.ckpt, step=FLAGS.step)
    if model.config.quantize != "none":
        raise UserError(f"{FLAGS.ckpt}: already quantized ({Quantization.of(model.config).describe()}); quantize the float checkpoint")
    quantized = quantize_model(model, **quantization_kwargs(config.sample))
    _, extra = checkpoints.read_model_config(FLAGS.ckpt)
    checkpoints.save(quantized, FLAGS.out, tokenizer_dir=checkpoints.tokenizer_dir(FLAGS.ckpt), extra=extra,
                     force=FLAGS.overwrite)
    print(f"wrote {os.path.abspath(FLAGS.out)}: {Quantization.of(quantized.config).describe()}")
    return 0
