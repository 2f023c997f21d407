"""Self-speculative decoding for the exported dLM (shipped next to modeling_edlm.py; efficient_dlm
docs/METHOD.md section 6, "Speculative decoding").

strategy="self_speculative" (the default of a model whose recipe chose it, e.g. the demo's): the dLM
drafts the rest of its current block in one denoising step against its block-causal prefix cache,
and the same weights in causal mode (the AR head the joint objective diffusion.ar_weight trains)
check the draft in one forward against a causal KV cache of their own. The longest draft prefix equal
to the causal argmax is kept, plus the causal model's own next token, so the output is exactly the
model's greedy causal decoding: lossless with respect to it, whatever the draft. Both caches stay
exact: the causal cache keeps the keys of the kept tokens only (a causal key depends only on the
tokens before it), and the drafter caches a block once all its tokens are final, as block decoding does.

Rows are decoded one at a time (each accepts its own count, so the caches grow per row); the JAX
sampler batches them, and also fuses the next block's draft into the verifying forward, which this
reference does not, so its forward counts are higher than efficient_dlm's for the same tokens.
Counted as efficient_dlm counts them: per row, drafter forwards plus verifier forwards (the clean
block's cache write and the prompt's prefill are separate forwards here, not counted).
"""
from __future__ import annotations

import torch

from .decoding_edlm import allowed_ids


def _argmax(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    return logits.float().masked_fill(~allowed, float("-inf")).argmax(dim=-1)


def _causal_prefill(model, prompt: torch.Tensor, rope_length: torch.Tensor):
    """The causal cache of every prompt token but the last (the verifier's first input), or None."""
    if len(prompt) < 2:
        return None
    out = model(prompt[None, :-1], use_cache=True, attention="causal", rope_length=rope_length)
    return out.past_key_values


def _draft(model, block, positions, final: int, cache, last_logits, rope_length, allowed):
    """One drafter step: every position of the block from `final` on, committed at once."""
    logits, _ = model._chunk(block[None], positions[None], cache, rope_length)
    logits = logits[0]
    if model.config.token_shift:  # position i is predicted from the hidden state at i - 1
        logits = torch.cat([last_logits[None], logits[:-1]], dim=0)
    return _argmax(logits[final:], allowed)


def _verify(model, pending: int, drafts, position: int, cache, rope_length, allowed):
    """(kept tokens, cache with the kept tokens' keys): one causal forward of [last final token ; drafts]
    at positions position - 1, position, ..."""
    device = drafts.device
    tokens = torch.cat([torch.tensor([pending], device=device), drafts])[None]
    positions = torch.arange(position - 1, position - 1 + tokens.shape[1], device=device)[None]
    out = model(tokens, position_ids=positions, past_key_values=cache, use_cache=True, attention="causal",
                rope_length=rope_length)
    choice = _argmax(out.logits[0], allowed)
    agree = (drafts == choice[: len(drafts)]).long()
    accepted = int(torch.cumprod(agree, dim=0).sum())
    cached = (0 if cache is None else cache.get_seq_length()) + 1 + accepted  # pending + accepted drafts
    return choice[: accepted + 1], out.past_key_values.truncated(cached)


def self_speculative_row(model, prompt: torch.Tensor, max_new_tokens: int, block_size: int, mask_id: int,
                         stops: list, pad: int, allowed: torch.Tensor):
    """(new tokens [max_new_tokens], end, row forwards, verifier forwards) for one prompt."""
    device, n, size = prompt.device, len(prompt), block_size
    rope_length = torch.tensor([n + max_new_tokens], device=device)  # one dynamic-RoPE scale, as rope_tables
    draft_cache, last_logits, _ = model._prefill([prompt], size, pad, rope_length)
    last_logits = last_logits[0]
    verify_cache = _causal_prefill(model, prompt, rope_length)
    tokens = prompt.tolist()
    pending, start, forwards, verifies = tokens[-1], n // size * size, 0, 0
    while len(tokens) - n < max_new_tokens:
        final = len(tokens) - start
        positions = torch.arange(start, start + size, device=device)
        block = torch.tensor(tokens[start:] + [mask_id] * (size - final), device=device)
        drafts = _draft(model, block, positions, final, draft_cache, last_logits, rope_length, allowed)
        kept, verify_cache = _verify(model, pending, drafts, len(tokens), verify_cache, rope_length, allowed)
        forwards, verifies = forwards + 2, verifies + 1
        kept = kept.tolist()[: max_new_tokens - (len(tokens) - n)]
        stop = next((i for i, t in enumerate(kept) if t in stops), None)
        tokens += kept if stop is None else kept[: stop + 1]
        pending = tokens[-1]
        if stop is not None:
            break
        if len(tokens) - start >= size:  # the block is final: cache it clean (its last logits feed token shift)
            block = torch.tensor(tokens[start : start + size], device=device)
            logits, draft_cache = model._chunk(block[None], positions[None], draft_cache, rope_length, use_cache=True)
            last_logits, start = logits[0, -1], start + size
    new = tokens[n:]
    out = torch.full((max_new_tokens,), pad, dtype=torch.long, device=device)
    out[: len(new)] = torch.tensor(new, dtype=torch.long, device=device)
    return out, len(new), forwards, verifies


def self_speculative_generate(model, prompts: list, max_new_tokens: int, knobs: dict, mask_id: int, stops: list, pad: int):
    """Every row in turn (arguments as decoding_edlm.diffusion_generate's); returns (new tokens [batch,
    max_new_tokens], end per row, row forwards, verifier forwards per row)."""
    device = prompts[0].device
    allowed = allowed_ids(model.config, mask_id, device)
    size = int(knobs["block_size"])
    rows = [self_speculative_row(model, p, max_new_tokens, size, mask_id, stops, pad, allowed) for p in prompts]
    new_tokens = torch.stack([r[0] for r in rows])
    end, row_forwards, verifies = (torch.tensor([r[i] for r in rows], device=device) for i in (1, 2, 3))
    return new_tokens, end, row_forwards, verifies
