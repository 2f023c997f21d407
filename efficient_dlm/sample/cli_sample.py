"""`edlm sample --ckpt DIR --prompt TEXT` (or --prompts_jsonl FILE --out FILE): generate completions.

The model decodes as its DiffusionSpec says (recorded in the checkpoint), exactly as
`generate(load(ckpt), prompts, max_new_tokens=n)`; keys set in the config's `sample` section
(`--config.sample.strategy=ar`, `--config.sample.threshold=0.8`, ...) override it. Prompts are
encoded with the checkpoint's tokenizer; with `--chat` (or `--config.sample.chat=True`) a text prompt is
rendered as one user turn plus the generation prompt in the checkpoint's chat template, and the
template's end-of-turn token joins the stop tokens (a chat-SFT'd model, README "Chat SFT").
`--verifier CKPT` (or `--verifier self`) decodes speculatively: the dLM drafts, the AR checkpoint (or
the dLM's own weights in causal mode) verifies, and the output is exactly the verifier's own decoding.
"""
from __future__ import annotations

import json
import os
import sys

from absl import flags

from efficient_dlm.config import typed
from efficient_dlm.diffusion.spec import spec_of
from efficient_dlm.errors import UserError
from efficient_dlm.outputs import check_output_file
from efficient_dlm.sample.api import check_model, generate
from efficient_dlm.sample.inputs import (
    Prompt, check_ids, decode, encode, encode_chat, load_source, load_verifier, read_prompts,
)
from efficient_dlm.sample.config import set_quantize_flag

flags.DEFINE_string("ckpt", None, "model checkpoint directory (default: config.init.checkpoint / hf_dir / random init)")
flags.DEFINE_multi_string("prompt", [], "a prompt text (repeatable)")
flags.DEFINE_string("prompts_jsonl", None, 'JSONL file of {"prompt": text} or {"prompt_ids": [ids]} records')
flags.DEFINE_string("out", None, "write one JSON record per prompt to this JSONL file (default: print completions)")
flags.DEFINE_integer("batch_size", 8, "prompts decoded together")
flags.DEFINE_bool("stream", False, "print each block as soon as it is final")
flags.DEFINE_integer("step", None, "training run directory: the step to load (default: the newest)")
flags.DEFINE_bool("chat", False, "render each text prompt as a user turn with the checkpoint's chat template "
                  "(a chat-SFT'd model; same as --config.sample.chat=True)")
flags.DEFINE_string("verifier", None, "AR checkpoint verifying the dLM's drafts (strategy speculative), or 'self'")
flags.DEFINE_string("quantize", None, "none | int8 | fp8: quantize the weights (sets sample.quantize; qwix, per channel)")


def _printer(tokenizer, batch: int):
    def on_block(index: int, rows: list[list[int]]) -> None:
        for row, ids in enumerate(rows):
            if ids:
                text = tokenizer.decode(ids) if tokenizer is not None else " ".join(map(str, ids))
                print(text if batch == 1 else f"[{row}] {text}", end="" if batch == 1 else "\n", flush=True)

    return on_block


def write_jsonl(path: str, records: list[dict]) -> None:
    """Atomic: written to a temporary file, then renamed."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    os.replace(tmp, path)


def exact_matches(records: list[dict]) -> str:
    """"; exact match k/n" over the records with a reference (completion and reference compared stripped)."""
    scored = [r for r in records if r.get("reference") is not None and r["completion"] is not None]
    if not scored:
        return ""
    hits = sum(r["completion"].strip() == r["reference"].strip() for r in scored)
    return f"; exact match {hits}/{len(scored)} ({100 * hits / len(scored):.1f}%)"


def run(config, FLAGS) -> int:
    set_quantize_flag(config, FLAGS.quantize)
    config = typed(config)  # the CLI's ConfigDict, typed once here
    if not FLAGS.prompt and not FLAGS.prompts_jsonl:
        raise UserError("give --prompt TEXT (repeatable) or --prompts_jsonl FILE")
    if FLAGS.batch_size < 1:
        raise UserError(f"--batch_size must be >= 1, got {FLAGS.batch_size}")
    if FLAGS.out:
        check_output_file(FLAGS.out)  # before any work: a bad --out must not cost the generation
    source = load_source(FLAGS.ckpt, config, step=FLAGS.step)
    spec = spec_of(source.model)
    strategy = config.sample.strategy or (spec.strategy if spec else "threshold")
    check_model(source.model, strategy, config.sample.top_k)
    prompts = [Prompt([], text) for text in FLAGS.prompt]
    prompts += read_prompts(FLAGS.prompts_jsonl) if FLAGS.prompts_jsonl else []
    chat = FLAGS.chat or config.sample.chat
    end_of_turn = encode_chat(prompts, source, config.data.chat_template) if chat else None
    encode(prompts, source.tokenizer)
    check_ids(prompts, source.model.config.vocab_size)
    kwargs = config.sample.generate_kwargs()
    if chat and kwargs["stop_tokens"] is None:  # the reply ends at the template's end-of-turn token (or EOS)
        eos = source.model.config.eos_token_id
        kwargs["stop_tokens"] = tuple(dict.fromkeys(t for t in (eos, end_of_turn) if t is not None)) or None
    if FLAGS.verifier:
        strategy = "speculative"
        kwargs.update(strategy=strategy, verifier=load_verifier(FLAGS.verifier, config))
    elif kwargs["strategy"] == "speculative":
        raise UserError("sample.strategy=speculative needs --verifier CKPT (an AR checkpoint) or --verifier self")
    if FLAGS.stream and strategy in ("speculative", "self_speculative"):
        raise UserError("--stream is not supported with --verifier (speculative decoding)")
    records, tokens, forwards, seconds = [], 0, 0, 0.0
    for i in range(0, len(prompts), FLAGS.batch_size):
        batch = prompts[i : i + FLAGS.batch_size]
        on_block = _printer(source.tokenizer, len(batch)) if FLAGS.stream else None
        result = generate(source.model, [p.ids for p in batch], on_block=on_block, **kwargs)
        if FLAGS.stream and len(batch) == 1:
            print()
        tokens, forwards, seconds = tokens + result.generated_tokens, forwards + int(result.row_forwards.sum()), seconds + result.seconds
        for prompt, ids, row_forwards in zip(batch, result.sequences, result.row_forwards):
            record = {"prompt": prompt.text, "prompt_ids": prompt.ids, "completion": decode(source.tokenizer, ids),
                      "completion_ids": ids, "generated_tokens": len(ids), "forward_passes": int(row_forwards)}
            records.append(record | ({"reference": prompt.reference} if prompt.reference is not None else {}))
    if FLAGS.out:
        write_jsonl(FLAGS.out, records)
    elif not FLAGS.stream:
        for record in records:
            print(record["completion"] if record["completion"] is not None else " ".join(map(str, record["completion_ids"])))
    print(
        f"{len(records)} prompt(s), strategy {strategy}, model {source.description}: {tokens} tokens in "
        f"{forwards} forward passes ({tokens / max(forwards, 1):.2f} per forward), {seconds:.2f}s"
        + exact_matches(records) + (f"; wrote {FLAGS.out}" if FLAGS.out else ""),
        file=sys.stderr,
    )
    return 0
