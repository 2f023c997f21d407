"""Block-diffusion decoding for the exported dLM (shipped next to modeling_edlm.py).

The same algorithm as efficient_dlm.generate (efficient_dlm docs/METHOD.md section 6), greedy, with an
exact prefix KV cache. Blocks are decoded left to right, aligned to multiples of block_size as in
training; a block starts as [MASK] and each step runs it against the cache and commits the n most
confident masked positions, n per row by the strategy:
- threshold (Fast-dLLM): every masked position with confidence >= threshold;
- topk: tokens_per_step positions;
- factor (Fast-dLLM): the largest n whose n-th best confidence is >= 1 - factor / (n + 1);
- entropy: the longest confidence-ordered prefix whose summed entropy (nats) stays <= entropy_bound;
n clipped to [1, #open]; ties go to the earlier position. Argument names and defaults (the exported
config: the model's diffusion spec) are those of efficient_dlm.generate.

Forward passes are counted as efficient_dlm counts them: per row, the denoising steps in which the
row still had positions to commit. The JAX sampler folds a finished block's cache write (and the
prompt's prefill) into the next block's first step; here they are separate forwards, not counted.
"""
from __future__ import annotations

import torch

STRATEGIES = ("threshold", "topk", "factor", "entropy")
SELF_SPECULATIVE = "self_speculative"  # the dLM drafts, its causal mode verifies (speculative_edlm.py)
# generate arguments that tokenizers and pipelines pass and that do not change greedy decoding, and
# the values of standard arguments that agree with it; anything else is refused, not ignored.
IGNORED_GENERATE_ARGS = ("token_type_ids", "use_cache", "generation_config")
AGREEING_GENERATE_ARGS = {"do_sample": False, "num_beams": 1, "num_return_sequences": 1, "temperature": 0.0}


def choose(logits: torch.Tensor, allowed: torch.Tensor, with_entropy: bool):
    """Greedy token, its probability and (when asked) the entropy at every position, allowed ids only."""
    logits = logits.float().masked_fill(~allowed, float("-inf"))
    log_partition = torch.logsumexp(logits, dim=-1)
    best, token = logits.max(dim=-1)
    confidence = torch.exp(best - log_partition)
    if not with_entropy:
        return token, confidence, torch.zeros_like(confidence)
    probs = torch.exp(logits - log_partition[..., None])
    entropy = log_partition - torch.where(probs > 0, probs * logits, torch.zeros_like(probs)).sum(dim=-1)
    return token, confidence, entropy


def commit_mask(strategy: str, confidence, entropy, open_, knobs: dict) -> torch.Tensor:
    """Boolean [batch, B]: the open positions this step commits."""
    keyed = confidence.masked_fill(~open_, float("-inf"))
    order = torch.sort(keyed, dim=-1, descending=True, stable=True).indices
    rank = torch.argsort(order, dim=-1)
    num_open = open_.sum(dim=-1)
    ranks = torch.arange(1, open_.shape[-1] + 1, device=open_.device)[None, :]
    in_open = ranks <= num_open[:, None]
    if strategy == "threshold":
        n = (open_ & (confidence >= knobs["threshold"])).sum(dim=-1)
    elif strategy == "topk":
        n = torch.full_like(num_open, int(knobs["tokens_per_step"]))
    elif strategy == "factor":
        best = torch.gather(confidence, -1, order)
        ok = in_open & (best >= 1.0 - knobs["factor"] / (ranks + 1.0))
        n = torch.where(ok, ranks, torch.zeros_like(ranks)).max(dim=-1).values
    elif strategy == "entropy":
        ordered = torch.where(in_open, torch.gather(entropy, -1, order), torch.zeros_like(entropy))
        n = (in_open & (torch.cumsum(ordered, dim=-1) <= knobs["entropy_bound"])).sum(dim=-1)
    else:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    n = torch.where(num_open > 0, torch.minimum(torch.clamp(n, min=1), num_open), torch.zeros_like(n))
    return open_ & (rank < n[:, None])


