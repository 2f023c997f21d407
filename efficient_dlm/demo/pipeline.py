"""`edlm demo`: the whole product on a laptop CPU, as resumable stages.

    data      held-out and training JSONL (stdlib text + generated tasks), the teacher's tokenizer
    convert   block-diffusion continued pretraining from the shipped AR teacher (the trainer resumes
              from its own checkpoints when interrupted)
    evaluate  AR teacher vs dLM on held-out tasks (accuracy, tokens per forward, tokens/s at each
              threshold) and held-out text (NLL vs ELBO)
    export    the dLM written with `to_hf`, reloaded by transformers (trust_remote_code) and sampled
    report    DIR/report.md and the accuracy-vs-tokens-per-forward plot

Each finished stage writes DIR/stages/<stage>.json (its results) atomically; a rerun skips those
stages, so an interrupted demo continues where it stopped. DIR/config.json pins the recipe: a rerun
with a different recipe in the same directory is refused rather than mixing two runs.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import signal
import time
from typing import Any, Callable

from tqdm.auto import tqdm

from efficient_dlm.config import Config, ConfigLike, override, to_plain, typed
from efficient_dlm.demo import data as demo_data
from efficient_dlm.demo import report, teacher
from efficient_dlm.errors import UserError
from efficient_dlm import checkpoints
from efficient_dlm.demo.evaluate import paired_difference, task_eval, text_eval
from efficient_dlm.demo.reload import reload_and_generate
from efficient_dlm.demo.tokenizer import load as load_tokenizer
from efficient_dlm.port.hf_export import to_hf
from efficient_dlm.port.hf_import import from_hf
from efficient_dlm.train.loop import train

STAGES = ("data", "convert", "evaluate", "export", "report")


@dataclasses.dataclass
class DemoRun:
    config: Config
    out: str
    command: str = "edlm demo"
    data_dir: str = ""  # default <out>/data; the ablation shares one between variants
    log: Callable[[str], None] = print

    def __post_init__(self):
        self.data_dir = os.path.abspath(self.data_dir or os.path.join(self.out, "data"))

    @property
    def teacher(self) -> str:
        return teacher.teacher_dir(self.config.demo.teacher)

    def path(self, *parts: str) -> str:
        return os.path.join(self.out, *parts)

    @property
    def thresholds(self) -> list[float]:
        return [float(t) for t in self.config.demo.thresholds.split(",") if t.strip()]

    @property
    def speculative(self) -> list[str]:
        """The verifiers of the speculative settings evaluated (demo.speculative)."""
        return [v.strip() for v in self.config.demo.speculative.split(",") if v.strip()]

    @property
    def task_names(self) -> list[str]:
        return [t.strip() for t in self.config.demo.tasks.split(",") if t.strip()]


def _write_json(path: str, payload: Any) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2)
    os.replace(tmp, path)


def _read_json(path: str) -> Any:
    with open(path) as f:
        return json.load(f)


def training_config(run: DemoRun) -> Config:
    """The recipe with this run's paths filled in: teacher weights, data files, run directory."""
    c, d = run.config, run.data_dir
    paths: dict[str, Any] = {"init.hf_dir": run.teacher, "init.tokenizer": "", "run_dir": run.path("train")}
    if c.data.format == "chat":  # prompt-clean: the tasks as prompt/response records, only answers masked
        paths.update({"data.train_files": f"{d}/{demo_data.CHAT_TRAIN}", "data.train_weights": "",
                      "data.eval_files": ""})  # held-out text is evaluated after training (text_eval, text format)
    else:
        paths.update({"data.train_files": f"{d}/tasks_train.jsonl,{d}/text_train.jsonl",
                      "data.eval_files": f"{d}/text_eval.jsonl"})
    if c.opd.enabled(c.diffusion.objective):  # on-policy distillation from the same teacher
        paths.update({"opd.teacher": run.teacher, "opd.prompt_files": f"{d}/tasks_prompts.jsonl",
                      "opd.eval_files": f"{d}/tasks_eval.jsonl"})
    return override(c, paths)


def text_config(run: DemoRun) -> Config:
    """The recipe for held-out text evaluation: its eval files are the text documents, whatever it trained on."""
    return override(training_config(run), {"data.eval_files": f"{run.data_dir}/text_eval.jsonl"})


# ---- stages ------------------------------------------------------------------------------------


