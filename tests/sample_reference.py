"""Slow reference decoders for the sampler tests: they recompute the whole sequence with `model(...)`
at every step (no KV cache, one row at a time, no padding) and implement the commit rules of
docs/METHOD.md section 6 in NumPy, independently of efficient_dlm.sample."""
from __future__ import annotations

import functools

import jax
import numpy as np
from flax import nnx

from efficient_dlm.models.config import ModelConfig
from efficient_dlm.models.decoder import init_model


def peaked_model(seed: int = 0, mask_token_id: int | None = 95, attention_backend: str = "auto"):
    """A tiny random model whose weights are scaled so that confidences differ clearly between
    positions and tokens (plain random init predicts a near-uniform distribution everywhere)."""
    cfg = ModelConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
        tie_word_embeddings=False, mask_token_id=mask_token_id, max_position_embeddings=128, rope_theta=100.0,
        attention_backend=attention_backend,
    )
    model = init_model(cfg, seed)
    model.lm_head[...] = model.lm_head[...] * 40
    model.layers.attn.q_proj[...] = model.layers.attn.q_proj[...] * 15
    model.layers.attn.k_proj[...] = model.layers.attn.k_proj[...] * 15
    model.layers.attn.o_proj[...] = model.layers.attn.o_proj[...] * 20
    return model


PADDED_LEN = 32  # every reference forward runs on this length, so it compiles once per model and mode


@functools.lru_cache(maxsize=8)
def _jitted_forward(graphdef, attention: str, block_size: int | None):
    return jax.jit(lambda state, tokens: nnx.merge(graphdef, state)(tokens, attention=attention, block_size=block_size))


def full_logits(model, tokens: list[int], attention: str, block_size: int | None = None) -> np.ndarray:
    """model(tokens) [len, V] on the whole sequence. Tokens are padded at the end to PADDED_LEN: under causal
    and block-causal attention later positions are invisible, so the logits of `tokens` are unchanged."""
    padded = np.zeros((1, PADDED_LEN), np.int32)
    padded[0, : len(tokens)] = tokens
    graphdef, state = nnx.split(model)
    return np.asarray(_jitted_forward(graphdef, attention, block_size)(state, padded))[0, : len(tokens)]


def greedy_choice(logits: np.ndarray, banned: list[int]):
    """(token, confidence, entropy) per position of raw logits [T, V] with `banned` ids removed."""
    z = logits.astype(np.float64).copy()
    z[:, banned] = -np.inf
    top = z.max(-1, keepdims=True)
    log_probs = z - top - np.log(np.exp(z - top).sum(-1, keepdims=True))
    probs = np.exp(log_probs)
    entropy = -np.sum(probs * np.where(probs > 0, log_probs, 0.0), -1)
    return z.argmax(-1), probs.max(-1), entropy


def commit_count(strategy: str, confidence, entropy, open_, **knobs) -> int:
    """docs/METHOD.md section 6, written out on sorted lists."""
    order = [i for i in np.argsort(-np.where(open_, confidence, -np.inf), kind="stable") if open_[i]]
    conf = [confidence[i] for i in order]
    if strategy == "threshold":
        n = sum(c >= knobs["threshold"] for c in conf)
    elif strategy == "topk":
        n = knobs["tokens_per_step"]
    elif strategy == "factor":
        n = max([r for r in range(1, len(conf) + 1) if conf[r - 1] >= 1 - knobs["factor"] / (r + 1)], default=0)
    elif strategy == "entropy":
        n, total = 0, 0.0
        for i in order:
            total += entropy[i]
            if total > knobs["entropy_bound"]:
                break
            n += 1
    return min(max(n, 1), len(order))


def reference_dlm(model, prompt, *, block: int, max_new: int, strategy: str, stop_ids=(), token_shift=False,
                  valid_vocab_size=None, **knobs):
    """Block-diffusion decoding of one prompt, recomputing [clean prefix ; block] every step.
    With token_shift, position i takes the logits computed at position i - 1; ids >= valid_vocab_size
    are never chosen.

    Returns (tokens, logits at commit [n, V], steps).
    """
    mask = model.config.mask_token_id
    prompt = list(prompt)
    p, end = len(prompt), len(prompt) + max_new
    seq, pos = list(prompt), len(prompt) // block * block
    generated: dict[int, tuple[int, np.ndarray]] = {}
    steps, stopped_at = 0, None
    while pos < end and stopped_at is None:
        x = seq[pos:] + [mask] * (block - (len(seq) - pos))
        open_ = np.array([p <= pos + t < end for t in range(block)])
        while open_.any():
            full = full_logits(model, seq[:pos] + x, "block", block)
            if token_shift:  # position 0 of the sequence is always a prompt token: its row is never used
                full = np.concatenate([full[:1], full[:-1]])
            logits = full[pos:]
            steps += 1
            padding = list(range(valid_vocab_size, logits.shape[-1])) if valid_vocab_size else []
            token, confidence, entropy = greedy_choice(logits, [mask, *padding])
            n = commit_count(strategy, confidence, entropy, open_, **knobs)
            for i in [i for i in np.argsort(-np.where(open_, confidence, -np.inf), kind="stable")][:n]:
                x[i], open_[i] = int(token[i]), False
                generated[pos + i] = (int(token[i]), logits[i])
            stops = [i for i in range(block) if pos + i in generated and x[i] in stop_ids]
            if stops:
                open_[stops[0] + 1 :] = False
                stopped_at = pos + stops[0]
        seq = seq[:pos] + x
        pos += block
    last = end - 1 if stopped_at is None else stopped_at
    kept = [generated[j] for j in range(p, last + 1)]
    return [t for t, _ in kept], np.array([l for _, l in kept]), steps


def reference_ar(model, prompt, *, max_new: int, stop_ids=()):
    """Naive greedy AR loop over model(tokens) (causal), recomputing the whole sequence every token."""
    banned = [] if model.config.mask_token_id is None else [model.config.mask_token_id]
    seq, tokens, logits_out = list(prompt), [], []
    for _ in range(max_new):
        logits = full_logits(model, seq, "causal")[-1:]
        token = int(greedy_choice(logits, banned)[0][0])
        seq.append(token)
        tokens.append(token)
        logits_out.append(logits[0])
        if token in stop_ids:
            break
    return tokens, np.array(logits_out)
