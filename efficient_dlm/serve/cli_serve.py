"""`edlm serve --ckpt DIR`: the OpenAI-compatible server with continuous batching (app.py, engine.py).

The checkpoint is loaded (and its checksums verified) and every step program compiled before the
port opens, so a checkpoint that does not load stops the command with one line (exit 2) and the
first request never waits for a compilation. The model decodes as its DiffusionSpec says; --strategy
ar serves it (or an AR teacher, which has no [MASK] and is served AR by default) causally; --verifier CKPT
(an AR checkpoint, e.g. the teacher) or --verifier self serves lossless speculative decoding: the dLM
drafts, the verifier keeps exactly what its own decoding would produce.
"""
from __future__ import annotations

import os
import sys

from absl import flags

from efficient_dlm import checkpoints
from efficient_dlm.errors import UserError
from efficient_dlm.models.quantize import quantize_model
from efficient_dlm.sample.config import quantization_kwargs, set_quantize_flag
from efficient_dlm.serve.app import serve
from efficient_dlm.serve.engine import Engine, EngineConfig
from efficient_dlm.serve.text import Texts

flags.DEFINE_string("ckpt", None, "model checkpoint directory (edlm train / import-hf / save)")
flags.DEFINE_integer("step", None, "training run directory: the step to load (default: the newest)")
flags.DEFINE_string("host", "127.0.0.1", "address to listen on")
flags.DEFINE_integer("port", 8000, "port to listen on")
flags.DEFINE_integer("slots", 8, "requests decoded together (continuous batching slots)")
flags.DEFINE_integer("max_prompt_tokens", 512, "longest prompt a slot's cache holds")
flags.DEFINE_integer("max_tokens", 256, "largest max_tokens a request may ask for")
flags.DEFINE_integer("queue_size", 64, "requests that may wait for a slot; beyond it: HTTP 429")
flags.DEFINE_string("strategy", None, "decoding strategy (default: the checkpoint's spec; ar for an AR model)")
flags.DEFINE_integer("block_size", None, "decoded block size (default: the checkpoint's spec)")
flags.DEFINE_string("verifier", None, "AR checkpoint verifying the dLM's drafts (speculative decoding), or 'self'")
flags.DEFINE_integer("draft_steps", 1, "speculative: drafter denoising steps per draft (the last commits the rest)")
flags.DEFINE_string("served_model_name", None, "model id in the API (default: the checkpoint directory's name)")
flags.DEFINE_bool("warmup", True, "compile every step program before opening the port")
flags.DEFINE_string("quantize", None, "none | int8 | fp8: quantize the weights as they load (sets sample.quantize)")


def run(config, FLAGS) -> int:
    # The checkpoint describes the model (a quantized one, from `edlm quantize`, serves quantized); the
    # server's knobs are flags; sample.quantize* / --quantize quantize a float checkpoint as it loads.
    set_quantize_flag(config, FLAGS.quantize)
    if not FLAGS.ckpt:
        raise UserError("give --ckpt DIR (a checkpoint directory)")
    if not os.path.isdir(FLAGS.ckpt):
        raise UserError(f"--ckpt: checkpoint directory {FLAGS.ckpt!r} does not exist")
    verifier = FLAGS.verifier
    if verifier not in (None, "self") and not os.path.isdir(verifier):
        raise UserError(f"--verifier: checkpoint directory {verifier!r} does not exist (or give --verifier self)")
    model = _load("--ckpt", FLAGS.ckpt, FLAGS.step)
    if verifier not in (None, "self"):
        verifier = _load("--verifier", verifier, None)
    model = quantize_model(model, **quantization_kwargs(config.sample))
    engine = Engine(model, EngineConfig(
        slots=FLAGS.slots, max_prompt_tokens=FLAGS.max_prompt_tokens, max_new_tokens=FLAGS.max_tokens,
        queue_size=FLAGS.queue_size, strategy=FLAGS.strategy, block_size=FLAGS.block_size,
        draft_steps=FLAGS.draft_steps), verifier=verifier)
    texts = Texts(checkpoints.tokenizer_dir(FLAGS.ckpt))
    name = FLAGS.served_model_name or os.path.basename(os.path.abspath(FLAGS.ckpt))
    if FLAGS.warmup:
        count = engine.warmup()
        print(f"edlm serve: compiled {count} step programs", file=sys.stderr)
    print(f"edlm serve: {name} ({engine.strategy}, {FLAGS.slots} slots) on http://{FLAGS.host}:{FLAGS.port}",
          file=sys.stderr, flush=True)
    serve(engine, texts, name, host=FLAGS.host, port=FLAGS.port)
    return 0


def _load(flag: str, directory: str, step: int | None):
    try:
        return checkpoints.load(directory, step=step)
    except (OSError, ValueError, KeyError) as err:  # a damaged / foreign directory: refuse to start, one line
        raise UserError(f"{flag} {directory}: the checkpoint does not load ({type(err).__name__}: {err})") from None