def stage_data(run: DemoRun) -> dict[str, Any]:
    d = run.config.demo
    manifest_path = os.path.join(run.data_dir, demo_data.MANIFEST)
    if os.path.exists(manifest_path):  # shared with an earlier variant of an ablation
        manifest = _read_json(manifest_path)
        chat_ready = run.config.data.format != "chat" or os.path.exists(os.path.join(run.data_dir, demo_data.CHAT_TRAIN))
        if manifest.get("seed") == d.seed and manifest.get("tasks") == run.task_names and chat_ready and \
                manifest.get("counts", {}).get("tasks_prompts.jsonl") == d.train_tasks:
            return manifest
    manifest = demo_data.write(
        run.data_dir, seed=d.seed, train_tasks=d.train_tasks, eval_tasks_per_task=d.eval_per_task,
        task_names=run.task_names, tokenizer_dir=run.teacher,
    )
    if run.config.data.format == "chat":
        manifest["counts"].update(demo_data.write_chat(run.data_dir, seed=d.seed, train_tasks=d.train_tasks,
                                                       eval_tasks_per_task=d.eval_per_task, task_names=run.task_names))
    return manifest


class Interrupted(Exception):
    """A signal (SIGINT / SIGTERM) stopped a stage: its marker is not written and no later stage runs, so
    the same command resumes it (the trainer saved its checkpoint) instead of evaluating a half-trained model."""

    def __init__(self, signal_name: str, stage: str):
        super().__init__(f"{signal_name}: the {stage} stage stopped early; run the same command to resume it")
        self.signal_name = signal_name

    @property
    def exit_code(self) -> int:
        return 128 + int(signal.Signals[self.signal_name])


def stage_convert(run: DemoRun) -> dict[str, Any]:
    config = training_config(run)
    started = time.perf_counter()
    result = train(config)
    if result.stopped_by:
        raise Interrupted(result.stopped_by, "convert")
    losses = [h["loss"] for h in result.history]
    return {
        "steps": int(result.state.step),
        "batch_size": config.train.batch_size,
        "seq_len": config.data.seq_len,
        "tokens": int(result.state.step) * config.train.batch_size * config.data.seq_len,
        "final_loss": losses[-1] if losses else None,
        "evals": result.evals,
        "seconds_this_call": time.perf_counter() - started,
    }


def _teacher_eval(run: DemoRun, items, tok) -> dict[str, Any]:
    """The AR teacher's task and text results, measured in this evaluate stage. Not cached across stages or
    variants (it takes seconds): its tokens/s is the denominator of every "x AR" column, so it must come from
    the same code and the same machine state as the dLM's, not from an earlier run of an older sampler."""
    d = run.config.demo
    model = from_hf(run.teacher)
    return {
        "tasks": task_eval(model, tok, items, strategy="ar", batch_size=d.eval_batch, max_new_tokens=d.max_new_tokens,
                           speed_prompts=d.speed_prompts),
        "nll": text_eval(text_config(run), model, d.text_eval_batches, objective="ar")["nll_per_token"],
    }


def stage_evaluate(run: DemoRun) -> dict[str, Any]:
    d, config = run.config.demo, training_config(run)
    objective = config.diffusion.objective
    tok = load_tokenizer(run.teacher)
    items = demo_data.eval_tasks(os.path.join(run.data_dir, "tasks_eval.jsonl"))
    thresholds = [None] if objective == "ar" else run.thresholds
    speculative = run.speculative if objective != "ar" else []
    bar = tqdm(total=2 + len(thresholds) + len(speculative), desc="evaluate", unit="setting")
    teacher_results = _teacher_eval(run, items, tok)
    bar.update()
    trained = checkpoints.load(run.path("train"))
    block = run.config.sample.block_size or trained.spec.block_size
    common = dict(batch_size=d.eval_batch, max_new_tokens=d.max_new_tokens, speed_prompts=d.speed_prompts)
    dlm_tasks = []
    for threshold in thresholds:
        if threshold is None:  # the AR variant of the ablation: decoded as the teacher is
            dlm_tasks.append(task_eval(trained, tok, items, strategy="ar", **common))
        else:
            dlm_tasks.append(task_eval(trained, tok, items, strategy="threshold", threshold=threshold,
                                       block_size=block or None, **common))  # the rest: the run's diffusion spec
        bar.update()
    if objective != "ar":
        for name in run.speculative:  # lossless: the dLM drafts, its causal mode or the teacher verifies
            verifier = "self" if name == "self" else from_hf(run.teacher)
            dlm_tasks.append(task_eval(trained, tok, items, strategy="speculative", verifier=verifier, verifier_name=name,
                                       block_size=block or None, **common))
            bar.update()
    for r in dlm_tasks:
        r["vs_teacher"] = paired_difference(r["correct"], teacher_results["tasks"]["correct"])
    elbo = text_eval(text_config(run), trained, d.text_eval_batches, objective=objective)["nll_per_token"]
    bar.update()
    bar.close()
    return {
        "teacher": teacher_results["tasks"], "dlm": dlm_tasks,
        "text": {"teacher_nll": teacher_results["nll"], "dlm_elbo": elbo},
        "objective": objective, "block_size": block, "default_threshold": run.config.sample.threshold,
        "default": d.default or (None if objective == "ar" else f"threshold_{run.config.sample.threshold}"),
        "num_prompts": len(items), "per_task": d.eval_per_task, "batch_size": d.eval_batch,
        "speed_prompts": d.speed_prompts,
    }


