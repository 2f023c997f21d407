"""lm-eval's own entry points (simple_evaluate, its CLI, `edlm eval`) on the demo teacher and a tiny dLM.

References: the project's own demo evaluator (efficient_dlm/demo/evaluate.py) on the same prompts for
generation, transformers (PyTorch) for the AR log-likelihoods. The dLM is the demo teacher's weights
saved as an efficient_dlm checkpoint that records block-diffusion training (block 4, token shift, as
the demo trains), so it decodes with the block sampler; no training needed. A few prompts only.
"""
import glob
import json
import os

import lm_eval
import numpy as np
import pytest
from lm_eval.tasks import TaskManager

import efficient_dlm as edlm
from efficient_dlm import cli
from efficient_dlm.demo import tasks as demo_tasks
from efficient_dlm.demo.config import DemoConfig
from efficient_dlm.demo import teacher
from efficient_dlm.demo.evaluate import task_eval
from efficient_dlm.demo.tokenizer import load as load_tokenizer
from efficient_dlm.eval import __main__ as lm_eval_cli
from efficient_dlm.eval.lm import task_dir

N = 6  # one prompt per task, and the first task twice
TEACHER = teacher.teacher_dir()
ITEMS = demo_tasks.instances("eval", 1000, seed=0, tasks=DemoConfig().task_names())[:N]


@pytest.fixture(scope="module")
def tiny_dlm_dir(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("tiny_dlm"))
    diffusion = {"objective": "block_diffusion", "block_size": 4, "token_shift": True, "masking": "position"}
    edlm.save(edlm.from_hf(TEACHER), directory, tokenizer_dir=TEACHER, extra={"train_config": {"diffusion": diffusion}})
    return directory


def _samples(rows: list[dict]) -> list[dict]:
    return sorted(rows, key=lambda row: row["doc_id"])


