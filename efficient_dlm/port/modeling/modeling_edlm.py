"""PyTorch block-diffusion language model exported by efficient_dlm (loaded with trust_remote_code=True).

Self-contained (torch + transformers only). The weights keep the base model's tensor names
(Llama / Mistral / Qwen2 / Qwen3), so the architecture is the base model's; what differs is how it is
run, as the model was trained (docs/METHOD.md of efficient_dlm):
- attention is block-causal: position q sees position k iff k // block_size <= q // block_size
  (`attention="causal"` and `"bidirectional"` are available too);
- `generate` decodes block by block (decoding_edlm.py): a block starts as [MASK] tokens and each step
  commits the masked positions the strategy picks (threshold, topk, factor or entropy, as
  efficient_dlm.generate), with an exact prefix KV cache: a block's keys and values are cached once final;
  or, strategy "self_speculative" (speculative_edlm.py), drafts each block in one step and keeps what the
  same weights decoding causally would say (lossless with respect to that causal mode).
This file is tested on every efficient_dlm commit against the JAX model: logits within 1e-4 (float32)
and `generate` token for token.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_edlm import EdlmConfig
from .decoding_edlm import SELF_SPECULATIVE, diffusion_generate
from .decoding_edlm import settings as decoding_settings
from .moe_edlm import EdlmRouter, feed_forward
from .speculative_edlm import self_speculative_generate

ATTENTION_PATTERNS = ("block", "causal", "bidirectional")


def base_model_type(config: EdlmConfig) -> str:
    """The family the weights come from ("qwen3" for model_type "edlm_qwen3")."""
    return config.model_type.removeprefix("edlm_")




# ---- rotary position embeddings (the rope_type variants of transformers, same formulas) --------------


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_inv_freq(p: dict, config: EdlmConfig, dim: int) -> tuple[torch.Tensor, float]:
    base, factor = p.get("rope_theta", 10000.0), p["factor"]
    orig = p.get("original_max_position_embeddings") or config.max_position_embeddings
    attention_factor = p.get("attention_factor")
    if attention_factor is None:
        if p.get("mscale") and p.get("mscale_all_dim"):
            attention_factor = _yarn_mscale(factor, p["mscale"]) / _yarn_mscale(factor, p["mscale_all_dim"])
        else:
            attention_factor = _yarn_mscale(factor)
    beta_fast, beta_slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


def rotary_dim(config: EdlmConfig) -> int:
    """Leading dims of each head that RoPE rotates (partial_rotary_factor, GLM-4.5 style); the rest pass through."""
    return int(config.head_dim * config.rope_parameters.get("partial_rotary_factor", 1.0))


def rope_inv_freq(config: EdlmConfig, max_position: int) -> tuple[torch.Tensor, float]:
    """(inv_freq [rotary_dim // 2] float32, attention scaling) for config.rope_parameters."""
    p = dict(config.rope_parameters)
    rope_type = p.get("rope_type", p.get("type", "default"))
    dim, theta = rotary_dim(config), p.get("rope_theta", 10000.0)
    exponents = torch.arange(0, dim, 2, dtype=torch.float32) / dim
    inv_freq = 1.0 / (theta**exponents)
    if rope_type == "default":
        return inv_freq, 1.0
    if rope_type == "linear":
        return inv_freq / p["factor"], 1.0
    if rope_type == "dynamic":
        seq_len, limit, factor = max_position + 1, config.max_position_embeddings, p["factor"]
        if seq_len > limit:
            base = theta * ((factor * seq_len / limit) - (factor - 1)) ** (dim / (dim - 2))
            inv_freq = 1.0 / (base**exponents)
        return inv_freq, 1.0
    if rope_type == "llama3":
        factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
        old_len = p["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
        return torch.where(medium, smoothed, scaled), 1.0
    if rope_type == "yarn":
        return _yarn_inv_freq(p, config, dim)
    raise ValueError(f"unsupported rope_type {rope_type!r}")


def rope_tables(config: EdlmConfig, positions: torch.Tensor, rope_length: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [batch, length, rotary_dim] (float32) for integer positions [batch, length].

    `rope_length` [batch] is the sequence length each row's dynamic-RoPE scale is computed for: the
    row's longest real position + 1 in a forward, prompt + max_new_tokens for a whole generation (so
    cached keys and later queries share frequencies), never the padded chunk's largest position.
    """
    if config.rope_parameters.get("rope_type", config.rope_parameters.get("type")) == "dynamic":
        rows = [rope_inv_freq(config, int(n) - 1) for n in rope_length.tolist()]
        inv_freq, scaling = torch.stack([f for f, _ in rows])[:, None, :], rows[0][1]
    else:
        inv_freq, scaling = rope_inv_freq(config, 0)
    angles = positions.to(torch.float32)[..., None] * inv_freq.to(positions.device)
    angles = torch.cat([angles, angles], dim=-1)
    return torch.cos(angles) * scaling, torch.sin(angles) * scaling


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates the first cos.shape[-1] dims of x [batch, length, heads, head_dim] in float32 (rotate_half
    convention); the remaining dims pass through."""
    dtype, x = x.dtype, x.to(torch.float32)
    x, rest = x[..., : cos.shape[-1]], x[..., cos.shape[-1] :]
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return torch.cat([x * cos[:, :, None, :] + rotated * sin[:, :, None, :], rest], dim=-1).to(dtype)


# ---- attention visibility -----------------------------------------------------------------------------


def visibility(pattern: str, block_size: int, q_pos: torch.Tensor, k_pos: torch.Tensor, window=None) -> torch.Tensor:
    """[batch, q, k] bool from positions q_pos [batch, q] and k_pos [batch, k].

    A sliding window W (every pattern, as in training) hides keys W or more positions before the query.
    """
    q, k = q_pos[:, :, None], k_pos[:, None, :]
    if pattern == "block":
        ok = torch.div(k, block_size, rounding_mode="floor") <= torch.div(q, block_size, rounding_mode="floor")
    elif pattern == "causal":
        ok = k <= q
    elif pattern == "bidirectional":
        ok = torch.ones(q.shape[0], q.shape[1], k.shape[2], dtype=torch.bool, device=q_pos.device)
    else:
        raise ValueError(f"unknown attention pattern {pattern!r}; choose one of {', '.join(ATTENTION_PATTERNS)}")
    return ok & (q - k < window) if window is not None else ok


class EdlmPrefixCache:
    """Keys/values (after RoPE) of finished tokens per layer, with which slots hold real tokens and
    their positions (a sliding window reads them).

    It only grows by whole chunks that are final (a prompt, a decoded block), so attending to it is
    exactly what the model saw in training.
    """

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], valid: torch.Tensor, positions: torch.Tensor,
                 rope_length: torch.Tensor):
        self.keys, self.values, self.valid, self.positions = keys, values, valid, positions
        self.rope_length = rope_length  # [batch], fixed for the generation (see rope_tables)

    def get_seq_length(self) -> int:
        return self.valid.shape[1]

    def extended(self, chunk_kv, valid: torch.Tensor, positions: torch.Tensor) -> "EdlmPrefixCache":
        keys = [torch.cat([old, new], dim=1) for old, (new, _) in zip(self.keys, chunk_kv)]
        values = [torch.cat([old, new], dim=1) for old, (_, new) in zip(self.values, chunk_kv)]
        valid, positions = torch.cat([self.valid, valid], 1), torch.cat([self.positions, positions], 1)
        return EdlmPrefixCache(keys, values, valid, positions, self.rope_length)

    def truncated(self, length: int) -> "EdlmPrefixCache":
        """The first `length` slots (speculative decoding keeps the keys of the accepted tokens only)."""
        return EdlmPrefixCache([k[:, :length] for k in self.keys], [v[:, :length] for v in self.values],
                               self.valid[:, :length], self.positions[:, :length], self.rope_length)

    @classmethod
    def from_chunk(cls, chunk_kv, valid: torch.Tensor, positions: torch.Tensor, rope_length: torch.Tensor) -> "EdlmPrefixCache":
        return cls([k for k, _ in chunk_kv], [v for _, v in chunk_kv], valid, positions, rope_length)


# ---- layers -------------------------------------------------------------------------------------------


class EdlmRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype, x32 = x.dtype, x.to(torch.float32)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight.to(dtype) * x32.to(dtype)


class EdlmAttention(nn.Module):
    """Grouped-query attention with optional q/k/v bias, o bias and per-head QK RMSNorm."""

    def __init__(self, config: EdlmConfig):
        super().__init__()
        e, d = config.hidden_size, config.head_dim
        self.heads, self.kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, d
        self.q_proj = nn.Linear(e, self.heads * d, bias=config.attention_bias)
        self.k_proj = nn.Linear(e, self.kv_heads * d, bias=config.attention_bias)
        self.v_proj = nn.Linear(e, self.kv_heads * d, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.heads * d, e, bias=getattr(config, "attention_out_bias", False))
        self.qk_norm = config.qk_norm
        if config.qk_norm:
            self.q_norm = EdlmRMSNorm(d, config.rms_norm_eps)
            self.k_norm = EdlmRMSNorm(d, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask, past_kv=None):
        batch, length, _ = x.shape
        q = self.q_proj(x).view(batch, length, self.heads, self.head_dim)
        k = self.k_proj(x).view(batch, length, self.kv_heads, self.head_dim)
        v = self.v_proj(x).view(batch, length, self.kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        keys, values = (k, v) if past_kv is None else (torch.cat([past_kv[0], k], 1), torch.cat([past_kv[1], v], 1))
        groups = self.heads // self.kv_heads
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            keys.transpose(1, 2).repeat_interleave(groups, dim=1),
            values.transpose(1, 2).repeat_interleave(groups, dim=1),
            attn_mask=mask[:, None],
        )
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1)), (k, v)


