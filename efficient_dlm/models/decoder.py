"""The decoder-only language model (Llama / Mistral / Qwen2 / Qwen3) as a Flax NNX module.

Layers are created stacked (nnx.vmap, leading logical axis "layers") and run with jax.lax.scan over
their state, so compile time does not grow with depth; the scan body is rematerialised with the
configured policy. One forward serves every training pattern (`attention=` mode) and, through
`decode`, the sampler's chunk-against-KV-cache step. MoE configs (models/moe.py) stack their MoE
layers in `layers` and their dense-MLP layers (first_k_dense, mlp_only_layers) in `dense_layers`;
models/layer_groups.py schedules the layers of both stacks, with their per-layer sliding windows,
as scanned repeating groups in layer order. KV caches and returned keys/values keep one leading axis
over all layers in order.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from efficient_dlm.models import kernel_dispatch, quant_ops
from efficient_dlm.models.cache import KVCache
from efficient_dlm.models.config import ModelConfig
from efficient_dlm.models.layer_groups import DENSE_STACK, Segment, schedule
from efficient_dlm.models.layers import DecoderLayer, RMSNorm, param
from efficient_dlm.models.masks import MaskSpec
from efficient_dlm.models.moe import MoEDecoderLayer, Routing, with_moe_losses
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


def _grouped(tree, start: int, repeats: int, per_group: int):
    """Leading-axis entries start .. start + repeats * per_group of `tree`, as [repeats, per_group, ...], or as
    [repeats, ...] when per_group is 1 (every layer its own group: the common case). Why no unit axis: inside
    the sampler's loops the weights and caches are loop-carried buffers, and XLA:CPU gave the [repeats, 1, ...]
    reshape a layout of its own and copied every weight and cache into it on every forward (~6 MB, 54 copies
    per denoising step on the demo model, the AR baseline's steps too; docs/BENCHMARKS.md, session 9)."""
    if per_group == 1:
        return jax.tree.map(lambda a: a[start : start + repeats], tree)
    return jax.tree.map(lambda a: a[start : start + repeats * per_group].reshape(repeats, per_group, *a.shape[1:]), tree)


def _member(tree, i: int, per_group: int):
    """Entry i of one group of `_grouped` (the group itself when it has one member)."""
    return tree if per_group == 1 else jax.tree.map(lambda a: a[i], tree)


def _stacked(items: list, per_group: int):
    """Per-member outputs of one group, stacked as `_grouped` holds them (no axis for one member)."""
    if not items:
        return {}
    return items[0] if per_group == 1 else jax.tree.map(lambda *a: jnp.stack(a), *items)


def _flat(tree, per_group: int):
    """[repeats, per_group, ...] (or [repeats, ...] for one member) -> [repeats * per_group, ...]."""
    return tree if per_group == 1 else jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:]), tree)


def run_segment(stacks: dict, segment: Segment, h, cos, sin, make_attend, caches, remat_policy: str, scan: bool = True,
                routing: Routing | None = None):
    """Runs one segment of the layer schedule: `segment.repeats` copies of its group of layers, the group
    unrolled in one scan step. stacks: stack name -> stacked module; caches: leading axis over all
    layers, or None; routing: how the MoE layers' experts route (models/moe.py; None: dropless).
    Returns (h, (k, v) over the segment's layers, router statistics over its MoE layers).
    """
    names = sorted({kind.stack for kind in segment.group})
    split = {name: nnx.split(stacks[name]) for name in names}
    members = {name: segment.per_group(name) for name in names}
    states = {name: _grouped(split[name][1], segment.offsets[name], segment.repeats, members[name]) for name in names}
    width = len(segment.group)
    routed = sum(kind.stack != DENSE_STACK for kind in segment.group)
    caches = _grouped(caches, segment.first, segment.repeats, width)

    def body(x, xs):
        group_states, group_cache = xs
        used = dict.fromkeys(names, 0)
        kvs, stats = [], []
        for j, kind in enumerate(segment.group):
            graphdef = split[kind.stack][0]
            layer = nnx.merge(graphdef, _member(group_states[kind.stack], used[kind.stack], members[kind.stack]))
            used[kind.stack] += 1
            extra = () if routing is None or kind.stack == DENSE_STACK else (routing,)
            x, kv, aux = layer(x, cos, sin, make_attend(kind.window), _member(group_cache, j, width), *extra)
            kvs.append(kv)
            if kind.stack != DENSE_STACK:
                stats.append(aux)
        return x, (_stacked(kvs, width), _stacked(stats, routed))

    if remat_policy != "none":
        body = jax.checkpoint(body, policy=_REMAT_POLICIES[remat_policy], prevent_cse=not scan)
    if scan:
        h, (kv, aux) = jax.lax.scan(body, h, (states, caches))
    else:
        outs = []
        for i in range(segment.repeats):  # unrolled: one copy of the group per repeat
            h, out = body(h, jax.tree.map(lambda a: a[i], (states, caches)))
            outs.append(out)
        kv, aux = jax.tree.map(lambda *xs: jnp.stack(xs), *outs)
    return h, _flat(kv, width), _flat(aux, routed)


