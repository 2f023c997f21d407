"""Quantized inference (models/quantize.py, models/quant_ops.py on qwix).

References, independent of qwix and of our compute path: per-channel absmax quantization written in
NumPy, the float model run on the NumPy-dequantized weights, a NumPy int8-activation matmul, and the
sampler against tests/sample_reference.py's full recompute of the same quantized model.
"""
from __future__ import annotations

import jax
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from efficient_dlm.config import base_config, validate
from efficient_dlm.errors import UserError
from efficient_dlm.models import quant_ops
from efficient_dlm.models.cache import KVCache
from efficient_dlm.models.config import ModelConfig
from efficient_dlm.models.decoder import init_model
from efficient_dlm.models.quantize import CONTRACTED, quantize_model, quantize_weight
from efficient_dlm.sample.api import generate
from tests.sample_reference import peaked_model, reference_dlm

QMAX = {"int8": 127.5,  # qwix's symmetric int8 bound: the +-127 buckets extend to +-127.5
         "fp8": float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)}


def _numpy_quantize(w: np.ndarray, axes: tuple[str, ...], name: str, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """(quantized values as float32, scale): scale = absmax over the contracted axes / qmax per channel."""
    contracted = tuple(i for i, a in enumerate(axes) if a in CONTRACTED[name])
    scale = np.max(np.abs(w), axis=contracted, keepdims=True) / QMAX[kind]
    if kind == "int8":
        return np.clip(np.round(w / scale), -128, 127).astype(np.float32), scale
    return (w / scale).astype(ml_dtypes.float8_e4m3fn).astype(np.float32), scale


def _check_quantized(value, w: np.ndarray, axes, name: str, kind: str) -> np.ndarray:
    """Asserts qwix's values and scales are the NumPy quantization of w (a value exactly between two
    levels may round either way: XLA may divide by the scale's reciprocal); returns the dequantized weight."""
    want, scale = _numpy_quantize(w, axes, name, kind)
    got = np.asarray(value.qvalue).astype(np.float32)
    np.testing.assert_allclose(np.asarray(value.scale), scale, rtol=1e-6, err_msg=name)
    ratio = np.asarray(w / np.asarray(value.scale), np.float64)
    off = got != want  # only at a tie: w / scale halfway between the two levels (the channel's absmax is one)
    assert np.all(np.abs(ratio[off] - (got[off] + want[off]) / 2) <= 1e-4 * np.maximum(1.0, np.abs(ratio[off]))), name
    return got * np.asarray(value.scale)


@pytest.mark.parametrize("kind, tied", [("int8", False), ("fp8", True)])
def test_quantized_forward_equals_float_model_on_dequantized_weights(kind, tied):
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      head_dim=8, tie_word_embeddings=tied, qk_norm=True)
    model = init_model(cfg, seed=3)
    qmodel = quantize_model(model, quantize=kind)
    reference = init_model(cfg, seed=3)
    quantized = dict(nnx.to_flat_state(nnx.state(qmodel, nnx.Param)))
    count = 0
    for path, variable in nnx.to_flat_state(nnx.state(reference, nnx.Param)):
        value = quantized[path].get_value()
        if path[-1] not in CONTRACTED:
            assert not quant_ops.is_quantized(value), path  # norms stay float
            continue
        assert quant_ops.is_quantized(value) and value.qvalue.dtype == quant_ops.QTYPES[kind], path
        w = np.asarray(variable.get_value())
        variable.set_value(_check_quantized(value, w, variable.get_metadata()["out_sharding"], path[-1], kind))
        count += 1
    assert count == 7 + (1 if tied else 2)
    tokens = np.arange(24, dtype=np.int32).reshape(2, 12) % 64
    for attention in ("causal", "block"):
        got = np.asarray(qmodel(tokens, attention=attention, block_size=4))
        want = np.asarray(reference(tokens, attention=attention, block_size=4))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert np.max(np.abs(got - np.asarray(model(tokens, attention="block", block_size=4)))) > 1e-4  # quantization is real


def test_lm_head_and_embed_stay_float_when_asked():
    qmodel = quantize_model(peaked_model(), quantize="int8", quantize_lm_head=False, quantize_embed=False)
    assert not quant_ops.is_quantized(qmodel.lm_head.get_value())
    assert not quant_ops.is_quantized(qmodel.embed_tokens.get_value())
    assert quant_ops.is_quantized(qmodel.layers.mlp.down_proj.get_value())


def test_int8_activation_einsum_equals_numpy():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 32)).astype(np.float32)
    x_scale = np.max(np.abs(x), axis=-1, keepdims=True).astype(np.float64) / 127  # per token; absmax -> +-127
    w = rng.standard_normal((32, 4, 8)).astype(np.float32)
    variable = nnx.Param(quantize_weight(w, ("embed", "heads", "head_dim"), "q_proj", np.int8))
    got = np.asarray(quant_ops.einsum("bte,ehd->bthd", x, variable, np.float32, activations=True))
    xq = np.clip(np.round(x / x_scale), -127, 127) * x_scale
    wq = _check_quantized(variable.get_value(), w, ("embed", "heads", "head_dim"), "q_proj", "int8")
    want = np.einsum("bte,ehd->bthd", xq, wq.astype(np.float64))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _decode(model, prompts, **quantization):
    return generate(model, prompts, max_new_tokens=12, block_size=4, strategy="threshold", threshold=0.9,
                    return_logits=True, **quantization)


PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13]]


@pytest.mark.parametrize("quantization", [dict(quantize="int8"), dict(quantize_kv="int8")], ids=["weights", "kv_cache"])
def test_quantized_sampler_equals_full_recompute_of_the_quantized_model(quantization):
    """The cached sampler on the quantized model (int8 weights; or int8 keys/values, so an int8 KV cache)
    decodes exactly what recomputing the whole sequence with the same quantized model decodes."""
    model = peaked_model()
    result = _decode(model, PROMPTS, **quantization)
    qmodel = quantize_model(model, **quantization)
    for row, prompt in enumerate(PROMPTS):
        tokens, logits, _ = reference_dlm(qmodel, prompt, block=4, max_new=12, strategy="threshold", threshold=0.9)
        assert result.sequences[row] == tokens
        np.testing.assert_allclose(result.logits[row, : len(tokens)], logits, rtol=1e-5, atol=1e-5)
        _, float_logits, _ = reference_dlm(model, prompt, block=4, max_new=12, strategy="threshold", threshold=0.9)
        n = min(len(float_logits), len(tokens))
        assert np.max(np.abs(logits[:n] - float_logits[:n])) > 1e-4  # the reference sees the quantization


def test_int8_kv_cache_layout():
    cfg = peaked_model().config.replace(quantize_kv="int8")
    cache = KVCache.empty(cfg, 2, 16)
    assert cache.k.qvalue.dtype == np.int8 and cache.k.qvalue.shape == (2, 2, 16, 2, 8)
    assert cache.v.scale.shape == (2, 2, 16, 2, 1) and cache.size == 16


def test_refusals_are_one_line():
    config = base_config()
    config.sample.quantize = "int4"
    with pytest.raises(UserError, match=r"sample\.quantize must be one of none, int8, fp8, got 'int4'"):
        validate(config)
    config.sample.quantize, config.sample.quantize_activations = "", True
    with pytest.raises(UserError, match=r"sample\.quantize_activations .* set sample\.quantize too"):
        validate(config)
    model = peaked_model()
    with pytest.raises(UserError, match="quantize_kv must be one of none, int8"):
        quantize_model(model, quantize_kv="fp8")
    with pytest.raises(UserError, match="already quantized .* cannot be re-quantized as weights fp8"):
        quantize_model(quantize_model(model, quantize="int8"), quantize="fp8")
    tied = init_model(ModelConfig(tie_word_embeddings=True))
    with pytest.raises(UserError, match="quantize_lm_head and model.quantize_embed must agree"):
        quantize_model(tied, quantize="int8", quantize_lm_head=False)


def test_quantize_command_writes_a_checkpoint_that_loads_quantized(tmp_path, capsys):
    """`edlm quantize` writes int8 values and scales that `load` restores as they are (equal to quantizing
    the float checkpoint in memory); export-hf and a bad --quantize are refused with one line."""
    import efficient_dlm as edlm
    from efficient_dlm import cli

    float_dir, quantized_dir = str(tmp_path / "float"), str(tmp_path / "int8")
    model = peaked_model()
    edlm.save(model, float_dir)
    assert cli.main(["edlm", "quantize", f"--ckpt={float_dir}", f"--out={quantized_dir}",
                     "--config.sample.quantize_embed=false"]) == 0
    loaded = edlm.load(quantized_dir)
    assert loaded.config.quantize == "int8" and not loaded.config.quantize_embed
    expected = quantize_model(model, quantize="int8", quantize_embed=False)
    for (path, got), (_, want) in zip(nnx.to_flat_state(nnx.state(loaded, nnx.Param)),
                                      nnx.to_flat_state(nnx.state(expected, nnx.Param)), strict=True):
        for a, b in zip(jax.tree.leaves(got.get_value()), jax.tree.leaves(want.get_value()), strict=True):
            assert a.dtype == b.dtype, path
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert loaded.layers.attn.q_proj.get_value().qvalue.dtype == np.int8
    capsys.readouterr()
    assert cli.main(["edlm", "export-hf", f"--ckpt={quantized_dir}", f"--out={tmp_path / 'hf'}"]) == 2
    assert "export of a quantized model (weights int8, lm_head quantized, embed float) is refused" in capsys.readouterr().err
    assert cli.main(["edlm", "sample", f"--ckpt={float_dir}", "--quantize=int4", "--prompt=x"]) == 2
    assert "--quantize must be one of none, int8, fp8, got 'int4'" in capsys.readouterr().err
    assert cli.main(["edlm", "sample", f"--ckpt={quantized_dir}", "--quantize=fp8", "--prompt=x"]) == 2
    assert "already quantized (weights int8" in capsys.readouterr().err