class EdlmDecoderLayer(nn.Module):
    def __init__(self, config: EdlmConfig, layer_index: int):
        super().__init__()
        self.input_layernorm = EdlmRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = EdlmAttention(config)
        self.post_attention_layernorm = EdlmRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.feed_forward_name, block = feed_forward(config, base_model_type(config), layer_index)
        setattr(self, self.feed_forward_name, block)  # "mlp", or the family's name of its MoE block

    def forward(self, x, cos, sin, mask, past_kv=None):
        attn, kv = self.self_attn(self.input_layernorm(x), cos, sin, mask, past_kv)
        x = x + attn
        return x + getattr(self, self.feed_forward_name)(self.post_attention_layernorm(x)), kv


# ---- models -------------------------------------------------------------------------------------------


class EdlmPreTrainedModel(PreTrainedModel):
    config_class = EdlmConfig
    base_model_prefix = "model"
    _no_split_modules = ["EdlmDecoderLayer"]
    supports_gradient_checkpointing = False

    def _init_weights(self, module):
        std = getattr(self.config, "initializer_range", 0.02)
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, EdlmRMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, EdlmRouter):
            nn.init.normal_(module.weight, std=std)


class EdlmModel(EdlmPreTrainedModel):
    """Token ids -> final-normalised hidden states, under a chosen attention pattern."""

    def __init__(self, config: EdlmConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([EdlmDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = EdlmRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        past_key_values: Optional[EdlmPrefixCache] = None,
        use_cache: bool = False,
        attention: Optional[str] = None,
        block_size: Optional[int] = None,
        rope_length: Optional[torch.Tensor] = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """attention_mask [batch, length]: 1 for tokens, 0 for padding (never attended to).

        position_ids default to 0..length-1 after the cache. With `past_key_values` (a prefix cache)
        the chunk sees every real cached token plus itself under `attention`; with use_cache=True the
        returned cache is the given one extended by this chunk (call it once the chunk is final).
        rope_length [batch] (dynamic RoPE only, see rope_tables) defaults to the cache's, else to each
        row's longest real position + 1.
        """
        pattern = attention or self.config.attention_pattern
        block_size = block_size or self.config.block_size
        batch, length = input_ids.shape
        device = input_ids.device
        valid = torch.ones(batch, length, dtype=torch.bool, device=device) if attention_mask is None else attention_mask.bool()
        if position_ids is None:
            start = 0 if past_key_values is None else past_key_values.get_seq_length()
            position_ids = torch.arange(start, start + length, device=device)[None].expand(batch, length)
        window = self.config.sliding_window
        full_layers = set(getattr(self.config, "full_attention_layers", ()) or ())
        masks = {w: self._mask(pattern, block_size, position_ids, valid, past_key_values, w) for w in {window, None}}
        if rope_length is None and past_key_values is not None:
            rope_length = past_key_values.rope_length
        if rope_length is None:
            rope_length = position_ids.masked_fill(~valid, -1).max(dim=1).values + 1
        cos, sin = rope_tables(self.config, position_ids, rope_length)
        h = self.embed_tokens(input_ids)
        chunk_kv = []
        for i, layer in enumerate(self.layers):
            past = None if past_key_values is None else (past_key_values.keys[i], past_key_values.values[i])
            h, kv = layer(h, cos, sin, masks[None if i in full_layers else window], past)
            chunk_kv.append(kv)
        cache = None
        if use_cache:
            cache = (
                EdlmPrefixCache.from_chunk(chunk_kv, valid, position_ids, rope_length)
                if past_key_values is None
                else past_key_values.extended(chunk_kv, valid, position_ids)
            )
        return BaseModelOutputWithPast(last_hidden_state=self.norm(h), past_key_values=cache)

    @staticmethod
    def _mask(pattern, block_size, position_ids, valid, past_key_values, window) -> torch.Tensor:
        """[batch, length, cached + length] bool: the chunk's pattern over real tokens, and every real
        cached token, all within the sliding window when there is one."""
        batch, length = position_ids.shape
        mask = visibility(pattern, block_size, position_ids, position_ids, window) & valid[:, None, :]
        mask |= torch.eye(length, dtype=torch.bool, device=position_ids.device)[None]  # padding rows: no all-masked softmax
        if past_key_values is None:
            return mask
        cached = past_key_values.valid[:, None, :].expand(batch, length, -1)
        if window is not None:
            cached = cached & (position_ids[:, :, None] - past_key_values.positions[:, None, :] < window)
        return torch.cat([cached, mask], dim=-1)


class EdlmForDiffusionLM(EdlmPreTrainedModel):
    """The dLM: logits under block-causal attention, and `generate` with parallel block decoding."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: EdlmConfig):
        super().__init__(config)
        self.model = EdlmModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        past_key_values: Optional[EdlmPrefixCache] = None,
        use_cache: bool = False,
        attention: Optional[str] = None,
        block_size: Optional[int] = None,
        labels: Optional[torch.LongTensor] = None,
        rope_length: Optional[torch.Tensor] = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Logits [batch, length, vocab] in float32 (see EdlmModel.forward for the arguments)."""
        if labels is not None:
            raise ValueError("this export computes no training loss; train block diffusion with efficient_dlm (edlm train)")
        out = self.model(
            input_ids, attention_mask, position_ids, past_key_values, use_cache, attention, block_size, rope_length
        )
        logits = self.lm_head(out.last_hidden_state).float()
        return CausalLMOutputWithPast(logits=logits, past_key_values=out.past_key_values)

    # ---- generation -------------------------------------------------------------------------------

    def _prefill(self, prompts, block_size: int, pad: int, rope_length: torch.Tensor):
        """Caches every row's whole prompt blocks (block-causal, left-padded to the longest).

        Returns (cache or None, logits at each row's last cached position or zeros, forward passes).
        """
        batch, device = len(prompts), prompts[0].device
        full = [len(p) // block_size * block_size for p in prompts]
        width = max(full)
        if not width:
            return None, torch.zeros(batch, self.config.vocab_size, device=device), 0
        ids = torch.full((batch, width), pad, dtype=torch.long, device=device)
        valid = torch.zeros(batch, width, dtype=torch.bool, device=device)
        positions = torch.zeros(batch, width, dtype=torch.long, device=device)
        for b, (prompt, n) in enumerate(zip(prompts, full)):
            if n:
                ids[b, width - n :], valid[b, width - n :] = prompt[:n], True
                positions[b, width - n :] = torch.arange(n, device=device)
        out = self(ids, attention_mask=valid, position_ids=positions, use_cache=True, attention="block", block_size=block_size,
                   rope_length=rope_length)
        return out.past_key_values, out.logits[:, -1], 1

    def _chunk(self, tokens, positions, cache, rope_length, use_cache=False):
        """Logits of a block that sees the finished prefix (cache) and itself bidirectionally."""
        out = self(tokens, position_ids=positions, past_key_values=cache, use_cache=use_cache, attention="bidirectional",
                   rope_length=rope_length)
        return out.logits, out.past_key_values

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor,
        attention_mask: Optional[torch.Tensor] = None,
        max_new_tokens: int = 64,
        block_size: Optional[int] = None,
        strategy: Optional[str] = None,
        threshold: Optional[float] = None,
        tokens_per_step: Optional[int] = None,
        factor: Optional[float] = None,
        entropy_bound: Optional[float] = None,
        eos_token_id=None,
        mask_token_id: Optional[int] = None,
        pad_token_id: Optional[int] = None,
        return_dict_in_generate: bool = False,
        **kwargs,
    ):
        """Greedy block-diffusion decoding with an exact prefix KV cache, as efficient_dlm.generate
        (decoding_edlm.py: the strategies threshold, topk, factor, entropy and their knobs, with the
        same names; each defaults to the exported config, i.e. the model's diffusion spec), or
        self-speculative decoding (strategy="self_speculative", speculative_edlm.py: the output is the
        model's own greedy causal decoding; the result dict adds `verifier_forwards` per row).

        input_ids [batch, length] with attention_mask marking real tokens (left or right padding).
        Row b's prompt of n tokens occupies positions 0..n-1 and blocks are aligned to multiples of
        block_size, as in training: the first decoded block is the one holding position n and keeps
        the prompt's tail; the prompt's whole blocks are cached first (block-causal). Positions
        n .. n + max_new_tokens - 1 start as [MASK]; each step runs the block against the cache and
        commits the masked positions the strategy picks, at least one. The [MASK] id and ids >=
        config.valid_vocab_size are never chosen. Once a stop token (eos_token_id: an id or a list)
        is committed, the positions after it in the block are no longer decoded and the row ends with
        that block. A final block's keys and values are computed once more, clean, and cached.

        Returns [batch, length + max_new_tokens]: input_ids followed by each row's new tokens (cut
        after its first stop token, then the pad token, else EOS). With return_dict_in_generate=True,
        a dict with `sequences`, `new_tokens` (the generated ids per row), `row_forwards` (per row,
        the denoising forwards in which it had positions to commit, as efficient_dlm counts them),
        `forward_passes` (batched denoising steps, efficient_dlm's count) and `tokens_per_forward`
        (generated tokens / summed row forwards).
        """
        cfg = self.config
        given = dict(block_size=block_size, strategy=strategy, threshold=threshold, tokens_per_step=tokens_per_step,
                     factor=factor, entropy_bound=entropy_bound)
        knobs = decoding_settings(cfg, kwargs, given)
        mask_id = cfg.mask_token_id if mask_token_id is None else mask_token_id
        stops = cfg.eos_token_id if eos_token_id is None else eos_token_id
        stops = [] if stops is None else [stops] if isinstance(stops, int) else list(stops)
        pad = next((t for t in (pad_token_id, cfg.pad_token_id, *stops, 0) if t is not None))
        if mask_id is None:
            raise ValueError("generate needs mask_token_id (config.mask_token_id is not set)")
        if max_new_tokens < 1:
            raise ValueError(f"need max_new_tokens >= 1, got {max_new_tokens}")
        real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        prompts = [row[keep] for row, keep in zip(input_ids, real)]
        if min(len(p) for p in prompts) < 1:
            raise ValueError("every prompt needs at least one token")
        extra = {}
        if knobs["strategy"] == SELF_SPECULATIVE:  # rows one at a time: each row forward is a forward
            new_tokens, end, row_forwards, verifies = self_speculative_generate(
                self, prompts, max_new_tokens, knobs, mask_id, stops, pad)
            steps, extra = int(row_forwards.sum()), {"verifier_forwards": verifies.tolist()}
        else:
            new_tokens, end, row_forwards, steps = diffusion_generate(self, prompts, max_new_tokens, knobs, mask_id, stops, pad)
        sequences = torch.cat([input_ids, new_tokens.to(input_ids.dtype)], dim=1)
        if not return_dict_in_generate:
            return sequences
        return {
            "sequences": sequences,
            "new_tokens": [row[:n].tolist() for row, n in zip(new_tokens, end.tolist())],
            "row_forwards": row_forwards.tolist(),
            "forward_passes": steps,
            "tokens_per_forward": int(end.sum()) / max(int(row_forwards.sum()), 1),
            **extra,
        }
