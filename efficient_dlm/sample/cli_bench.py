"""`edlm bench --ckpt DLM [--ar_ckpt TEACHER] [--verifier CKPT] [--prompts_jsonl FILE] [--out DIR]`: AR vs dLM.

Runs the prompt set through every setting of the config's `bench` section (AR baseline, dLM
strategies and thresholds, batch sizes) with the `sample` section's block size, max_new_tokens and
sampling, prints a table and writes DIR/<setting>_b<batch>.json plus DIR/summary.json.
Without --prompts_jsonl it uses bench.num_prompts random prompts of bench.prompt_len tokens.
"""
from __future__ import annotations

import json
import os

import numpy as np
from absl import flags

from efficient_dlm.config import typed
from efficient_dlm.diffusion.spec import DiffusionSpec, spec_of
from efficient_dlm.outputs import check_output_dir
from efficient_dlm.sample.bench import format_table, make_settings, run_setting
from efficient_dlm.sample.config import set_quantize_flag
from efficient_dlm.sample.inputs import Prompt, encode, load_source, load_verifier, read_prompts

flags.DEFINE_string("ckpt", None, "dLM checkpoint directory (default: config.init.checkpoint / hf_dir / random init)")
flags.DEFINE_string("ar_ckpt", None, "AR teacher checkpoint for the AR baseline (default: the --ckpt model)")
flags.DEFINE_string("prompts_jsonl", None, 'JSONL of {"prompt": text} or {"prompt_ids": [ids]}, optional "reference"')
flags.DEFINE_string("out", None, "output directory for the JSON records (default: <run_dir>/bench)")
flags.DEFINE_string("verifier", None, "AR checkpoint verifying the speculative settings (default: the --ar_ckpt model)")
flags.DEFINE_string("quantize", None, "none | int8 | fp8: quantize the weights (sets sample.quantize; qwix, per channel)")


def random_prompts(source, count: int, length: int, seed: int):
    """Token-id prompts drawn uniformly from the ids the model may emit (no [MASK], no stop/padding ids)."""
    cfg, spec = source.model.config, spec_of(source.model)
    banned = {cfg.mask_token_id, cfg.eos_token_id, cfg.pad_token_id, cfg.bos_token_id}
    ids = np.array([i for i in range(spec and spec.valid_vocab_size or cfg.vocab_size) if i not in banned])
    rng = np.random.default_rng(seed)
    return [Prompt(rng.choice(ids, size=length).tolist()) for _ in range(count)]


def add_ratios_to_ar(records: list[dict]) -> None:
    """Every record's tokens/s over the AR baseline's at the same batch size, measured in this same run."""
    ar = {r["batch_size"]: r["tokens_per_second"] for r in records if r["strategy"] == "ar"}
    for record in records:
        base = ar.get(record["batch_size"])
        record["speedup_vs_ar"] = record["tokens_per_second"] / base if base else None


def _write_json(path: str, payload) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2)
    os.replace(tmp, path)


def run(config, FLAGS) -> int:
    set_quantize_flag(config, FLAGS.quantize)
    config = typed(config)  # the CLI's ConfigDict, typed once here
    sample, b = config.sample, config.bench
    out_dir = FLAGS.out or os.path.join(config.run_dir, "bench")
    check_output_dir(out_dir, "--out" if FLAGS.out else "run_dir/bench")  # before any model loads
    dlm = load_source(FLAGS.ckpt, config)
    ar = load_source(FLAGS.ar_ckpt, config) if FLAGS.ar_ckpt else dlm
    ar.tokenizer = ar.tokenizer or dlm.tokenizer  # teacher and student share the vocabulary
    verifier = load_verifier(FLAGS.verifier, config) if FLAGS.verifier else ar.model
    if FLAGS.prompts_jsonl:
        prompts = encode(read_prompts(FLAGS.prompts_jsonl), dlm.tokenizer)
    else:
        prompts = random_prompts(dlm, b.num_prompts, b.prompt_len, config.seed)
    os.makedirs(out_dir, exist_ok=True)
    print(f"dLM: {dlm.description}; AR: {ar.description}; {len(prompts)} prompts; writing {out_dir}", flush=True)
    records = []
    spec = spec_of(dlm.model) or DiffusionSpec(mask_token_id=0)
    base = sample.generate_kwargs()
    for setting in make_settings(b.strategies, b.thresholds, b.batch_sizes, sample, spec):
        source = ar if setting.strategy == "ar" else dlm
        record = run_setting(source.model, setting, prompts, source.tokenizer, base, repeats=b.repeats,
                             warmup=b.warmup, overhead_forwards=b.overhead_forwards, verifier=verifier)
        record["model"] = source.description
        _write_json(os.path.join(out_dir, setting.file_name()), record)
        records.append(record)
        print(f"  {setting.name} batch {setting.batch_size}: {record['tokens_per_second']:.1f} tok/s, "
              f"TPF {record['tokens_per_forward']:.2f}", flush=True)
    add_ratios_to_ar(records)
    _write_json(os.path.join(out_dir, "summary.json"), records)
    print(format_table(records))
    return 0
