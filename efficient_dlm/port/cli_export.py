"""`edlm export-hf --ckpt CKPT --out DIR`: write a checkpoint as a Hugging Face model directory.

A dLM (checkpoint with a [MASK] token) becomes a trust_remote_code model with our modeling files; a
plain AR checkpoint is written in its original architecture's format. The dLM fields come from the
checkpoint's DiffusionSpec; the decoding flags (--strategy, --threshold, ...) override its default
decoding. With --push_to_hub the directory is uploaded afterwards; its arguments are checked before
anything is exported. A LoRA run exports with --merge_lora (a merged model) or --peft (its adapters in
PEFT's format, port/peft_export.py).
"""
from __future__ import annotations

import os

from absl import flags

from efficient_dlm.errors import UserError
from efficient_dlm.outputs import check_output_dir
from efficient_dlm.port.hf_export import to_hf
from efficient_dlm.port.hub import check_push_args
from efficient_dlm.port.peft_export import to_peft

flags.DEFINE_string("ckpt", None, "efficient_dlm checkpoint directory (from `edlm import-hf`, `edlm train` or save)")
flags.DEFINE_string("out", None, "output directory (must be empty or absent unless --overwrite)")
flags.DEFINE_string("tokenizer_dir", None, "tokenizer files to ship (default: the checkpoint's tokenizer/)")
flags.DEFINE_string("dtype", None, "tensor dtype: float32, bfloat16 or float16 (default: the checkpoint's)")
flags.DEFINE_bool("overwrite", False, "replace a non-empty --out directory")
flags.DEFINE_string("max_shard_size", "5GB", "largest safetensors file before sharding, e.g. 5GB or 500MB")
flags.DEFINE_enum("format", "auto", ["auto", "dlm", "ar"], "auto: dLM when the checkpoint has a mask token")
flags.DEFINE_integer("block_size", None, "default decoding block size (default: the checkpoint's diffusion spec)")
flags.DEFINE_bool("token_shift", None, "restates the spec's token shift (a contradiction is refused)")
flags.DEFINE_string("strategy", None, "default decoding strategy written to config.json: threshold|topk|factor|entropy")
flags.DEFINE_float("threshold", None, "default confidence threshold written to config.json")
flags.DEFINE_integer("tokens_per_step", None, "default topk tokens per step written to config.json")
flags.DEFINE_float("factor", None, "default factor-strategy f written to config.json")
flags.DEFINE_float("entropy_bound", None, "default entropy bound written to config.json")
flags.DEFINE_string("push_to_hub", None, "upload the export to this Hugging Face repo id (namespace/name)")
flags.DEFINE_bool("private", True, "with --push_to_hub: create the repo as private")
flags.DEFINE_integer("step", None, "training run directory: the step to export (default: the newest)")
flags.DEFINE_bool("merge_lora", False, "a LoRA run: write its base with the adapters merged into the weights")
flags.DEFINE_bool("peft", False, "a LoRA run: write its adapters unmerged in PEFT's format (adapter_config.json + "
                  "adapter_model.safetensors) for the base's HF export")
flags.DEFINE_string("peft_base", "", "with --peft: base_model_name_or_path written to adapter_config.json")

def run(config, FLAGS) -> int:

    if not FLAGS.ckpt or not FLAGS.out:
        raise UserError("--ckpt and --out are required")
    check_output_dir(FLAGS.out)
    hub = check_push_args(FLAGS.push_to_hub) if FLAGS.push_to_hub else None
    if FLAGS.peft and FLAGS.merge_lora:
        raise UserError("--peft writes the adapters, --merge_lora the merged model: pass one")
    if FLAGS.peft:
        out = to_peft(FLAGS.ckpt, FLAGS.out, step=FLAGS.step, base_model=FLAGS.peft_base, overwrite=FLAGS.overwrite)
    else:
        out = _export_model(FLAGS)
    print(f"wrote {out}: {', '.join(sorted(os.listdir(out)))}")
    if hub is not None:
        api = hub.HfApi()
        api.create_repo(FLAGS.push_to_hub, private=FLAGS.private, exist_ok=True)
        api.upload_folder(folder_path=out, repo_id=FLAGS.push_to_hub, commit_message="Upload from efficient_dlm export-hf")
        print(f"uploaded to https://huggingface.co/{FLAGS.push_to_hub}")
    return 0


def _export_model(FLAGS) -> str:
    return to_hf(
        FLAGS.ckpt,
        FLAGS.out,
        tokenizer_dir=FLAGS.tokenizer_dir,
        dtype=FLAGS.dtype,
        overwrite=FLAGS.overwrite,
        max_shard_size=FLAGS.max_shard_size,
        format=FLAGS.format,
        block_size=FLAGS.block_size,
        token_shift=FLAGS.token_shift,
        strategy=FLAGS.strategy,
        threshold=FLAGS.threshold,
        tokens_per_step=FLAGS.tokens_per_step,
        factor=FLAGS.factor,
        entropy_bound=FLAGS.entropy_bound,
        step=FLAGS.step,
        merge_lora=FLAGS.merge_lora,
    )
