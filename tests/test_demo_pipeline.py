"""`edlm demo` and `edlm ablate` end to end on a reduced setting, with a tiny random teacher.

One module-scoped run (2 training steps, 1 held-out prompt per task) is checked against
independent references: the AR teacher's outputs against transformers' own Qwen3 greedy decoding,
the exported dLM's transformers generate against efficient_dlm.generate (recorded by the demo), the
report against the stage results; then resuming, the ablation and bad input.
"""
from __future__ import annotations

import json
import os
import signal
import types

import pytest

from efficient_dlm import cli
from efficient_dlm.demo import tasks
from efficient_dlm.demo.config import DemoConfig

TINY = [
    "--config.train.steps=2", "--config.train.batch_size=2", "--config.data.seq_len=64",
    "--config.train.tensorboard=False", "--config.train.progress=False", "--config.train.save_every=1",
    "--config.demo.train_tasks=70", "--config.demo.eval_per_task=1", "--config.demo.thresholds=0.5,0.9,0.95",
    "--config.demo.eval_batch=7", "--config.demo.max_new_tokens=24", "--config.demo.text_eval_batches=1",
    "--config.demo.hf_samples=1", "--config.demo.speed_prompts=2",
]


def _json(path):
    with open(path) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    from tests.demo_teacher_factory import make_tiny_teacher

    return make_tiny_teacher(str(tmp_path_factory.mktemp("teacher")))


@pytest.fixture(scope="module")
def args(teacher_dir):
    return [*TINY, f"--config.demo.teacher={teacher_dir}"]


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory, args):
    out = str(tmp_path_factory.mktemp("demo") / "run")
    assert cli.main(["edlm", "demo", f"--out={out}", *args]) == 0
    return out


def test_demo_runs_every_stage_and_reports_its_numbers(demo_dir):
    ev = _json(os.path.join(demo_dir, "stages", "evaluate.json"))["results"]
    thresholds = [r for r in ev["dlm"] if r["strategy"] == "threshold"]
    assert [r["threshold"] for r in thresholds] == [0.5, 0.9, 0.95] and ev["num_prompts"] == len(DemoConfig().task_names())
    spec = {r["verifier"]: r for r in ev["dlm"] if r["strategy"] == "speculative"}
    assert set(spec) == {"self", "teacher"}  # the recipe's demo.speculative
    # Lossless: with the teacher verifying, every answer is the teacher's own.
    assert spec["teacher"]["correct"] == ev["teacher"]["correct"]
    for r in spec.values():
        assert r["tokens_per_verifier_forward"] >= r["tokens_per_forward"] > 0
    for r in [ev["teacher"], *ev["dlm"]]:
        # Every sampler step commits at least one token (the prompt rides along in the first step).
        assert r["generated_tokens"] > 0 and 0 < r["tokens_per_forward"] <= ev["block_size"]
    assert ev["teacher"]["tokens_per_forward"] == pytest.approx(1.0)  # AR: one token per forward
    # A lower threshold never commits fewer tokens per forward on the same prompts and model.
    assert ev["dlm"][0]["tokens_per_forward"] >= ev["dlm"][1]["tokens_per_forward"] - 1e-9
    assert 0 < ev["text"]["teacher_nll"] < 20 and 0 < ev["text"]["dlm_elbo"] < 50
    export = _json(os.path.join(demo_dir, "stages", "export.json"))["results"]
    assert export["samples"] and all(s["same_as_efficient_dlm"] for s in export["samples"])
    report = open(os.path.join(demo_dir, "report.md")).read()
    acc = ev["dlm"][1]["accuracy"]["all"]
    assert f"| dLM | threshold 0.9 | {acc:.1f} |" in report
    assert f"{ev['text']['teacher_nll']:.3f}" in report
    assert f"Command: `edlm demo --out={demo_dir} --config.train.steps=2 " in report  # overrides included
    assert open(os.path.join(demo_dir, "accuracy_vs_tpf.png"), "rb").read(4) == b"\x89PNG"
    conv = _json(os.path.join(demo_dir, "stages", "convert.json"))["results"]
    assert conv["steps"] == 2 and conv["tokens"] == 2 * 2 * 64
    # results.json (issue #19's layout) says what the stages measured, and the paired differences are
    # the per-prompt ones.
    out = _json(os.path.join(demo_dir, "results.json"))
    assert out["prompts"] == ev["num_prompts"] and out["report_batch"] == 7 and out["hf_dir"] == export["hf_dir"]
    assert out["default"] == "speculative_self" and out["teacher"]["accuracy"] == ev["teacher"]["accuracy"]["all"]
    assert "At self-speculative (fused) (the default decoding)" in report
    assert set(out["teacher"]["tok_s"]) == {"1", "7"}
    for row, r in zip(out["dlm"], ev["dlm"]):
        diff = sum(a - b for a, b in zip(r["correct"], ev["teacher"]["correct"])) * 100.0 / ev["num_prompts"]
        assert row["tpf"] == r["tokens_per_forward"] and row["vs_teacher"]["diff"] == pytest.approx(diff)


