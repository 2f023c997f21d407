"""The demo's report: a Markdown summary and the accuracy-versus-tokens-per-forward plot.

Both are written from the JSON results alone, so a finished run can be re-reported without
recomputing anything, and tests can check the report against the numbers it was made from.
"""
from __future__ import annotations

import os
from typing import Any

PLOT_NAME = "accuracy_vs_tpf.png"
RESULTS_NAME = "results.json"


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _code(text: str) -> str:
    """Inline-code form of a model output (newlines shown as \\n, backticks kept from closing it)."""
    return "`" + text.replace("\n", "\\n").replace("`", "'") + "`"


def setting_name(r: dict[str, Any]) -> str:
    if r["strategy"] == "ar":
        return "ar"
    if r["strategy"] == "speculative":
        return f"speculative_{r.get('verifier', 'model')}"
    return f"{r['strategy']}_{r['threshold']}"


def setting_label(r: dict[str, Any]) -> str:
    """How the report's table names a dLM setting."""
    if r["strategy"] == "speculative":
        verifier = r.get("verifier")
        return "self-speculative (fused)" if verifier == "self" else f"speculative, {verifier} verifies"
    return f"{r['strategy']} {r['threshold']}"


def _order(r: dict[str, Any]) -> tuple:
    """Threshold settings by threshold, then the speculative ones."""
    return (r["strategy"] == "speculative", r["threshold"] if r["threshold"] is not None else 0.0, setting_name(r))


def _tok_s(r: dict[str, Any], batch: str) -> float | None:
    return r.get("tok_s", {}).get(batch)


def _batches(teacher: dict[str, Any]) -> list[str]:
    """The batch sizes speed was measured at, the report's batch last ("1", "64")."""
    return sorted(teacher.get("tok_s", {}), key=int)


def default_setting(dlm: list[dict[str, Any]], name: str | None) -> dict[str, Any] | None:
    """The dLM result named `name` (setting_name), if evaluated."""
    return next((r for r in dlm if name is not None and setting_name(r) == name), None)


def default_name(ev: dict[str, Any]) -> str | None:
    """The evaluation's default setting (older results name only the default threshold)."""
    if "default" in ev:
        return ev["default"]
    return None if ev.get("default_threshold") is None else f"threshold_{ev['default_threshold']}"


