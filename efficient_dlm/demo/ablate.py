"""`edlm ablate`: the Efficient-DLM paper's comparisons, at demo scale, with equal token budgets.

Every variant starts from the same AR teacher and trains for the same steps x batch x length on the
same data (the demo's), then is evaluated on the same held-out tasks and text:

    ar              continued next-token training (the baseline), decoded autoregressively
    bidirectional   MDLM / LLaDA full diffusion (full attention; uniform masking, one rate per sequence)
    block           block diffusion without clean context (block-causal attention over x_t)
    block_clean     block diffusion with clean context [x_t ; x_0] (Efficient-DLM, the demo's default)
    uniform         block_clean with uniform instead of position-dependent masking
    block4/8/32     block_clean with block size 4 / 8 / 32 (the demo's default is 16)

Diffusion variants are decoded with the threshold sampler at the recipe's block size (bidirectional
too: semi-autoregressive block decoding, as LLaDA does; its prefix cache is then an approximation,
which is part of what the comparison shows). Each variant lives in DIR/<variant>/ with the demo's
resumable stage markers; DIR/results.md and DIR/ablation.png collect them.
"""
from __future__ import annotations

import os
from typing import Any

from efficient_dlm.config import Config, ConfigLike, override, typed
from efficient_dlm.demo import pipeline
from efficient_dlm.errors import UserError

# name: (what it tests, {section.key: value} overrides of the recipe)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "ar": ("AR continued training", {"diffusion.objective": "ar", "diffusion.confidence_weight": 0.0,
                                     "diffusion.ar_weight": 0.0}),
    "bidirectional": ("full bidirectional (MDLM)", {"diffusion.objective": "bidirectional", "diffusion.masking": "uniform"}),
    "block": ("block, no clean context", {"diffusion.objective": "block"}),
    "block_clean": ("block + clean context", {}),
    "uniform": ("block + clean context, uniform masking", {"diffusion.masking": "uniform"}),
    "block4": ("block + clean context, block 4", {"diffusion.block_size": 4, "sample.block_size": 4}),
    "block8": ("block + clean context, block 8", {"diffusion.block_size": 8, "sample.block_size": 8}),
    "block32": ("block + clean context, block 32", {"diffusion.block_size": 32, "sample.block_size": 32}),
}


def variant_config(config: Config, name: str) -> Config:
    if name not in VARIANTS:
        raise UserError(f"unknown ablation variant {name!r}; choose from {', '.join(VARIANTS)}")
    # The table compares training methods under the threshold decoder: no speculative settings. The
    # selection (demo.variants) is not part of a variant's recipe: variants run one at a time and later
    # together resume the same directories.
    return override(config, {"demo.speculative": "", "demo.default": "", "demo.variants": "", **VARIANTS[name][1]})


def selected(config: Config) -> list[str]:
    names = [n.strip() for n in config.demo.variants.split(",") if n.strip()] or list(VARIANTS)
    for name in names:
        variant_config(config, name)  # validates the name
    return names


def run_ablation(config: ConfigLike, out: str, *, command: str = "edlm ablate") -> dict[str, Any]:
    """Trains and evaluates every selected variant (resumable); writes DIR/results.md and the plot.
    config: the typed Config, or the CLI's ConfigDict (typed here, once)."""
    config, out = typed(config), os.path.abspath(out)
    names = selected(config)
    data_dir = os.path.join(out, "data")
    rows: dict[str, Any] = {}
    for name in names:
        print(f"=== variant {name}: {VARIANTS[name][0]}")
        results = pipeline.run_demo(
            variant_config(config, name), os.path.join(out, name), command=command,
            stages=("data", "convert", "evaluate"), data_dir=data_dir,
        )
        rows[name] = results
    table = results_table(rows)
    plot_path = plot(rows, os.path.join(out, "ablation.png"))
    text = "\n".join([f"Command: `{command}`", "", *table, "", f"![ablation]({os.path.basename(plot_path)})", ""])
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(text)
    return {"variants": rows, "table": table, "plot": plot_path}


def _row(name: str, results: dict[str, Any]) -> dict[str, Any]:
    ev = results["evaluate"]
    model = ev["dlm"][0] if ev["dlm"] else ev["teacher"]
    return {
        "variant": name,
        "what": VARIANTS[name][0],
        "accuracy": model["accuracy"]["all"],
        "teacher": ev["teacher"]["accuracy"]["all"],
        "tokens_per_forward": model["tokens_per_forward"],
        "text": ev["text"]["dlm_elbo"],
        "decoding": "ar" if model["strategy"] == "ar" else f"threshold {model['threshold']}, block {ev['block_size']}",
    }


def results_table(rows: dict[str, Any]) -> list[str]:
    lines = [
        "| variant | what | decoding | task accuracy (%) | AR teacher (%) | tokens/forward | text NLL / ELBO (nats/token) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, results in rows.items():
        r = _row(name, results)
        lines.append(
            f"| {name} | {r['what']} | {r['decoding']} | {r['accuracy']:.1f} | {r['teacher']:.1f} | "
            f"{r['tokens_per_forward']:.2f} | {r['text']:.3f} |"
        )
    return lines


def plot(rows: dict[str, Any], path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for name, results in rows.items():
        r = _row(name, results)
        ax.plot([r["tokens_per_forward"]], [r["accuracy"]], "o")
        ax.annotate(name, (r["tokens_per_forward"], r["accuracy"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    first = next(iter(rows.values()))
    ax.axhline(first["evaluate"]["teacher"]["accuracy"]["all"], color="gray", ls="--", lw=1, label="AR teacher")
    ax.set_xlabel("tokens per forward pass")
    ax.set_ylabel("held-out task accuracy (%)")
    ax.set_title("Ablation at equal token budget")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