def settings(cfg, kwargs: dict, given: dict) -> dict:
    """The call's decoding settings: each argument given (not None) wins, else the exported config."""
    defaults = {
        "strategy": getattr(cfg, "decoding_strategy", "threshold"),
        "threshold": getattr(cfg, "decoding_threshold", 0.9),
        "tokens_per_step": getattr(cfg, "decoding_tokens_per_step", 1),
        "factor": getattr(cfg, "decoding_factor", 1.0),
        "entropy_bound": getattr(cfg, "decoding_entropy_bound", 0.3),
        "block_size": cfg.block_size,
    }
    out = {k: given[k] if given.get(k) is not None else v for k, v in defaults.items()}
    unsupported = sorted(
        k for k, v in kwargs.items()
        if k not in IGNORED_GENERATE_ARGS and v is not None and AGREEING_GENERATE_ARGS.get(k, object()) != v
    )
    if unsupported:
        raise ValueError(f"generate does not support {', '.join(unsupported)} (greedy decoding only)")
    if out["strategy"] not in (*STRATEGIES, SELF_SPECULATIVE):
        raise ValueError(f"strategy must be one of {', '.join((*STRATEGIES, SELF_SPECULATIVE))}, got {out['strategy']!r}")
    if int(out["block_size"]) <= 0 or int(out["tokens_per_step"]) < 1 or not 0.0 <= float(out["threshold"]) <= 1.0:
        raise ValueError(f"need block_size > 0, tokens_per_step >= 1 and threshold in [0, 1], got {out}")
    return out


def allowed_ids(cfg, mask_id: int, device) -> torch.Tensor:
    """[vocab] bool: the ids decoding may choose (never [MASK], never vocabulary padding)."""
    allowed = torch.ones(cfg.vocab_size, dtype=torch.bool, device=device)
    allowed[mask_id] = False
    if getattr(cfg, "valid_vocab_size", None):
        allowed[cfg.valid_vocab_size :] = False
    return allowed


def diffusion_generate(model, prompts: list, max_new_tokens: int, knobs: dict, mask_id: int, stops: list, pad: int):
    """Decodes every row; returns (new tokens [batch, max_new_tokens], end per row, row forwards,
    batched denoising forwards)."""
    cfg, size, strategy = model.config, int(knobs["block_size"]), knobs["strategy"]
    batch, device = len(prompts), prompts[0].device
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    allowed = allowed_ids(cfg, mask_id, device)
    stop_ids = torch.tensor(stops, dtype=torch.long, device=device)
    rope_length = lengths + max_new_tokens  # one dynamic-RoPE scale for the whole generation (rope_tables)
    cache, last_logits, _ = model._prefill(prompts, size, pad, rope_length)
    new_tokens = torch.full((batch, max_new_tokens), pad, dtype=torch.long, device=device)
    written = torch.zeros(batch, max_new_tokens, dtype=torch.bool, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    row_forwards = torch.zeros(batch, dtype=torch.long, device=device)
    steps = 0
    offsets = torch.arange(size, device=device)
    block_start = torch.div(lengths, size, rounding_mode="floor") * size  # position of block 0, per row
    while not bool(done.all()):
        positions = block_start[:, None] + offsets[None]
        index = positions - lengths[:, None]  # index among the new tokens
        block = torch.full((batch, size), mask_id, dtype=torch.long, device=device)
        for b, prompt in enumerate(prompts):  # the prompt's tail inside block 0
            tail = max(0, int(lengths[b] - block_start[b]))
            block[b, :tail] = prompt[len(prompt) - tail :]
        open_ = (index >= 0) & (index < max_new_tokens) & ~done[:, None]
        committed, stopped = torch.zeros_like(open_), torch.zeros_like(open_)
        while bool(open_.any()):
            logits, _ = model._chunk(block, positions, cache, rope_length)
            row_forwards += open_.any(dim=1)
            steps += 1
            if cfg.token_shift:  # position i is predicted from the hidden state at i - 1
                logits = torch.cat([last_logits[:, None], logits[:, :-1]], dim=1)
            token, confidence, entropy = choose(logits, allowed, strategy == "entropy")
            commit = commit_mask(strategy, confidence, entropy, open_, knobs)
            block = torch.where(commit, token, block)
            committed |= commit
            stopped = committed & torch.isin(block, stop_ids)
            first_stop = torch.where(stopped.any(dim=1), stopped.int().argmax(dim=1), size)
            open_ &= ~commit & (offsets[None] < first_stop[:, None])
        r, c = torch.nonzero(committed, as_tuple=True)
        new_tokens[r, index[r, c]] = block[r, c]
        written[r, index[r, c]] = True
        done |= stopped.any(dim=1) | (positions[:, -1] + 1 >= lengths + max_new_tokens)
        if bool(done.all()):
            break
        logits, cache = model._chunk(block, positions, cache, rope_length, use_cache=True)  # cache the clean block
        last_logits = logits[:, -1]
        block_start = block_start + size
    is_stop = written & torch.isin(new_tokens, stop_ids)
    end = torch.where(is_stop.any(dim=1), is_stop.int().argmax(dim=1) + 1, written.sum(dim=1))
    keep = torch.arange(max_new_tokens, device=device)[None] < end[:, None]
    return new_tokens.masked_fill(~keep, pad), end, row_forwards, steps
