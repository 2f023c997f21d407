"""`edlm demo-data --out DIR [--tokenizer_dir DIR]`: the demo's training and held-out data.

Writes standard-library text and generated task instances as JSONL (see demo/data.py for the
layout). Without --tokenizer_dir it also trains the byte-level BPE (step 1 of the teacher recipe in
configs/demo_teacher.py); with it, the given tokenizer is copied (what `edlm demo` does with the
shipped teacher's). Settings come from the config's `demo` section (seed, tasks, counts, vocab).
`--chat` also writes the tasks as chat turns (chat_train.jsonl, chat_eval.jsonl) for chat SFT
(configs/demo_sft.py, README "Chat SFT").
"""
from __future__ import annotations

from absl import flags

from efficient_dlm.demo import data
from efficient_dlm.errors import UserError

DEFAULT_CONFIG = "configs/demo_teacher.py"

flags.DEFINE_string("out", None, "output data directory")
flags.DEFINE_string("tokenizer_dir", None, "copy this tokenizer instead of training a new one")
flags.DEFINE_bool("chat", False, "also write the tasks as chat turns (chat_train.jsonl, chat_eval.jsonl) for chat SFT")


def run(config, FLAGS) -> int:

    if not FLAGS.out:
        raise UserError("--out is required")
    d = config.demo
    names = [t.strip() for t in d.tasks.split(",") if t.strip()]
    manifest = data.write(
        FLAGS.out,
        seed=d.seed,
        train_tasks=d.train_tasks,
        eval_tasks_per_task=d.eval_per_task,
        task_names=names,
        tokenizer_dir=FLAGS.tokenizer_dir,
        vocab_size=d.tokenizer_vocab,
    )
    if FLAGS.chat:
        manifest["counts"].update(data.write_chat(FLAGS.out, seed=d.seed, train_tasks=d.train_tasks,
                                                  eval_tasks_per_task=d.eval_per_task, task_names=names))
    counts = ", ".join(f"{name}: {n}" for name, n in manifest["counts"].items())
    print(f"wrote {FLAGS.out} ({counts}; tokenizer {manifest['tokenizer']})")
    return 0