def task_table(teacher: dict[str, Any], dlm: list[dict[str, Any]], task_names: list[str]) -> list[str]:
    """One row per decoding setting: accuracy (%) overall, its paired difference from the teacher
    with the 95% interval, per task, TPF, and generated tokens/s at each measured batch size."""
    batches = _batches(teacher)
    head = ["model", "decoding", "accuracy", "vs teacher (95% CI)", *task_names, "tokens/forward",
            *(f"tok/s @{b}" for b in batches), *(f"x AR @{b}" for b in batches)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rows = [("AR teacher", "ar (greedy)", teacher)] + [("dLM", setting_label(r), r) for r in sorted(dlm, key=_order)]
    for name, decoding, r in rows:
        acc = r["accuracy"]
        pair = r.get("vs_teacher")
        vs = "-" if pair is None or r is teacher else f"{pair['diff']:+.1f} [{pair['low']:+.1f}, {pair['high']:+.1f}]"
        cells = [name, decoding, _fmt(acc["all"], 1), vs, *(_fmt(acc.get(t), 1) for t in task_names)]
        cells += [_fmt(r["tokens_per_forward"]), *(_fmt(_tok_s(r, b), 0) for b in batches)]
        cells += [_fmt(_ratio(r, teacher, b)) for b in batches]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _ratio(r: dict[str, Any], teacher: dict[str, Any], batch: str) -> float | None:
    mine, base = _tok_s(r, batch), _tok_s(teacher, batch)
    return mine / base if mine and base else None


def verdict(teacher: dict[str, Any], dlm: list[dict[str, Any]], default: str | None) -> str:
    """The issue's bar for the default decoding: within 1 point of the teacher at TPF >= 4 (stretch
    TPF >= 6), with the dLM / AR tokens-per-second ratio at each measured batch size."""
    at = default_setting(dlm, default)
    if at is None:
        return f"(no dLM evaluation of the default setting {default})"
    gap = at["accuracy"]["all"] - teacher["accuracy"]["all"]
    tpf = at["tokens_per_forward"]
    met = "met" if gap >= -1.0 and tpf >= 4.0 else "NOT met"
    stretch = "met" if gap >= -1.0 and tpf >= 6.0 else "not met"
    speed = ", ".join(f"{_ratio(at, teacher, b):.2f}x at batch {b}" for b in _batches(teacher) if _ratio(at, teacher, b))
    return (
        f"At {setting_label(at)} (the default decoding) the dLM's accuracy is {gap:+.1f} points from the AR "
        f"teacher's with {tpf:.2f} tokens per forward: bar (within 1 point, TPF >= 4) {met}; stretch (TPF >= 6) "
        f"{stretch}. Generated tokens/s against the teacher: {speed or 'not measured'}."
    )


def plot(teacher: dict[str, Any], dlm: list[dict[str, Any]], path: str, title: str = "") -> str:
    """Accuracy against tokens per forward and against generated tokens/s (each measured batch size):
    the dLM's threshold curve and the AR teacher's point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted([r for r in dlm if r["strategy"] != "speculative"], key=lambda r: r["tokens_per_forward"])
    spec = [r for r in dlm if r["strategy"] == "speculative"]
    acc = [r["accuracy"]["all"] for r in rows]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4), dpi=120)
    ax.plot([r["tokens_per_forward"] for r in rows], acc, "o-", label="dLM (threshold)")
    for r in rows:
        ax.annotate(f"{r['threshold']}", (r["tokens_per_forward"], r["accuracy"]["all"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    marks = {setting_name(r): m for r, m in zip(spec, "DPX*")}  # one marker per speculative setting, both panels
    for r in spec:
        ax.plot([r["tokens_per_forward"]], [r["accuracy"]["all"]], marks[setting_name(r)], label=f"dLM, {setting_label(r)}")
    ax.plot([teacher["tokens_per_forward"]], [teacher["accuracy"]["all"]], "s", color="black", label="AR teacher")
    ax.set_xlabel("tokens per forward pass")
    ax.set_ylabel("held-out task accuracy (%)")
    for batch, marker in zip(_batches(teacher) or [None], "o^v"):
        speeds = [_tok_s(r, batch) if batch else r["tokens_per_second"] for r in rows]
        base = _tok_s(teacher, batch) if batch else teacher["tokens_per_second"]
        line, = ax2.plot(speeds, acc, marker + "-", label=f"dLM, batch {batch}")
        for r in spec:
            ax2.plot([_tok_s(r, batch) if batch else r["tokens_per_second"]], [r["accuracy"]["all"]],
                     marks[setting_name(r)], color=line.get_color(), label=f"dLM, {setting_label(r)}, batch {batch}")
        ax2.plot([base], [teacher["accuracy"]["all"]], "s", color=line.get_color(), markeredgecolor="black",
                 label=f"AR teacher, batch {batch}")
    ax2.set_xscale("log")
    ax2.set_xlabel("generated tokens per second (log)")
    for a in (ax, ax2):
        a.grid(alpha=0.3)
        a.legend(loc="best", fontsize=6)
    fig.suptitle(title or "Accuracy vs tokens per forward and tokens/s")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _entry(r: dict[str, Any]) -> dict[str, Any]:
    acc = r["accuracy"]
    extra = {k: r[k] for k in ("vs_teacher", "verifier", "tokens_per_verifier_forward") if k in r}
    return {"name": setting_name(r), "strategy": r["strategy"], "threshold": r["threshold"], "accuracy": acc["all"],
            "per_task": {k: v for k, v in acc.items() if k != "all"}, "tpf": r["tokens_per_forward"],
            "tok_s": dict(r.get("tok_s", {})), **extra}


def results_json(results: dict[str, Any]) -> dict[str, Any]:
    """DIR/results.json: the machine-readable summary (layout of issue #19; accuracies in percent)."""
    ev = results["evaluate"]
    default = default_setting(ev["dlm"], default_name(ev))
    teacher = {**_entry(ev["teacher"]), "tpf": 1.0}
    teacher.pop("strategy"), teacher.pop("threshold")
    return {
        "prompts": ev["num_prompts"], "report_batch": ev["batch_size"],
        "default": setting_name(default) if default else None,
        "hf_dir": results.get("export", {}).get("hf_dir"),
        "teacher": teacher, "dlm": [_entry(r) for r in ev["dlm"]],
    }


def markdown(results: dict[str, Any]) -> str:
    """The whole report.md from the demo's results dictionary (see pipeline.py for its keys)."""
    ev = results["evaluate"]
    teacher, dlm = ev["teacher"], ev["dlm"]
    task_names = [t for t in teacher["accuracy"] if t != "all"]
    lines = [
        "# efficient_dlm demo: an AR teacher becomes a block-diffusion LM",
        "",
        f"Command: `{results.get('command', 'edlm demo')}`  ",
        f"Machine: {results.get('machine', '?')}  ",
        f"Total time: {_fmt(results.get('total_seconds'), 0)} s (stages: "
        + ", ".join(f"{k} {_fmt(v, 0)} s" for k, v in results.get("stage_seconds", {}).items())
        + ")",
        "",
        "## Held-out tasks (exact match, greedy)",
        "",
        f"{ev['num_prompts']} held-out prompts ({ev['per_task']} per task), batch {ev['batch_size']}, "
        f"dLM block size {ev['block_size']}. tokens/s at batch 1 over the first {ev.get('speed_prompts', '?')} prompts; "
        "\"vs teacher\": the paired accuracy difference on the same prompts with its 95% interval.",
        "",
        *task_table(teacher, dlm, task_names),
        "",
        verdict(teacher, dlm, default_name(ev)),
        "",
        f"![accuracy vs tokens per forward]({PLOT_NAME})",
        "",
        "## Held-out text (Python standard library)",
        "",
        "| model | quantity | nats/token |",
        "|---|---|---|",
        f"| AR teacher | NLL | {_fmt(ev['text']['teacher_nll'], 3)} |",
        f"| dLM | ELBO (upper bound on NLL) | {_fmt(ev['text']['dlm_elbo'], 3)} |",
        "",
    ]
    conv = results.get("convert", {})
    if conv:
        lines += [
            "## Conversion (block-diffusion continued pretraining)",
            "",
            f"{conv.get('steps')} steps x {conv.get('batch_size')} sequences x {conv.get('seq_len')} tokens "
            f"({conv.get('tokens', 0) / 1e6:.2f}M tokens), final training loss {_fmt(conv.get('final_loss'), 3)}.",
            "",
        ]
    hf = results.get("export", {})
    if hf:
        lines += [
            "## Export and reload in transformers",
            "",
            f"Exported to `{hf.get('hf_dir')}`; reloaded with `AutoModelForCausalLM.from_pretrained(..., "
            "trust_remote_code=True)` and generated:",
            "",
        ]
        lines += [
            f"- {_code(s['prompt'])} -> {_code(s['output'])} (expected {_code(s['answer'])}; "
            f"{'same tokens as' if s['same_as_efficient_dlm'] else 'DIFFERENT tokens from'} efficient_dlm.generate)"
            for s in hf.get("samples", [])
        ]
        lines.append("")
    examples = dlm[-1]["examples"] if dlm else []
    if examples:
        lines += ["## Sample dLM outputs", ""]
        lines += [f"- {_code(e['prompt'])} -> {_code(e['output'])} (expected {_code(e['answer'])})" for e in examples]
        lines.append("")
    return "\n".join(lines)
