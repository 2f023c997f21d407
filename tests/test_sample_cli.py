"""`edlm sample` and `edlm bench` end to end, in-process, on tiny checkpoints with a real tokenizer."""
import json

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from efficient_dlm import checkpoints, cli
from efficient_dlm.sample import generate
from tests.sample_reference import peaked_model

SAMPLE = ["--config.sample.block_size=4", "--config.sample.max_new_tokens=6", "--config.sample.threshold=0.5"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A dLM checkpoint (vocabulary w0..w94 + [MASK]) with its WordLevel tokenizer."""
    root = tmp_path_factory.mktemp("sample_cli")
    vocab = {f"w{i}": i for i in range(95)} | {"[MASK]": 95}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    (root / "tok").mkdir()
    tokenizer.save(str(root / "tok" / "tokenizer.json"))
    model = peaked_model()
    checkpoints.save(model, str(root / "dlm"), tokenizer_dir=str(root / "tok"))
    checkpoints.save(peaked_model(mask_token_id=None), str(root / "ar"), tokenizer_dir=str(root / "tok"))
    return root, model, tokenizer


def test_sample_writes_the_completions_generate_produces(ckpt, tmp_path):
    root, model, tokenizer = ckpt
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt_ids": [4, 8, 15, 16, 23, 42, 7], "reference": "w1"}) + "\n")
    out = tmp_path / "out.jsonl"
    argv = ["edlm", "sample", "--ckpt", str(root / "dlm"), "--prompt", "w3 w14 w15 w9 w26", "--prompts_jsonl", str(prompts),
            "--out", str(out), *SAMPLE]
    assert cli.main(argv) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    ids = [tokenizer.encode("w3 w14 w15 w9 w26").ids, [4, 8, 15, 16, 23, 42, 7]]
    expected = generate(model, ids, max_new_tokens=6, block_size=4, threshold=0.5)
    assert [r["prompt_ids"] for r in records] == ids
    assert [r["completion_ids"] for r in records] == expected.sequences
    assert records[0]["completion"] == tokenizer.decode(expected.sequences[0])
    assert [r["forward_passes"] for r in records] == expected.row_forwards.tolist()
    assert records[1]["reference"] == "w1"


def test_sample_with_a_verifier_writes_the_verifiers_own_completions(ckpt, tmp_path):
    root, model, tokenizer = ckpt
    out = tmp_path / "out.jsonl"
    argv = ["edlm", "sample", "--ckpt", str(root / "dlm"), "--verifier", str(root / "ar"), "--prompt", "w3 w14 w15 w9 w26",
            "--prompt", "w8", "--out", str(out), *SAMPLE]
    assert cli.main(argv) == 0
    ids = [tokenizer.encode("w3 w14 w15 w9 w26").ids, tokenizer.encode("w8").ids]
    expected = generate(peaked_model(mask_token_id=None), ids, max_new_tokens=6, strategy="ar")
    assert [json.loads(line)["completion_ids"] for line in out.read_text().splitlines()] == expected.sequences


@pytest.mark.parametrize(
    "args, message",
    [
        (["--config.sample.block_size=-1"], "sample.block_size must be >= 0 (0 = the checkpoint's training block size)"),
        (["--config.sample.strategy=beam"], "sample.strategy must be one of ar, threshold"),
        ([], "give --prompt TEXT"),
        (["--prompt", "w1", "--ckpt", "{root}/ar"], "no mask_token_id"),
        (["--prompt", "w1", "--ckpt", "{root}/missing"], "does not exist"),
        (["--prompt", "w1", "--config.sample.prompt_bucket=4", "--prompt", "w1 w2 w3 w4 w5"], "prompt_bucket=4"),
        (["--prompt", "w1", "--config.sample.strategy=speculative"], "needs --verifier CKPT"),
        (["--prompt", "w1", "--verifier", "self", "--config.sample.draft_steps=0"], "sample.draft_steps must be >= 1"),
    ],
)
def test_sample_rejects_bad_input_with_one_line(ckpt, capsys, args, message):
    root = ckpt[0]
    args = [a.format(root=root) for a in args]
    base = [] if any(a.startswith("--ckpt") for a in args) else ["--ckpt", str(root / "dlm")]
    assert cli.main(["edlm", "sample", *base, *SAMPLE, *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_bench_reports_ar_and_dlm_settings(ckpt, tmp_path, capsys):
    root, model, tokenizer = ckpt
    prompts = tmp_path / "prompts.jsonl"
    expected = generate(model, [[5, 6, 7]], max_new_tokens=6, block_size=4, threshold=0.9).sequences[0]
    lines = [{"prompt": "w5 w6 w7", "reference": tokenizer.decode(expected)}, {"prompt_ids": [9, 10], "reference": "w95"}]
    prompts.write_text("".join(json.dumps(line) + "\n" for line in lines))
    argv = ["edlm", "bench", "--ckpt", str(root / "dlm"), "--ar_ckpt", str(root / "ar"), "--prompts_jsonl", str(prompts),
            "--out", str(tmp_path / "bench"), *SAMPLE, "--config.bench.thresholds=(0.9,)", "--config.bench.batch_sizes=(2,)",
            "--config.bench.strategies=('ar','threshold','speculative','self_speculative')",
            "--config.bench.repeats=2", "--config.bench.warmup=0", "--config.bench.overhead_forwards=2"]
    assert cli.main(argv) == 0
    summary = json.loads((tmp_path / "bench" / "summary.json").read_text())
    assert [r["setting"] for r in summary] == ["ar", "threshold_0.9", "speculative_d1", "self_speculative_d1"]
    ar, dlm, speculative, self_speculative = summary
    # Lossless: speculative decoding verified by the teacher produces the teacher's tokens and accuracy.
    assert speculative["accuracy"] == ar["accuracy"] and speculative["generated_tokens"] == ar["generated_tokens"]
    for record in (speculative, self_speculative):
        assert record["tokens_per_verifier_forward"] >= 1.0 and 0.0 <= record["acceptance_rate"] <= 1.0
        assert record["generate_kwargs"]["verifier"] in ("teacher", "self") and record["sampler_overhead"] is None
    assert ar["speedup_vs_ar"] == 1.0 and dlm["speedup_vs_ar"] > 0
    assert ar["tokens_per_forward"] == 1.0 and ar["generated_tokens"] == 12
    assert dlm["accuracy"] == 0.5  # the first reference is the dLM's own greedy output, the second cannot match
    for record in summary:
        assert record["tokens_per_second"] > 0 and len(record["runs"]) == 2
        assert record["strategy"] == "speculative" or record["sampler_overhead"] > 0
        assert record["memory"]["program_bytes"] > 0 and record["latency_p95_s"] >= record["latency_p50_s"]
        assert json.loads((tmp_path / "bench" / f"{record['setting']}_b2.json").read_text())["setting"] == record["setting"]
    assert "threshold_0.9" in capsys.readouterr().out