def test_teacher_answers_match_transformers_greedy_decoding(demo_dir, teacher_dir):
    """The AR baseline's outputs come from our sampler; transformers' Qwen3 decodes the same text."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from efficient_dlm.demo import data

    path = teacher_dir
    items = data.eval_tasks(os.path.join(demo_dir, "data", "tasks_eval.jsonl"))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    preds = []
    for inst in items:
        ids = tok(inst.prompt, return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=24, do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
        preds.append(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    ev = _json(os.path.join(demo_dir, "stages", "evaluate.json"))["results"]
    assert [e["prompt"] for e in ev["teacher"]["examples"]] == [i.prompt for i in items]
    assert [e["output"] for e in ev["teacher"]["examples"]] == [p.strip() for p in preds]


def test_rerun_skips_finished_stages_and_refuses_another_recipe(demo_dir, args, capsys):
    before = _json(os.path.join(demo_dir, "stages", "evaluate.json"))
    os.remove(os.path.join(demo_dir, "stages", "report.json"))
    assert cli.main(["edlm", "demo", f"--out={demo_dir}", *args]) == 0
    out = capsys.readouterr().out
    assert "[convert] done before" in out and "[evaluate] done before" in out and "[report] finished" in out
    assert _json(os.path.join(demo_dir, "stages", "evaluate.json")) == before
    assert cli.main(["edlm", "demo", f"--out={demo_dir}", *args, "--config.train.steps=3"]) == 2
    assert "holds a demo run with a different recipe" in capsys.readouterr().err


def test_ablation_variants_share_the_demo_data(demo_dir, args):
    out = demo_dir  # variants go to DIR/<variant>; DIR/data and the teacher's cached results are reused
    argv = ["edlm", "ablate", f"--out={out}", *args, "--config.demo.variants=ar,block8", "--config.demo.thresholds=0.9"]
    assert cli.main(argv) == 0
    table = open(os.path.join(out, "results.md")).read()
    for name in ("| ar | AR continued training | ar |", "| block8 | block + clean context, block 8 | threshold 0.9, block 8 |"):
        assert name in table
    ar = _json(os.path.join(out, "ar", "stages", "evaluate.json"))["results"]
    assert ar["dlm"][0]["strategy"] == "ar" and ar["dlm"][0]["tokens_per_forward"] == pytest.approx(1.0)
    assert open(os.path.join(out, "ablation.png"), "rb").read(4) == b"\x89PNG"
    # A later selection resumes the same variant directories (nothing retrains) and tables them alone.
    marker = os.path.join(out, "block8", "stages", "convert.json")
    trained = os.path.getmtime(marker)
    assert cli.main([*argv[:-2], "--config.demo.variants=block8", "--config.demo.thresholds=0.9"]) == 0
    assert os.path.getmtime(marker) == trained
    assert "| block8 |" in open(os.path.join(out, "results.md")).read()
    assert "| ar |" not in open(os.path.join(out, "results.md")).read()


def test_missing_teacher_is_one_clear_error(tmp_path, capsys):
    assert cli.main(["edlm", "demo", f"--out={tmp_path}", "--config.demo.teacher=/nonexistent/teacher"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "/nonexistent/teacher: no demo teacher here" in err[0]


def test_opd_in_the_recipe_distills_from_the_demo_teacher_on_its_task_prompts(tmp_path):
    """A mixed recipe (opd.start_step >= 0) gets the run's teacher, train prompts and held-out prompts."""
    from efficient_dlm.config import sibling_recipe, typed
    from efficient_dlm.demo.pipeline import DemoRun, training_config

    config = sibling_recipe(os.path.join(cli.REPO_ROOT, "configs", "demo.py"), "demo")
    plain = training_config(DemoRun(typed(config), str(tmp_path)))
    assert plain.opd.teacher == "" and plain.opd.prompt_files == ""
    config.opd.start_step = 300
    c = training_config(DemoRun(typed(config), str(tmp_path)))
    assert c.opd.teacher == c.init.hf_dir and os.path.isdir(c.opd.teacher)
    assert c.opd.prompt_files == str(tmp_path / "data" / "tasks_prompts.jsonl")
    assert c.opd.eval_files == str(tmp_path / "data" / "tasks_eval.jsonl")


def test_a_signal_during_conversion_stops_the_demo_before_evaluating(tmp_path, args, monkeypatch, capsys):
    """A SIGTERM'd conversion returns early from train(); the demo must not evaluate that half-trained model
    or mark the stage done (the rerun resumes from the trainer's checkpoint)."""
    from efficient_dlm.demo import pipeline

    monkeypatch.setattr(pipeline, "train", lambda config: types.SimpleNamespace(stopped_by="SIGTERM"))
    out = str(tmp_path / "run")
    assert cli.main(["edlm", "demo", f"--out={out}", *args]) == 128 + signal.SIGTERM
    assert "SIGTERM: the convert stage stopped early" in capsys.readouterr().out
    for stage in ("convert", "evaluate"):
        assert not os.path.exists(os.path.join(out, "stages", f"{stage}.json"))
