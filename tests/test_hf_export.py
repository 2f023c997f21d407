"""HF export: transformers runs our dLM export like the JAX model; AR exports round-trip the source exactly."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from tokenizers import Tokenizer, models, pre_tokenizers

import efficient_dlm as edlm
from efficient_dlm import cli
from efficient_dlm.models.config import ModelConfig
from efficient_dlm.models.decoder import MODEL_STATE, abstract_model
from efficient_dlm.port.hub import check_push_args
from efficient_dlm.port.hf_config import model_config_from_hf, read_config_json
from efficient_dlm.port.safetensors_io import SafetensorsCheckpoint
from tests.devices import subprocess_env
from tests.hf_factory import make_hf_model
from tests.hf_moe_factory import MOE_FAMILIES, make_moe_hf_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 97


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny models: on a shared CPU, torch's intra-op thread pool costs far more than it saves."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_tokenizer(directory, vocab=VOCAB) -> str:
    os.makedirs(directory, exist_ok=True)
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(os.path.join(directory, "tokenizer.json"))
    return str(directory)


def dlm_config(**changes) -> ModelConfig:
    base = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
        head_dim=8, qk_norm=True, attention_bias=True, attention_out_bias=True, tie_word_embeddings=True, eos_token_id=1, mask_token_id=VOCAB - 1,
        max_position_embeddings=64, rope_type="llama3", rope_factor=4.0, rope_low_freq_factor=1.0,
        rope_high_freq_factor=4.0, rope_original_max_position_embeddings=16,
    )
    return ModelConfig(**{**base, **changes})


def random_model(cfg: ModelConfig, seed: int = 0):
    """Random weights, norms and biases (all of them matter), without the cost of init_model."""
    model = abstract_model(cfg)
    rng = np.random.RandomState(seed)
    flat = []
    for path, leaf in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        noise = rng.normal(size=leaf.shape).astype(leaf.dtype)
        flat.append((path, leaf.replace(jnp.asarray(1.0 + 0.1 * noise if "scale" in path else 0.1 * noise))))
    nnx.update(model, nnx.from_flat_state(flat))
    return model


@pytest.fixture(scope="module")
def dlm_model():
    return random_model(dlm_config(), seed=3)


@pytest.fixture(scope="module")
def dlm_export(dlm_model, tmp_path_factory):
    """(directory, transformers model) of the dLM exported with block size 4, in shards."""
    root = tmp_path_factory.mktemp("export")
    out = str(root / "dlm")
    edlm.to_hf(dlm_model, out, tokenizer_dir=write_tokenizer(root / "tok"), max_shard_size="20KB", block_size=4)
    return out, transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32)


def params(model) -> dict:
    return {path: np.asarray(leaf[...]) for path, leaf in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def relative_error(ours, ref) -> float:
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def test_dlm_export_runs_in_transformers_like_jax_and_reads_back(dlm_model, dlm_export, tmp_path):
    model, (out, hf) = dlm_model, dlm_export

    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    assert len(set(index["weight_map"].values())) > 1  # sharded
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["model_type"] == "edlm_qwen3" and config["block_size"] == 4 and config["mask_token_id"] == VOCAB - 1

    tokens = np.random.RandomState(0).randint(0, VOCAB, size=(2, 12))
    block, causal = jax.jit(lambda t: (model(t, attention="block", block_size=4), model(t, attention="causal")))(tokens)
    with torch.no_grad():
        assert relative_error(hf(torch.tensor(tokens)).logits.numpy(), np.asarray(block)) <= 1e-4
        assert relative_error(hf(torch.tensor(tokens), attention="causal").logits.numpy(), np.asarray(causal)) <= 1e-4
        # Left padding: the real tokens at positions 0.. compute what they compute without the padding.
        mask = np.ones_like(tokens)
        mask[1, :4] = 0
        positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
        padded = hf(torch.tensor(tokens), attention_mask=torch.tensor(mask), position_ids=torch.tensor(positions)).logits
        alone = hf(torch.tensor(tokens[1:, 4:])).logits
        assert relative_error(padded[1, 4:].numpy(), alone[0].numpy()) <= 1e-5

    back = edlm.from_hf(out)
    assert back.config == model.config
    expected = params(model)
    for path, value in params(back).items():
        assert value.dtype == expected[path].dtype and np.array_equal(value, expected[path]), path

    bf16 = str(tmp_path / "bf16")
    edlm.to_hf(model, bf16, tokenizer_dir=os.path.join(os.path.dirname(out), "tok"), dtype="bfloat16")
    back16 = params(edlm.from_hf(bf16, dtype="bfloat16"))
    for path, value in params(model).items():
        assert np.array_equal(back16[path], value.astype(back16[path].dtype)), path


@pytest.mark.parametrize("family", ["qwen3_qknorm_tied", "qwen2_bias", "llama_yarn_rope", "mistral_gqa", "llama_qkvo_bias"])
def test_ar_round_trip_reproduces_source(family, tmp_path):
    src = str(tmp_path / "src")
    torch_model = make_hf_model(family, src)
    write_tokenizer(src)
    out = str(tmp_path / "out")
    edlm.to_hf(edlm.from_hf(src), out, tokenizer_dir=src)

    source, exported = SafetensorsCheckpoint(src), SafetensorsCheckpoint(out)
    assert sorted(exported.keys()) == sorted(source.keys())
    for name in source.keys():
        assert exported.dtype(name) == source.dtype(name), name
        assert np.array_equal(exported.tensor(name), source.tensor(name)), name
    assert model_config_from_hf(read_config_json(out)) == model_config_from_hf(read_config_json(src))
    if family == "qwen3_qknorm_tied":  # the family's own transformers class loads it, no remote code
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(out)
        assert type(reloaded) is type(torch_model)
        tokens = torch.tensor(np.random.RandomState(0).randint(0, VOCAB, size=(1, 9)))
        with torch.no_grad():
            assert torch.equal(reloaded(tokens).logits, torch_model(tokens).logits)


def test_export_hf_cli_from_checkpoint_metadata(dlm_model, tmp_path, capsys):
    ckpt = str(tmp_path / "ckpt")
    recipe = {"diffusion": {"objective": "block_diffusion", "block_size": 8, "block_size_schedule": "0:2,10:4"}}
    extra = {"train_config": recipe, "valid_vocab_size": 90, "metrics": {"eval_loss": 1.25}}
    edlm.save(dlm_model, ckpt, extra=extra)
    with open(os.path.join(ckpt, "metrics.jsonl"), "w") as f:  # as the trainer logs in a run directory
        f.write('{"step": 5, "kind": "eval", "nll": 3.5}\n{"step": 9, "kind": "eval", "nll": 2.75}\n{"step": 9, "kind": "tr')
    out = str(tmp_path / "out")
    args = ["edlm", "export-hf", "--ckpt", ckpt, "--out", out, "--threshold", "0.8"]
    assert cli.main(args) == 2
    assert "no tokenizer to export" in capsys.readouterr().err.strip().splitlines()[-1]
    assert cli.main(args + ["--tokenizer_dir", write_tokenizer(tmp_path / "tok")]) == 0
    config = json.load(open(os.path.join(out, "config.json")))
    assert (config["block_size"], config["decoding_threshold"]) == (4, 0.8)  # schedule's final size; flag
    assert config["valid_vocab_size"] == 90
    card = open(os.path.join(out, "README.md")).read()
    assert "diffusion.objective | block_diffusion" in card and "metrics.eval_loss | 1.25" in card
    assert "last eval log.nll | 2.75" in card and "last eval log.step | 9" in card
    assert os.path.exists(os.path.join(out, "modeling_edlm.py"))
    tokenizer = transformers.AutoTokenizer.from_pretrained(out, trust_remote_code=True)  # special tokens written
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.mask_token_id) == (1, 1, VOCAB - 1)


def test_bad_input_fails_with_one_clear_message(dlm_model, tmp_path, monkeypatch):
    model = dlm_model
    tok = write_tokenizer(tmp_path / "tok")
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty.*--overwrite"):
        edlm.to_hf(model, str(full), tokenizer_dir=tok)
    with pytest.raises(FileNotFoundError, match="no tokenizer to export.*--tokenizer_dir"):
        edlm.to_hf(model, str(tmp_path / "a"))
    with pytest.raises(FileNotFoundError, match="no tokenizer.json or tokenizer.model"):
        edlm.to_hf(model, str(tmp_path / "a"), tokenizer_dir=str(full))
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        edlm.to_hf(model, str(tmp_path / "a"), tokenizer_dir=tok, dtype="fp8")
    with pytest.raises(ValueError, match="format 'dlm' needs .*mask_token_id"):
        edlm.to_hf(abstract_model(dlm_config(mask_token_id=None)), str(tmp_path / "a"), tokenizer_dir=tok, format="dlm")
    with pytest.raises(ValueError, match="attention_out_bias=True with model.attention_bias=True cannot be expressed in a qwen2"):
        edlm.to_hf(abstract_model(dlm_config(model_type="qwen2", qk_norm=False)), str(tmp_path / "a"), tokenizer_dir=tok, format="ar")
    with pytest.raises(ValueError, match="output directory contains the source"):
        edlm.to_hf(model, str(tmp_path), tokenizer_dir=tok, overwrite=True)
    assert not os.path.exists(tmp_path / "a")  # nothing written by a refused export
    edlm.to_hf(model, str(full), tokenizer_dir=tok, overwrite=True)
    assert not os.path.exists(full / "keep.txt") and os.path.exists(full / "config.json")
    with pytest.raises(ValueError, match="not a valid Hugging Face repo id"):
        check_push_args("not a/valid/id")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE is set"):
        check_push_args("someone/model")


def reference_generate(forward, prompt, max_new_tokens, block_size, threshold, mask_id, stop, valid_vocab_size):
    """docs/METHOD.md section 6 the slow way, one row: recompute the whole sequence (block-causal) every step.

    Positions n .. n + max_new_tokens - 1 are generated in training-aligned blocks; after a committed
    stop token the rest of its block is left masked and the row ends.
    """
    n = len(prompt)
    tokens = list(prompt) + [mask_id] * max_new_tokens
    start = n // block_size * block_size
    while True:
        end = start + block_size
        chunk = tokens[:end] + [mask_id] * max(0, end - len(tokens))
        open_ = np.array([n <= i < n + max_new_tokens for i in range(start, end)])
        while open_.any():
            logits = np.asarray(forward(np.array([chunk])))[0, start:end].astype(np.float64)
            logits[:, mask_id] = logits[:, valid_vocab_size:] = -np.inf
            probs = np.exp(logits - logits.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
            confidence = np.where(open_, probs.max(-1), -1.0)
            commit = open_ & (confidence >= threshold)
            commit[confidence.argmax()] = True
            for i in np.flatnonzero(commit):
                chunk[start + i] = int(probs[i].argmax())
            open_ &= ~commit
            stops = [i for i in range(block_size) if chunk[start + i] == stop and start + i >= n]
            if stops:
                open_[stops[0] + 1 :] = False
        tokens[:end] = chunk[: len(tokens)] if end > len(tokens) else chunk
        new = tokens[n : min(end, n + max_new_tokens)]
        if stop in new:
            return new[: new.index(stop) + 1]
        if end >= n + max_new_tokens:
            return new
        start = end


def test_dlm_generate_matches_slow_reference(dlm_model, dlm_export):
    _, hf = dlm_export
    forward = jax.jit(lambda tokens: dlm_model(tokens, attention="block", block_size=4))
    prompts = [[5, 6, 7, 8, 9], [3, 4, 5, 6, 7, 8, 9, 10], [11, 12]]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    hf.config.valid_vocab_size = 89  # ids 89.. are vocabulary padding: never generated
    free = hf.generate(ids, attention_mask=mask, max_new_tokens=7, threshold=0.05, eos_token_id=[], return_dict_in_generate=True)
    stop = free["new_tokens"][0][3]  # a token row 0 emits: as stop token it must end row 0 early
    result = hf.generate(ids, attention_mask=mask, max_new_tokens=7, threshold=0.05, eos_token_id=stop, return_dict_in_generate=True)
    for row, prompt in enumerate(prompts):
        assert result["new_tokens"][row] == reference_generate(forward, prompt, 7, 4, 0.05, VOCAB - 1, stop, 89), row
    assert len(result["new_tokens"][0]) <= 4 and result["sequences"][0, -1] == stop  # padded with the stop id
    assert free["row_forwards"] == [7, 7, 7]  # confidences ~1/97 < 0.05: one token per step, per row
    whole = hf.generate(ids, attention_mask=mask, max_new_tokens=7, threshold=0.0, eos_token_id=[], return_dict_in_generate=True)
    assert whole["row_forwards"] == [2, 2, 3]  # threshold 0 commits a block per step: blocks 1-2, 2-3, 0-2
    assert whole["tokens_per_forward"] == pytest.approx(21 / 7)
    with pytest.raises(ValueError, match="does not support do_sample, top_p"):
        hf.generate(ids, attention_mask=mask, do_sample=True, top_p=0.9)


@pytest.fixture(scope="module")
def moe_source(tmp_path_factory):
    """moe_source(family) -> directory of a tiny random HF MoE model (made once per module and worker)."""
    made = {}

    def make(family: str) -> str:
        if family not in made:
            made[family] = str(tmp_path_factory.mktemp(family))
            make_moe_hf_model(family, made[family])
            write_tokenizer(made[family])
        return made[family]

    return make


@pytest.mark.parametrize("family", sorted(MOE_FAMILIES))
def test_moe_ar_round_trip_reproduces_source(family, moe_source, tmp_path):
    src, out = moe_source(family), str(tmp_path / "out")
    edlm.to_hf(edlm.from_hf(src), out, tokenizer_dir=src)
    source, exported = SafetensorsCheckpoint(src), SafetensorsCheckpoint(out)
    assert sorted(exported.keys()) == sorted(source.keys())
    for name in source.keys():
        assert exported.dtype(name) == source.dtype(name) and np.array_equal(exported.tensor(name), source.tensor(name)), name
    assert model_config_from_hf(read_config_json(out)) == model_config_from_hf(read_config_json(src))


# Sigmoid group-limited router with selection bias, shared experts and a dense first layer; softmax
# router with a gated shared expert, a dense middle layer and a per-layer window; Mixtral's tensor names.
@pytest.mark.parametrize("family", ["glm4_moe_sigmoid_groups", "qwen2_moe_dense_middle_window", "mixtral"])
def test_moe_dlm_export_logits_match_jax(family, moe_source, tmp_path):
    src, out = moe_source(family), str(tmp_path / "out")
    model = edlm.from_hf(src, mask_token_id=VOCAB - 1)
    edlm.to_hf(model, out, tokenizer_dir=src, block_size=4)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32)
    tokens = np.random.RandomState(0).randint(0, VOCAB, size=(2, 12))
    ref = jax.jit(lambda t: model(t, attention="block", block_size=4))(tokens)
    with torch.no_grad():
        assert relative_error(hf(torch.tensor(tokens)).logits.numpy(), np.asarray(ref)) <= 1e-4
    back = edlm.from_hf(out)
    assert back.config == model.config
    expected = dict(nnx.to_flat_state(nnx.state(model, MODEL_STATE)))
    for path, leaf in nnx.to_flat_state(nnx.state(back, MODEL_STATE)):
        assert np.array_equal(np.asarray(leaf[...]), np.asarray(expected[path][...])), path


def test_export_of_a_sharded_model_gathers_exact_tensors(moe_source, tmp_path):
    """Experts split over an expert axis, matrices over fsdp: the export still holds the source's tensors."""
    src, out = moe_source("qwen2_moe_shared_gate"), str(tmp_path / "out")
    env = subprocess_env(devices=8)
    script = os.path.join(REPO, "tests", "export_sharded_check.py")
    proc = subprocess.run([sys.executable, script, src, out], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    source, exported = SafetensorsCheckpoint(src), SafetensorsCheckpoint(out)
    assert sorted(exported.keys()) == sorted(source.keys())
    for name in source.keys():
        assert np.array_equal(exported.tensor(name), source.tensor(name)), name
