"""The demo report and the ablation table, from results dictionaries (no model needed)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from efficient_dlm.demo import ablate, evaluate, report


def _setting(acc: float, tpf: float, threshold=None, strategy="threshold", tok_s=(100.0, 400.0)) -> dict:
    return {
        "strategy": strategy, "threshold": threshold, "accuracy": {"add": acc, "sort": acc, "all": acc},
        "tokens_per_forward": tpf, "tokens_per_second": tok_s[1], "tok_s": {"1": tok_s[0], "64": tok_s[1]},
        "examples": [],
    }


@pytest.mark.parametrize(
    "dlm_acc, tpf, bar, stretch",
    [(79.0, 4.0, "met", "not met"), (78.9, 6.5, "NOT met", "not met"), (80.0, 3.9, "NOT met", "not met"), (79.5, 6.0, "met", "met")],
)
def test_verdict_applies_the_issue_bar(dlm_acc, tpf, bar, stretch):
    teacher = _setting(80.0, 1.0, strategy="ar")
    text = report.verdict(teacher, [_setting(dlm_acc, tpf, 0.9, tok_s=(250.0, 200.0))], "threshold_0.9")
    assert f"bar (within 1 point, TPF >= 4) {bar}" in text
    assert f"stretch (TPF >= 6) {stretch}" in text
    assert "2.50x at batch 1, 0.50x at batch 64" in text
    assert "no dLM evaluation" in report.verdict(teacher, [_setting(dlm_acc, tpf, 0.8)], "threshold_0.9")


def test_paired_difference_against_a_direct_computation():
    rng = np.random.default_rng(0)
    teacher = rng.random(500) < 0.8
    dlm = np.where(rng.random(500) < 0.9, teacher, ~teacher)
    got = evaluate.paired_difference(list(dlm), list(teacher))
    n_up, n_down = int((dlm & ~teacher).sum()), int((~dlm & teacher).sum())
    mean = 100.0 * (n_up - n_down) / 500
    var = (100.0**2 * (n_up + n_down) / 500 - mean**2) * 500 / 499  # sample variance of d_i in {-100, 0, 100}
    assert got["diff"] == pytest.approx(mean)
    assert got["high"] - got["diff"] == pytest.approx(1.96 * np.sqrt(var / 500))
    assert got["diff"] - got["low"] == pytest.approx(got["high"] - got["diff"])


def test_markdown_results_json_and_plot(tmp_path):
    teacher = _setting(80.0, 1.0, strategy="ar")
    dlm = [_setting(70.0, 3.0, 0.7), _setting(79.5, 4.2, 0.9, tok_s=(300.0, 500.0))]
    dlm[1]["vs_teacher"] = {"diff": -0.5, "low": -1.2, "high": 0.2}
    results = {
        "evaluate": {"teacher": teacher, "dlm": dlm, "text": {"teacher_nll": 1.5, "dlm_elbo": 1.75},
                     "num_prompts": 14, "per_task": 7, "batch_size": 64, "block_size": 16, "default_threshold": 0.9,
                     "speed_prompts": 4},
        "export": {"hf_dir": "/x/hf"}, "stage_seconds": {"data": 1.0, "convert": 2.0}, "total_seconds": 3.0,
    }
    text = report.markdown(results)
    assert "| dLM | threshold 0.9 | 79.5 | -0.5 [-1.2, +0.2] | 79.5 | 79.5 | 4.20 | 300 | 500 | 3.00 | 1.25 |" in text
    assert "| AR teacher | ar (greedy) | 80.0 | - |" in text
    assert "| dLM | ELBO (upper bound on NLL) | 1.750 |" in text
    out = report.results_json(results)
    assert out["prompts"] == 14 and out["report_batch"] == 64 and out["default"] == "threshold_0.9"
    assert out["hf_dir"] == "/x/hf"
    assert out["teacher"] == {"name": "ar", "accuracy": 80.0, "per_task": {"add": 80.0, "sort": 80.0}, "tpf": 1.0,
                              "tok_s": {"1": 100.0, "64": 400.0}}
    assert out["dlm"][1] == {"name": "threshold_0.9", "strategy": "threshold", "threshold": 0.9, "accuracy": 79.5,
                             "per_task": {"add": 79.5, "sort": 79.5}, "tpf": 4.2, "tok_s": {"1": 300.0, "64": 500.0},
                             "vs_teacher": {"diff": -0.5, "low": -1.2, "high": 0.2}}
    json.dumps(out)
    path = report.plot(teacher, dlm, str(tmp_path / "p.png"))
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    # A speculative setting named as the default: its row, its entry, and the summary line judge it.
    spec = {**_setting(80.0, 4.5, 0.9, strategy="speculative", tok_s=(200.0, 100.0)), "verifier": "self",
            "tokens_per_verifier_forward": 6.0, "vs_teacher": {"diff": 0.0, "low": -0.3, "high": 0.3}}
    results["evaluate"] = {**results["evaluate"], "dlm": dlm + [spec], "default": "speculative_self"}
    text = report.markdown(results)
    assert "| dLM | self-speculative (fused) | 80.0 | +0.0 [-0.3, +0.3] | 80.0 | 80.0 | 4.50 | 200 | 100 | 2.00 | 0.25 |" in text
    assert "At self-speculative (fused) (the default decoding) the dLM's accuracy is +0.0 points" in text
    assert "bar (within 1 point, TPF >= 4) met" in text
    out = report.results_json(results)
    assert out["default"] == "speculative_self"
    assert out["dlm"][2]["name"] == "speculative_self" and out["dlm"][2]["tokens_per_verifier_forward"] == 6.0
    report.plot(teacher, dlm + [spec], str(tmp_path / "q.png"))


def test_ablation_variants_change_only_what_they_name():
    from efficient_dlm.config import base_config, override, typed

    c = base_config()
    c.diffusion.objective, c.diffusion.block_size = "block_diffusion", 16
    c = typed(c)
    assert ablate.variant_config(c, "block_clean") == c
    v = ablate.variant_config(c, "block8")
    assert (v.diffusion.block_size, v.sample.block_size, v.diffusion.objective) == (8, 8, "block_diffusion")
    assert ablate.variant_config(c, "uniform").diffusion.masking == "uniform"
    mdlm = ablate.variant_config(c, "bidirectional").diffusion  # MDLM: full attention AND uniform masking
    assert (mdlm.objective, mdlm.masking) == ("bidirectional", "uniform")
    assert c.diffusion.block_size == 16  # the recipe itself is untouched
    assert ablate.selected(override(c, {"demo.variants": "ar, block32"})) == ["ar", "block32"]
    with pytest.raises(ValueError, match="unknown ablation variant 'causal'"):
        ablate.selected(override(c, {"demo.variants": "ar,causal"}))
