"""The decoder-only language model (Llama / Mistral / Qwen2 / Qwen3) as a Flax NNX module.

Layers are created stacked (nnx.vmap, leading logical axis "layers") and run with jax.lax.scan over
their state, so compile time does not grow with depth; the scan body is rematerialised with the
configured policy. One forward serves every training pattern (`attention=` mode) and, through
`decode`, the sampler's chunk-against-KV-cache step. MoE configs (models/moe.py) stack their MoE
layers in `layers` and, when `first_k_dense` > 0, the leading dense layers in `dense_layers`, run
first; KV caches and returned keys/values keep one leading axis over all layers in order.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from efficient_dlm.models import attention as attn_lib
from efficient_dlm.models.cache import KVCache
from efficient_dlm.models.config import ModelConfig
from efficient_dlm.models.layers import DecoderLayer, RMSNorm, param
from efficient_dlm.models.masks import MaskSpec
from efficient_dlm.models.moe import MoEDecoderLayer, with_moe_losses
from efficient_dlm.models.routers import ExpertBias
from efficient_dlm.models.token_ids import check_token_ids
from efficient_dlm.models.rope import rope_tables
from efficient_dlm.parallel.rules import constrain

# The model's persistent state: trained parameters and the MoE selection bias (updated without
# gradients). Checkpoints save this filter; optimizers take nnx.Param only.
MODEL_STATE = (nnx.Param, ExpertBias)

_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_with_no_batch_dims": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_qkv_proj": jax.checkpoint_policies.save_only_these_names("query_proj", "key_proj", "value_proj"),
}


def make_layer(cfg: ModelConfig, rngs: nnx.Rngs) -> nnx.Module:
    """One layer of the main stack: a MoE layer for MoE configs, else the dense layer."""
    return MoEDecoderLayer(cfg, rngs=rngs) if cfg.is_moe else DecoderLayer(cfg, rngs=rngs)


def make_dense_layer(cfg: ModelConfig, rngs: nnx.Rngs) -> nnx.Module:
    return DecoderLayer(cfg, rngs=rngs)


def stacked_layers(cfg: ModelConfig, rngs: nnx.Rngs, count: int, make=make_layer) -> nnx.Module:
    """`count` layers whose parameters are stacked along a leading "layers" axis."""

    @nnx.split_rngs(splits=count)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def create(layer_rngs: nnx.Rngs):
        return make(cfg, layer_rngs)

    return create(rngs)


def run_stacked(layers: nnx.Module, h, cos, sin, attend, caches, remat_policy: str, scan: bool = True):
    """Applies stacked `layers` in order. caches is a pytree with leading layer axis, or None.

    Returns (h, (k, v) stacked per layer, aux dict stacked per layer).
    """
    graphdef, state = nnx.split(layers)

    def body(x, xs):
        layer_state, layer_cache = xs
        layer = nnx.merge(graphdef, layer_state)
        x, kv, aux = layer(x, cos, sin, attend, layer_cache)
        return x, (kv, aux)

    if remat_policy != "none":
        body = jax.checkpoint(body, policy=_REMAT_POLICIES[remat_policy], prevent_cse=not scan)
    if scan:
        h, (kv, aux) = jax.lax.scan(body, h, (state, caches))
        return h, kv, aux
    outs = []
    for i in range(jax.tree.leaves(state)[0].shape[0]):  # unrolled: one copy of the layer per index
        h, out = body(h, jax.tree.map(lambda a: a[i], (state, caches)))
        outs.append(out)
    kv, aux = jax.tree.map(lambda *xs: jnp.stack(xs), *outs)
    return h, kv, aux


class Decoder(nnx.Module):
    """Token ids -> logits. `Model(tokens, attention=..., block_size=..., segment_ids=...)`."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.embed_tokens = param(rngs, cfg, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"))
        if cfg.first_k_dense:
            self.dense_layers = stacked_layers(cfg, rngs, cfg.first_k_dense, make_dense_layer)
        self.layers = stacked_layers(cfg, rngs, cfg.num_layers - cfg.first_k_dense)
        self.final_norm = RMSNorm(cfg, cfg.hidden_size, rngs=rngs)
        if not cfg.tie_word_embeddings:
            self.lm_head = param(rngs, cfg, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"))

    # ---- pieces, public because the trainer and the sampler compose them -------------------------

    def embed(self, tokens: jax.Array) -> jax.Array:
        # Gather, then cast: casting the table first would materialise a vocab x embed copy per call.
        rows = jnp.take(self.embed_tokens[...], tokens, axis=0).astype(self.config.compute_dtype)
        return constrain(rows, ("batch", "length", "act_embed"))

    def output_embedding(self) -> jax.Array:
        """[embed, vocab] matrix of the LM head (the tied embedding, transposed, when tied)."""
        if self.config.tie_word_embeddings:
            return self.embed_tokens[...].T
        return self.lm_head[...]

    def logits(self, hidden: jax.Array) -> jax.Array:
        """LM head on final-normalised hidden states; logits in float32."""
        w = self.output_embedding().astype(self.config.compute_dtype)
        out = jnp.einsum("bte,ev->btv", hidden, w, preferred_element_type=jnp.float32)
        return constrain(out, ("batch", "length", "act_vocab"))

    def _layers(self, h, positions, attend, caches, rope_length=None):
        cfg = self.config
        cos, sin = rope_tables(cfg, positions, rope_length)
        dense = cfg.first_k_dense
        if dense:
            dense_caches = jax.tree.map(lambda c: c[:dense], caches)
            caches = jax.tree.map(lambda c: c[dense:], caches)
            h, dense_kv, _ = run_stacked(self.dense_layers, h, cos, sin, attend, dense_caches, cfg.remat_policy, cfg.scan_layers)
        h, kv, aux = run_stacked(self.layers, h, cos, sin, attend, caches, cfg.remat_policy, cfg.scan_layers)
        if dense:
            kv = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), dense_kv, kv)
        if cfg.is_moe:
            aux = with_moe_losses(aux, cfg)
        return self.final_norm(h), kv, aux

    # ---- training / scoring forward --------------------------------------------------------------

    def hidden(
        self,
        tokens: jax.Array,
        *,
        attention: str = "causal",
        block_size: int | None = None,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
        embeddings: jax.Array | None = None,
    ) -> tuple[jax.Array, dict[str, Any]]:
        """Final-normalised hidden states [B, T, E] and per-layer auxiliary outputs (MoE statistics).

        For attention="clean_context", tokens is [x_t ; x_0] of length 2L; positions default to
        0..L-1 in both halves and segment_ids may be given for one half ([B, L]) or both ([B, 2L]).
        `embeddings` replaces the token embedding lookup (e.g. noised [MASK] embeddings).
        """
        batch, length = tokens.shape
        stream_len = length // 2 if attention == "clean_context" else length
        if attention == "clean_context" and length % 2:
            raise ValueError(f"clean_context input must be [x_t ; x_0] of even length, got {length}")
        spec = MaskSpec(attention, block_size, stream_len, self.config.sliding_window)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32) % stream_len, (batch, length))
        elif positions.shape[1] == stream_len and length == 2 * stream_len:
            positions = jnp.concatenate([positions, positions], axis=1)
        if segment_ids is not None and segment_ids.shape[1] == stream_len and length == 2 * stream_len:
            segment_ids = jnp.concatenate([segment_ids, segment_ids], axis=1)
        backend = self.config.attention_backend

        def attend(q, k, v, _):
            return attn_lib.attention(q, k, v, spec, segment_ids, backend)

        h = self.embed(tokens) if embeddings is None else embeddings
        h, _, aux = self._layers(h, positions, attend, None, _real_length(positions, segment_ids))
        return h, aux

    def __call__(
        self,
        tokens: jax.Array,
        *,
        attention: str = "causal",
        block_size: int | None = None,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
    ) -> jax.Array:
        """Logits [B, T, vocab] in float32. Host token ids (numpy, lists, concrete arrays) are checked
        against the vocabulary first: inside jit a bad id silently gathers a wrong row."""
        tokens = _checked_tokens(tokens, self.config.vocab_size)
        h, _ = self.hidden(tokens, attention=attention, block_size=block_size, segment_ids=segment_ids, positions=positions)
        return self.logits(h)

    # ---- decoding forward ------------------------------------------------------------------------

    def decode(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        cache: KVCache,
        *,
        attention: str = "bidirectional",
        block_size: int | None = None,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """A chunk of tokens against the KV cache: (final hidden [B, T, E], chunk (k, v) per layer).

        The chunk sees valid cache slots and itself under `attention` (bidirectional for a diffusion
        block, causal for AR decoding and prefill, block for a multi-block prefill). The cache is not
        modified; the caller writes the returned keys/values once the chunk is final.
        """
        backend = self.config.attention_backend

        def attend(q, k, v, layer_cache):
            ck, cv = layer_cache
            return attn_lib.cached_attention(
                q, k, v, ck, cv, cache.start, cache.length, positions, attention, block_size, backend,
                self.config.sliding_window,
            )

        h, kv, _ = self._layers(self.embed(tokens), positions, attend, (cache.k, cache.v), cache.rope_length)
        return h, kv


def _real_length(positions: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
    """[batch] longest real (non-padding: segment id != 0) position + 1: dynamic RoPE's per-row length."""
    if segment_ids is not None:
        positions = jnp.where(segment_ids != 0, positions, -1)
    return jnp.max(positions, axis=1) + 1


def init_model(cfg: ModelConfig, seed: int = 0) -> Decoder:
    """Randomly initialised model (for training from scratch and for tests)."""
    return Decoder(cfg, rngs=nnx.Rngs(params=seed))


def abstract_model(cfg: ModelConfig) -> Decoder:
    """The model's structure with ShapeDtypeStruct leaves, allocating nothing (for loading)."""
    return nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(params=0)))


def _checked_tokens(tokens, vocab_size: int):
    """tokens, validated on the host when concrete (not under tracing, not a multi-host global array)."""
    if isinstance(tokens, jax.core.Tracer) or (isinstance(tokens, jax.Array) and not tokens.is_fully_addressable):
        return tokens
    checked = check_token_ids(tokens, vocab_size, "Model(tokens)")
    return tokens if hasattr(tokens, "shape") else checked
