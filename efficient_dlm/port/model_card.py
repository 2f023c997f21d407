"""The model card (README.md) of an export: how to load and decode it, the recipe, the measured numbers.

Only what the checkpoint records is reported: training metadata from model_config.json "extra"
(objective, block size, steps, data, ...) and any numbers stored under "metrics", "eval" or "bench".
Nothing is estimated here.
"""
from __future__ import annotations

import json
from typing import Any

from efficient_dlm.models.config import ModelConfig
from efficient_dlm.diffusion.spec import DiffusionSpec

NUMBER_SECTIONS = ("metrics", "eval", "bench")
# Of the full recipe the trainer stores ("train_config"), the entries a reader of the card needs.
RECIPE_KEYS = ("diffusion.", "train.steps", "train.batch_size", "train.learning_rate", "train.schedule", "data.seq_len", "data.train_files")


def _cell(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _table(rows: dict[str, Any]) -> list[str]:
    lines = ["| key | value |", "|---|---|"]
    lines += [f"| {k} | {_cell(v)} |" for k, v in rows.items()]
    return lines


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def recipe_rows(extra: dict[str, Any]) -> dict[str, Any]:
    """Top-level metadata plus the recipe entries of RECIPE_KEYS, flattened to dotted names."""
    rows = {}
    for key, value in _flatten({k: v for k, v in extra.items() if k not in NUMBER_SECTIONS}).items():
        key = key.removeprefix("train_config.")
        if "." not in key or key.startswith(RECIPE_KEYS):
            rows[key] = value
    return rows


def _decoding(spec: DiffusionSpec) -> str:
    if spec.strategy == "self_speculative":
        return "self_speculative (the dLM drafts each block, its own causal mode verifies: lossless w.r.t. that mode)"
    knob = {"threshold": "threshold", "topk": "tokens_per_step", "factor": "factor", "entropy": "entropy_bound"}[spec.strategy]
    return f"{spec.strategy}, {knob} {getattr(spec, knob)}"


def _usage(dlm: DiffusionSpec | None) -> list[str]:
    if dlm is None:
        return [
            "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            'tokenizer = AutoTokenizer.from_pretrained("PATH")',
            'model = AutoModelForCausalLM.from_pretrained("PATH")',
            "```",
        ]
    return [
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        'tokenizer = AutoTokenizer.from_pretrained("PATH", trust_remote_code=True, padding_side="left")',
        'model = AutoModelForCausalLM.from_pretrained("PATH", trust_remote_code=True)',
        'batch = tokenizer(["The capital of France is"], return_tensors="pt", padding=True)',
        "out = model.generate(**batch, max_new_tokens=64)  # decoding defaults: the model's diffusion spec",
        "print(tokenizer.batch_decode(out[:, batch.input_ids.shape[1]:], skip_special_tokens=True))",
        "```",
        "",
        "`model(input_ids)` returns logits under block-causal attention (`attention=\"causal\"` or",
        '`"bidirectional"` select the other patterns). Requires transformers >= 5.',
    ]


def render(
    cfg: ModelConfig, dlm: DiffusionSpec | None, extra: dict[str, Any], dtype: str, name: str, logged: dict[str, dict] | None = None
) -> str:
    """README.md text for an export of `cfg` (dLM when `dlm` is given).

    logged: the last training-log record of each kind ("train", "eval") of the run, if any.
    """
    kind = "block-diffusion language model (dLM)" if dlm else f"{cfg.model_type} causal language model"
    tags = ["efficient_dlm"] + (["block-diffusion", "dllm"] if dlm else [])
    lines = ["---", "library_name: transformers", "tags:"] + [f"- {t}" for t in tags] + ["---", ""]
    lines += [f"# {name}", "", f"A {kind} exported by efficient_dlm."]
    if dlm:
        lines += [
            f"It keeps the {cfg.model_type} architecture and weights layout and decodes blocks of "
            f"{dlm.block_size} tokens in parallel: a block starts as [MASK] (token id {cfg.mask_token_id}) and every step",
            f"commits each masked position whose confidence reaches the threshold ({dlm.threshold} by default), at least",
            "one per step; finished blocks are kept in an exact prefix KV cache.",
        ]
    lines += ["", "## Use", ""] + _usage(dlm)
    recipe = recipe_rows(extra)
    lines += ["", "## Recipe", ""]
    if dlm:
        lines += _table(
            {
                "block size": dlm.block_size,
                "token shift": dlm.token_shift,
                "attention": "block-causal",
                "default decoding": _decoding(dlm),
            }
        )
        lines.append("")
    lines += _table(_flatten(recipe)) if recipe else ["No training metadata was recorded in the checkpoint."]
    numbers = {k: extra[k] for k in NUMBER_SECTIONS if k in extra}
    numbers.update({f"last {kind} log": record for kind, record in (logged or {}).items()})
    lines += ["", "## Measured numbers", ""]
    lines += _table(_flatten(numbers)) if numbers else ["None recorded in the checkpoint."]
    arch = {
        "model_type": cfg.model_type,
        "layers": cfg.num_layers,
        "hidden size": cfg.hidden_size,
        "heads / kv heads": f"{cfg.num_heads} / {cfg.num_kv_heads}",
        "vocabulary": cfg.vocab_size,
        "tensor dtype": dtype,
    }
    if cfg.is_moe:
        arch["experts"] = f"{cfg.num_experts}, {cfg.num_experts_per_tok} per token"
        arch["MoE routing"] = moe_routing(cfg)
    lines += ["", "## Architecture", ""] + _table(arch) + [""]
    return "\n".join(lines)


def moe_routing(cfg: ModelConfig) -> str:
    """The routing policy per phase (docs/METHOD.md section 7) in one line."""
    clean = "clean context dropless" if cfg.clean_routing == "dropless" else "clean context with a capacity of its own"
    trained = (
        f"trained with expert capacity {cfg.capacity_factor} on the noisy (x_t) tokens, {clean}"
        if cfg.capacity_factor is not None else "trained dropless"
    )
    return f"dropless at inference (every token visits its {cfg.num_experts_per_tok} experts); {trained}"
