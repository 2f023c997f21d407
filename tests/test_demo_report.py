"""The demo report and the ablation table, from results dictionaries (no model needed)."""
from __future__ import annotations

import pytest

from efficient_dlm.demo import ablate, report


def _setting(acc: float, tpf: float, threshold=None, strategy="threshold") -> dict:
    return {
        "strategy": strategy, "threshold": threshold, "accuracy": {"add": acc, "sort": acc, "all": acc},
        "tokens_per_forward": tpf, "tokens_per_second": 123.0, "examples": [],
    }


@pytest.mark.parametrize(
    "dlm_acc, tpf, bar, stretch",
    [(79.0, 2.0, "met", "not met"), (77.9, 3.5, "NOT met", "not met"), (80.0, 1.9, "NOT met", "not met"), (79.0, 3.0, "met", "met")],
)
def test_verdict_applies_the_issue_bar(dlm_acc, tpf, bar, stretch):
    teacher = _setting(80.0, 1.0, strategy="ar")
    text = report.verdict(teacher, [_setting(dlm_acc, tpf, 0.9)])
    assert f"bar (within 2 points, TPF >= 2) {bar}" in text
    assert f"stretch (1 point, TPF >= 3) {stretch}" in text
    assert "no dLM evaluation" in report.verdict(teacher, [_setting(dlm_acc, tpf, 0.8)])


def test_markdown_and_plot(tmp_path):
    teacher = _setting(80.0, 1.0, strategy="ar")
    dlm = [_setting(70.0, 3.0, 0.7), _setting(79.5, 2.2, 0.9)]
    results = {
        "evaluate": {"teacher": teacher, "dlm": dlm, "text": {"teacher_nll": 1.5, "dlm_elbo": 1.75},
                     "num_prompts": 14, "per_task": 7, "batch_size": 8, "block_size": 16},
        "stage_seconds": {"data": 1.0, "convert": 2.0}, "total_seconds": 3.0,
    }
    text = report.markdown(results)
    assert "| dLM | threshold 0.7 | 70.0 | 70.0 | 70.0 | 3.00 | 123 |" in text
    assert "| AR teacher | ar (greedy) | 80.0 |" in text
    assert "| dLM | ELBO (upper bound on NLL) | 1.750 |" in text
    path = report.plot(teacher, dlm, str(tmp_path / "p.png"))
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_ablation_variants_change_only_what_they_name():
    from efficient_dlm.config import base_config

    c = base_config()
    c.diffusion.objective, c.diffusion.block_size = "block_diffusion", 4
    assert ablate.variant_config(c, "block_clean").to_dict() == c.to_dict()
    v = ablate.variant_config(c, "block16")
    assert (v.diffusion.block_size, v.sample.block_size, v.diffusion.objective) == (16, 16, "block_diffusion")
    assert ablate.variant_config(c, "uniform").diffusion.masking == "uniform"
    mdlm = ablate.variant_config(c, "bidirectional").diffusion  # MDLM: full attention AND uniform masking
    assert (mdlm.objective, mdlm.masking) == ("bidirectional", "uniform")
    assert c.diffusion.block_size == 4  # the recipe itself is untouched
    c.demo.variants = "ar, block32"
    assert ablate.selected(c) == ["ar", "block32"]
    c.demo.variants = "ar,causal"
    with pytest.raises(ValueError, match="unknown ablation variant 'causal'"):
        ablate.selected(c)
