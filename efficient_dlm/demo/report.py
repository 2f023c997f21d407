"""The demo's report: a Markdown summary and the accuracy-versus-tokens-per-forward plot.

Both are written from the JSON results alone, so a finished run can be re-reported without
recomputing anything, and tests can check the report against the numbers it was made from.
"""
from __future__ import annotations

import os
from typing import Any

PLOT_NAME = "accuracy_vs_tpf.png"


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _code(text: str) -> str:
    """Inline-code form of a model output (newlines shown as \\n, backticks kept from closing it)."""
    return "`" + text.replace("\n", "\\n").replace("`", "'") + "`"


def task_table(teacher: dict[str, Any], dlm: list[dict[str, Any]], task_names: list[str]) -> list[str]:
    """One row per decoding setting: overall and per-task accuracy (%), TPF, generated tokens/s."""
    head = ["model", "decoding", "accuracy", *task_names, "tokens/forward", "tokens/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rows = [("AR teacher", "ar (greedy)", teacher)] + [
        ("dLM", f"threshold {r['threshold']}", r) for r in sorted(dlm, key=lambda r: r["threshold"])
    ]
    for name, decoding, r in rows:
        acc = r["accuracy"]
        cells = [name, decoding, _fmt(acc["all"], 1), *(_fmt(acc.get(t), 1) for t in task_names)]
        cells += [_fmt(r["tokens_per_forward"]), _fmt(r["tokens_per_second"], 0)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def verdict(teacher: dict[str, Any], dlm: list[dict[str, Any]], threshold: float = 0.9) -> str:
    """The issue's bar: at threshold 0.9, within 2 points of the teacher with TPF >= 2 (stretch 1 / 3)."""
    at = next((r for r in dlm if abs(r["threshold"] - threshold) < 1e-9), None)
    if at is None:
        return f"(no dLM evaluation at threshold {threshold})"
    gap = at["accuracy"]["all"] - teacher["accuracy"]["all"]
    tpf = at["tokens_per_forward"]
    met = "met" if gap >= -2.0 and tpf >= 2.0 else "NOT met"
    stretch = "met" if gap >= -1.0 and tpf >= 3.0 else "not met"
    return (
        f"At threshold {threshold} the dLM's accuracy is {gap:+.1f} points from the AR teacher's with "
        f"{tpf:.2f} tokens per forward: bar (within 2 points, TPF >= 2) {met}; stretch (1 point, TPF >= 3) {stretch}."
    )


def plot(teacher: dict[str, Any], dlm: list[dict[str, Any]], path: str, title: str = "") -> str:
    """Accuracy vs tokens per forward: the dLM's threshold curve and the AR teacher's point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(dlm, key=lambda r: r["tokens_per_forward"])
    fig, ax = plt.subplots(figsize=(5.5, 4), dpi=120)
    ax.plot([r["tokens_per_forward"] for r in rows], [r["accuracy"]["all"] for r in rows], "o-", label="dLM (threshold)")
    for r in rows:
        ax.annotate(f"{r['threshold']}", (r["tokens_per_forward"], r["accuracy"]["all"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.plot([teacher["tokens_per_forward"]], [teacher["accuracy"]["all"]], "s", color="black", label="AR teacher")
    ax.set_xlabel("tokens per forward pass")
    ax.set_ylabel("held-out task accuracy (%)")
    ax.set_title(title or "Accuracy vs tokens per forward")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


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
        f"dLM block size {ev['block_size']}.",
        "",
        *task_table(teacher, dlm, task_names),
        "",
        verdict(teacher, dlm),
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