class Decoder(nnx.Module):
    """Token ids -> logits. `Model(tokens, attention=..., block_size=..., segment_ids=...)`."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.embed_tokens = param(rngs, cfg, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"))
        dense = len(cfg.dense_mlp_layers)
        if dense:
            self.dense_layers = stacked_layers(cfg, rngs, dense, make_dense_layer)
        self.layers = stacked_layers(cfg, rngs, cfg.num_layers - dense)
        self.final_norm = RMSNorm(cfg, cfg.hidden_size, rngs=rngs)
        if not cfg.tie_word_embeddings:
            self.lm_head = param(rngs, cfg, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"))

    # ---- pieces, public because the trainer and the sampler compose them -------------------------

    def embed(self, tokens: jax.Array) -> jax.Array:
        # Gather, then cast: casting the table first would materialise a vocab x embed copy per call.
        rows = quant_ops.take_rows(self.embed_tokens, tokens, self.config.compute_dtype)
        return constrain(rows, ("batch", "length", "act_embed"))

    def _head(self):
        """The LM head weight variable and its einsum (the tied embedding table is [vocab, embed])."""
        if self.config.tie_word_embeddings:
            return self.embed_tokens, "bte,ve->btv"
        return self.lm_head, "bte,ev->btv"

    def output_embedding(self) -> jax.Array:
        """[embed, vocab] matrix of the LM head (the tied embedding, transposed, when tied); dequantized
        to the compute dtype when the head is quantized (the loss and the fused LM-head kernel read it)."""
        weight, _ = self._head()
        w = quant_ops.float_weight(weight, self.config.compute_dtype)
        return w.T if self.config.tie_word_embeddings else w

    def logits(self, hidden: jax.Array) -> jax.Array:
        """LM head on final-normalised hidden states; logits in float32."""
        cfg = self.config
        weight, equation = self._head()
        if quant_ops.is_quantized(quant_ops.weight_value(weight)):
            out = quant_ops.einsum(equation, hidden, weight, cfg.compute_dtype, cfg.quantize_activations, jnp.float32)
        else:
            w = self.output_embedding().astype(cfg.compute_dtype)
            out = jnp.einsum("bte,ev->btv", hidden, w, preferred_element_type=jnp.float32)
        return constrain(out, ("batch", "length", "act_vocab"))

    def _layers(self, h, positions, make_attend, caches, rope_length=None, routing: Routing | None = None):
        """All layers in order (layer_groups.schedule); make_attend(window) is the attention of a layer
        with that sliding window; routing: the MoE layers' (None: dropless, statistics over all tokens)."""
        cfg = self.config
        cos, sin = rope_tables(cfg, positions, rope_length)
        stacks = {"layers": self.layers, **({DENSE_STACK: self.dense_layers} if cfg.dense_mlp_layers else {})}
        kvs, stats = [], []
        for segment in schedule(cfg):
            h, kv, aux = run_segment(stacks, segment, h, cos, sin, make_attend, caches, cfg.remat_policy, cfg.scan_layers,
                                     routing)
            kvs.append(kv)
            stats.append(aux)
        concat = lambda items: jax.tree.map(lambda *a: jnp.concatenate(a), *items)  # noqa: E731
        kv = concat(kvs)
        aux = concat([s for s in stats if s]) if any(stats) else {}
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
        moe_capacity: bool = False,
    ) -> tuple[jax.Array, dict[str, Any]]:
        """Final-normalised hidden states [B, T, E] and per-layer auxiliary outputs (MoE statistics).

        For attention="clean_context", tokens is [x_t ; x_0] of length 2L; positions default to
        0..L-1 in both halves and segment_ids may be given for one half ([B, L]) or both ([B, 2L]).
        `embeddings` replaces the token embedding lookup (e.g. noised [MASK] embeddings).
        MoE (docs/METHOD.md section 7): moe_capacity=True (the train step) routes the x_t half (the
        whole row without clean context) with model.capacity_factor, and the x_0 half dropless
        (model.clean_routing="dropless") or with a capacity of its own ("capacity"); False (default:
        scoring, inference) routes everything dropless. Router statistics count the real tokens of
        the x_t half only.
        """
        batch, length = tokens.shape
        stream_len = length // 2 if attention == "clean_context" else length
        if attention == "clean_context" and length % 2:
            raise ValueError(f"clean_context input must be [x_t ; x_0] of even length, got {length}")
        base = MaskSpec(attention, block_size, stream_len, self.config.sliding_window)  # validates the mode now

        def spec(window):
            return dataclasses.replace(base, sliding_window=window)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32) % stream_len, (batch, length))
        elif positions.shape[1] == stream_len and length == 2 * stream_len:
            positions = jnp.concatenate([positions, positions], axis=1)
        if segment_ids is not None and segment_ids.shape[1] == stream_len and length == 2 * stream_len:
            segment_ids = jnp.concatenate([segment_ids, segment_ids], axis=1)
        backend = self.config.attention_backend

        def make_attend(window):
            return lambda q, k, v, _: kernel_dispatch.attention(q, k, v, spec(window), segment_ids, backend)

        routing = None
        if self.config.is_moe:
            real = jnp.ones((batch, length), bool) if segment_ids is None else segment_ids > 0
            counted = real & (jnp.arange(length) < stream_len)[None, :]
            segments = 2 if length == 2 * stream_len and self.config.clean_routing == "capacity" else 1
            routing = Routing(stream_len if moe_capacity else None, counted.astype(jnp.float32), segments)
        h = self.embed(tokens) if embeddings is None else embeddings
        h, _, aux = self._layers(h, positions, make_attend, None, _real_length(positions, segment_ids), routing)
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
        modified; the caller writes the returned keys/values once the chunk is final. MoE experts
        route dropless (inference policy, docs/METHOD.md section 7), as the exported model does.
        """
        backend = self.config.attention_backend

        def make_attend(window):
            def attend(q, k, v, layer_cache):
                ck, cv = (quant_ops.kv_values(c, k.dtype) for c in layer_cache)  # int8 cache: dequantized here
                return kernel_dispatch.cached_attention(
                    q, k, v, ck, cv, cache.start, cache.length, positions, attention, block_size, backend, window
                )

            return attend

        h, kv, _ = self._layers(self.embed(tokens), positions, make_attend, (cache.k, cache.v), cache.rope_length)
        return h, kv


    def decode_pair(self, first: "Chunk", second: "Chunk") -> tuple[tuple[jax.Array, Any], tuple[jax.Array, Any]]:
        """Two chunks, each against its own KV cache under its own attention mode, in ONE pass over the
        weights: ((hidden, (k, v)) of `first`, (hidden, (k, v)) of `second`), each as `decode` returns it.

        Why: fused self-speculation (sample/speculative.py) verifies a draft causally against the
        verifier's cache and drafts the next block block-causally against the drafter's cache with the
        same weights; every projection and MLP runs once on the concatenated tokens (one forward, as
        memory-bound hardware counts it), and only attention is split. RoPE uses the first cache's
        `rope_length` for both (the speculative program gives both caches the same one)."""
        backend = self.config.attention_backend
        split = first.tokens.shape[1]

        def make_attend(window):
            def attend(q, k, v, layer_cache):
                outs = []
                for chunk, cache_kv, part in ((first, layer_cache[:2], slice(None, split)), (second, layer_cache[2:], slice(split, None))):
                    ck, cv = (quant_ops.kv_values(c, k.dtype) for c in cache_kv)
                    outs.append(kernel_dispatch.cached_attention(
                        q[:, part], k[:, part], v[:, part], ck, cv, chunk.cache.start, chunk.cache.length,
                        chunk.positions, chunk.attention, chunk.block_size, backend, window))
                return jnp.concatenate(outs, axis=1)

            return attend

        tokens = jnp.concatenate([first.tokens, second.tokens], axis=1)
        positions = jnp.concatenate([first.positions, second.positions], axis=1)
        caches = (first.cache.k, first.cache.v, second.cache.k, second.cache.v)
        h, kv, _ = self._layers(self.embed(tokens), positions, make_attend, caches, first.cache.rope_length)
        head, tail = (jax.tree.map(lambda a, part=part: a[:, :, part], kv) for part in (slice(None, split), slice(split, None)))
        return (h[:, :split], head), (h[:, split:], tail)


@dataclasses.dataclass(frozen=True)
class Chunk:
    """One part of `Decoder.decode_pair`: tokens and positions [B, T], the cache it reads, its attention mode."""

    tokens: jax.Array
    positions: jax.Array
    cache: KVCache
    attention: str
    block_size: int | None = None


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