def test_shipped_task_file_is_the_demo_eval_set():
    with open(os.path.join(task_dir(), "demo_eval.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    d = DemoConfig()
    items = demo_tasks.instances("eval", d.eval_per_task * len(d.task_names()), seed=d.seed, tasks=d.task_names())
    assert rows == [{"task": i.task, "prompt": i.prompt, "answer": i.answer} for i in items]


def test_teacher_through_simple_evaluate_matches_the_demo_evaluator_and_transformers():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    results = lm_eval.simple_evaluate(
        model="edlm", model_args=f"ckpt={TEACHER},batch_size={N},warmup=false", tasks=["edlm_demo", "edlm_demo_ll"],
        limit=N, task_manager=TaskManager(include_path=task_dir(), include_defaults=False), log_samples=True, bootstrap_iters=0,
    )
    ours = task_eval(edlm.from_hf(TEACHER), load_tokenizer(TEACHER), ITEMS, strategy="ar", batch_size=N, max_new_tokens=32)
    generated = _samples(results["samples"]["edlm_demo"])
    assert [row["doc"]["prompt"] for row in generated] == [i.prompt for i in ITEMS]
    assert [row["filtered_resps"][0].strip() for row in generated] == [e["output"] for e in ours["examples"]]
    assert 100 * results["results"]["edlm_demo"]["exact_match,none"] == pytest.approx(ours["accuracy"]["all"])
    info = results["config"]["edlm"]
    assert info["generate"]["generated_tokens"] == ours["generated_tokens"] and info["generate"]["tokens_per_forward"] == 1.0

    hf = AutoModelForCausalLM.from_pretrained(TEACHER, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(TEACHER)
    for row in _samples(results["samples"]["edlm_demo_ll"]):
        context, continuation = row["doc"]["prompt"], row["doc"]["answer"]  # the task's target_delimiter is ""
        ctx, whole = tok(context).input_ids, tok(context + continuation).input_ids
        with torch.no_grad():
            logp = torch.log_softmax(hf(torch.tensor([whole])).logits[0].double(), -1)
        expected = sum(float(logp[i - 1, whole[i]]) for i in range(len(ctx), len(whole)))
        greedy = all(int(logp[i - 1].argmax()) == whole[i] for i in range(len(ctx), len(whole)))
        logprob, is_greedy = row["resps"][0][0]
        assert float(logprob) == pytest.approx(expected, rel=1e-4, abs=1e-4)
        assert str(is_greedy) == str(greedy)


def test_teacher_rolling_loglikelihood_through_the_lm_eval_cli_equals_transformers(tmp_path):
    """`python -m efficient_dlm.eval` is lm-eval's own CLI with the model registered."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lm_eval_cli.main(["--model", "edlm", "--model_args", f"ckpt={TEACHER},batch_size=2,warmup=false",
                      "--tasks", "edlm_demo_text", "--limit", "3", "--output_path", str(tmp_path), "--log_samples"])
    [path] = glob.glob(str(tmp_path / "*" / "samples_edlm_demo_text_*.jsonl"))
    with open(path) as f:
        rows = _samples([json.loads(line) for line in f])
    assert len(rows) == 3
    hf = AutoModelForCausalLM.from_pretrained(TEACHER, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(TEACHER)
    for row in rows:
        ids = [tok.eos_token_id] + tok(row["doc"]["text"]).input_ids  # lm-eval's rolling window: EOT first
        with torch.no_grad():
            logp = torch.log_softmax(hf(torch.tensor([ids])).logits[0].double(), -1)
        expected = sum(float(logp[i - 1, ids[i]]) for i in range(1, len(ids)))
        assert float(row["resps"][0][0]) == pytest.approx(expected, rel=1e-4, abs=1e-4)


def test_dlm_through_edlm_eval_matches_the_demo_evaluator(tiny_dlm_dir, tmp_path):
    out, data = tmp_path / "out", tmp_path / "items.jsonl"  # the tasks read another file of the same format
    data.write_text("".join(json.dumps({"task": i.task, "prompt": i.prompt, "answer": i.answer}) + "\n" for i in ITEMS))
    code = cli.main(["edlm", "eval", "--ckpt", tiny_dlm_dir, "--tasks", "edlm_demo,edlm_demo_ll",
                     "--metadata", json.dumps({"data_file": str(data)}),
                     "--batch_size", str(N), "--model_args", "strategy=threshold,threshold=0.9,warmup=false,mc_samples=8",
                     "--log_samples", "--bootstrap_iters", "0", "--nobuiltin_tasks", "--out", str(out)])
    assert code == 0
    with open(out / "results.json") as f:
        results = json.load(f)
    with open(out / "samples_edlm_demo.jsonl") as f:
        generated = _samples([json.loads(line) for line in f])
    ours = task_eval(edlm.load(tiny_dlm_dir), load_tokenizer(TEACHER), ITEMS, strategy="threshold", threshold=0.9,
                     block_size=4, token_shift=True, batch_size=N, max_new_tokens=32)
    assert [row["filtered_resps"][0].strip() for row in generated] == [e["output"] for e in ours["examples"]]
    assert 100 * results["results"]["edlm_demo"]["exact_match,none"] == pytest.approx(ours["accuracy"]["all"])
    info = results["config"]["edlm"]
    assert info["kind"] == "dlm" and info["decoding"]["strategy"] == "threshold" and info["decoding"]["block_size"] == 4
    assert info["generate"]["tokens_per_forward"] == pytest.approx(ours["tokens_per_forward"])
    assert info["generate"]["tokens_per_second"] > 0
    with open(out / "samples_edlm_demo_ll.jsonl") as f:
        scored = [float(json.loads(line)["resps"][0][0][0]) for line in f]
    assert len(scored) == N and all(np.isfinite(scored)) and max(scored) < 0  # -ELBO: a bound below log 1
    assert info["loglikelihood"]["method"] == "elbo" and info["loglikelihood"]["mean_stderr"] > 0


@pytest.mark.parametrize("model_args,message", [
    ("strategy=threshold", "strategy=threshold needs a dLM checkpoint"),
    ("verifier=self", "verifier= is used by strategy=speculative only"),
    ("mc_sample=8", "unknown key(s) mc_sample"),
    ("mc_samples=7", "mc_samples must be a positive even number"),
])
def test_bad_model_args_are_one_clear_error(capsys, tiny_dlm_dir, model_args, message):
    code = cli.main(["edlm", "eval", "--ckpt", tiny_dlm_dir if model_args.startswith("mc_") else TEACHER, "--tasks", "edlm_demo", "--model_args", model_args,
                     "--nobuiltin_tasks"])
    assert code == 2
    assert message in capsys.readouterr().err


def test_an_exported_dlm_is_scored_as_a_dlm(tiny_dlm_dir, tmp_path):
    """A `to_hf` dLM directory carries its block size and token shift; the loader reads them back."""
    from efficient_dlm.eval.loading import load

    out = edlm.to_hf(tiny_dlm_dir, str(tmp_path / "hf"), tokenizer_dir=TEACHER)
    loaded = load(out)
    assert loaded.diffusion is not None and (loaded.diffusion.block_size, loaded.diffusion.token_shift) == (4, True)
    assert load(TEACHER).diffusion is None  # the AR teacher's directory (its config has a mask id too)


def test_chat_template_formats_the_prompts(tmp_path):
    """--apply_chat_template: lm-eval's prompts go through the tokenizer's chat template (here a toy one)."""
    import shutil

    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(os.path.join(TEACHER, name), tok_dir / name)
    config = json.loads((tok_dir / "tokenizer_config.json").read_text())
    config["chat_template"] = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}[assistant]{% endif %}")
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(config))
    results = lm_eval.simple_evaluate(
        model="edlm", model_args=f"ckpt={TEACHER},tokenizer={tok_dir},batch_size=2,warmup=false",
        tasks=["edlm_demo"], limit=2, apply_chat_template=True, log_samples=True, bootstrap_iters=0,
        task_manager=TaskManager(include_path=task_dir(), include_defaults=False),
    )
    contexts = [row["arguments"][0][0] for row in _samples(results["samples"]["edlm_demo"])]
    assert contexts == [f"[user] {item.prompt}\n[assistant]" for item in ITEMS[:2]]


def test_speculative_decoding_through_lm_eval_is_the_verifiers_greedy_decoding(tiny_dlm_dir):
    """strategy=speculative (the dLM drafts, the AR teacher verifies) is lossless: the teacher's own answers."""
    results = lm_eval.simple_evaluate(
        model="edlm", model_args=f"ckpt={tiny_dlm_dir},strategy=speculative,verifier={TEACHER},batch_size=4,warmup=false",
        tasks=["edlm_demo"], limit=4, log_samples=True, bootstrap_iters=0,
        task_manager=TaskManager(include_path=task_dir(), include_defaults=False),
    )
    ours = task_eval(edlm.from_hf(TEACHER), load_tokenizer(TEACHER), ITEMS[:4], strategy="ar", batch_size=4, max_new_tokens=32)
    assert [row["filtered_resps"][0].strip() for row in _samples(results["samples"]["edlm_demo"])] == \
        [e["output"] for e in ours["examples"]]
    assert results["config"]["edlm"]["decoding"]["strategy"] == "speculative"