def stage_export(run: DemoRun) -> dict[str, Any]:
    hf_dir = run.path("hf")
    to_hf(run.path("train"), hf_dir, tokenizer_dir=run.teacher, overwrite=True)  # decoding: the run's diffusion spec
    items = demo_data.eval_tasks(os.path.join(run.data_dir, "tasks_eval.jsonl"))
    step = max(1, len(items) // max(1, run.config.demo.hf_samples))
    samples = reload_and_generate(hf_dir, items[::step][: run.config.demo.hf_samples],
                                  max_new_tokens=run.config.demo.max_new_tokens)
    return {"hf_dir": hf_dir, "samples": samples}


def stage_report(run: DemoRun, results: dict[str, Any]) -> dict[str, Any]:
    ev = results["evaluate"]
    plot_path = report.plot(ev["teacher"], ev["dlm"], run.path(report.PLOT_NAME), "Demo: AR teacher vs block-diffusion dLM")
    results = {**results, "command": run.command, "machine": machine()}
    text = report.markdown(results)
    _write_json(run.path(report.RESULTS_NAME), report.results_json(results))
    tmp = run.path("report.md.tmp")
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, run.path("report.md"))
    return {"report": run.path("report.md"), "plot": plot_path, "results": run.path(report.RESULTS_NAME)}


def machine() -> str:
    return f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}"


# ---- driver ------------------------------------------------------------------------------------


def _check_config(run: DemoRun) -> None:
    path = run.path("config.json")
    plain = to_plain(run.config)
    if os.path.exists(path):
        if _read_json(path) != json.loads(json.dumps(plain)):
            raise UserError(f"{run.out} holds a demo run with a different recipe; choose another --out or delete it")
    else:
        _write_json(path, plain)


def run_demo(
    config: ConfigLike, out: str, *, command: str = "edlm demo", stages: tuple[str, ...] = STAGES,
    data_dir: str = "",
) -> dict[str, Any]:
    """Runs (or resumes) the stages; returns {stage: results} plus timing. config: the typed Config, or
    the CLI's ConfigDict (typed here, once)."""
    run = DemoRun(typed(config), os.path.abspath(out), command, data_dir)
    run.teacher  # fail fast on a missing teacher
    os.makedirs(run.out, exist_ok=True)
    _check_config(run)
    results: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    for stage in stages:
        marker = run.path("stages", f"{stage}.json")
        if os.path.exists(marker):
            saved = _read_json(marker)
            results[stage], seconds[stage] = saved["results"], saved["seconds"]
            run.log(f"[{stage}] done before ({seconds[stage]:.0f} s); skipped")
            continue
        run.log(f"[{stage}] ...")
        started = time.perf_counter()
        if stage == "report":
            results[stage] = stage_report(run, {**results, "stage_seconds": seconds, "total_seconds": sum(seconds.values())})
        else:
            results[stage] = STAGE_FUNCTIONS[stage](run)
        seconds[stage] = time.perf_counter() - started
        _write_json(marker, {"results": results[stage], "seconds": seconds[stage]})
        run.log(f"[{stage}] finished in {seconds[stage]:.0f} s")
    return {**results, "stage_seconds": seconds, "total_seconds": sum(seconds.values())}


STAGE_FUNCTIONS: dict[str, Callable[[DemoRun], dict[str, Any]]] = {
    "data": stage_data,
    "convert": stage_convert,
    "evaluate": stage_evaluate,
    "export": stage_export,
}
