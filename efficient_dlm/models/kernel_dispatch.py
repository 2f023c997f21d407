"""The single backend entry point: chooses the kernel for each attention call and LM-head confidence
by backend, and shards it. The model calls `attention` / `cached_attention` here, never a backend.

Backends (ModelConfig.attention_backend; "auto" resolves in `resolve_backend`):
- "splash" / "pallas": training attention -> splash attention with computable diffusion masks;
  decode -> pallas_kernels.decode_attention; LM head -> pallas_kernels.lm_head. On TPU they compile
  with Mosaic; on any other platform they run in Pallas interpret mode (slow, exact: what CPU tests use).
- "gpu": training attention -> jax.nn.dot_product_attention (cuDNN flash attention where it accepts
  the shapes and dtype, XLA otherwise), with the dense mask; decode and LM head -> XLA references.
- "xla": the references in attention.py and `xla_lm_head_confidence` here.

Mosaic kernels cannot be partitioned by XLA, so under a mesh (jax.set_mesh / use_mesh) every kernel
runs inside shard_map: batch over the axes the rules table gives "batch", heads over those of
"act_heads"/"act_kv_heads", vocab over those of "vocab"; an axis that does not divide its dimension
is left out (that dimension is replicated). Mesh axis names come only from parallel.rules.
"""
from __future__ import annotations

import functools
import logging
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from efficient_dlm.models import attention as attention_lib
from efficient_dlm.models.masks import MaskSpec, dense_mask
from efficient_dlm.parallel.rules import logical_to_spec
from pallas_kernels import decode_attention as decode_lib
from pallas_kernels import lm_head as lm_head_lib
from pallas_kernels import training_attention as training_lib

KERNEL_BACKENDS = ("splash", "pallas")
_logged: set[tuple[str, str]] = set()

# Tile sizes: TPU defaults, and small ones in interpret mode so CPU runs stay quick.
TPU_TILES = {"training": 512, "decode": 512, "rows": 256, "vocab": 512}
INTERPRET_TILES = {"training": 128, "decode": 16, "rows": 16, "vocab": 128}


def _platform() -> str:
    """The platform the program is compiled for: the mesh's devices (TPU topology AOT on a CPU host
    included), else the default backend."""
    mesh = _mesh()
    device = None if mesh is None else mesh.abstract_device
    return jax.default_backend() if device is None else device.platform


def _interpret() -> bool:
    return _platform() != "tpu"


def _tiles() -> dict[str, int]:
    return INTERPRET_TILES if _interpret() else TPU_TILES


def resolve_backend(requested: str) -> str:
    """Maps 'auto' to the platform's choice: TPU -> splash/Pallas kernels, GPU -> gpu, CPU -> xla."""
    if requested != "auto":
        return requested
    return {"tpu": "splash", "gpu": "gpu"}.get(jax.default_backend(), "xla")


def attention(q, k, v, spec: MaskSpec, segment_ids=None, backend: str = "xla") -> jax.Array:
    """Self-attention with pattern `spec` AND-ed with segment ids (attention.attention) on `backend`."""
    backend = resolve_backend(backend)
    if backend == "xla":
        _log_once("training", backend)
        return attention_lib.attention(q, k, v, spec, segment_ids)
    return training_attention(q, k, v, spec, segment_ids, backend)


def cached_attention(
    q, k, v, cache_k, cache_v, cache_start, cache_length, positions, mode, block_size=None, backend="xla",
    sliding_window=None,
) -> jax.Array:
    """The chunk against the KV cache (attention.cached_attention) on `backend`."""
    return decode_attention(q, k, v, cache_k, cache_v, cache_start, cache_length, positions, mode, block_size, backend,
                            sliding_window)


def describe(backend: str) -> dict[str, str]:
    """Which implementation each operation uses for `backend` on this platform (logged, shown by tools)."""
    backend = resolve_backend(backend)
    suffix = " (Pallas interpret mode)" if _interpret() else ""
    if backend in KERNEL_BACKENDS:
        return {
            "training": "splash attention, computable masks" + suffix,
            "decode": "pallas_kernels.decode_attention" + suffix,
            "lm_head": "pallas_kernels.lm_head" + suffix,
        }
    if backend == "gpu":
        return {"training": "jax.nn.dot_product_attention (cuDNN where supported)", "decode": "xla", "lm_head": "xla"}
    return {"training": "xla", "decode": "xla", "lm_head": "xla"}


def _log_once(kind: str, backend: str) -> None:
    if (kind, backend) not in _logged:
        _logged.add((kind, backend))
        logging.getLogger("efficient_dlm").info("%s kernel for backend %r: %s", kind, backend, describe(backend)[kind])


# ---- sharding ------------------------------------------------------------------------------------


def _mesh():
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh is None or mesh.empty else mesh


def _spec(mesh, names: Sequence[str | None], shape: Sequence[int], exclude: Sequence[str] = ()) -> P:
    """PartitionSpec from logical names, keeping per dimension only mesh axes that divide it."""
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    active = [a for a, n in sizes.items() if n > 1 and a not in exclude]
    entries = []
    for entry, dim in zip(logical_to_spec(names, mesh_axes=active), shape):
        axes = (entry,) if isinstance(entry, str) else tuple(entry or ())
        kept, product = [], 1
        for axis in axes:
            if dim % (product * sizes[axis]) == 0:
                kept.append(axis)
                product *= sizes[axis]
        entries.append(kept[0] if len(kept) == 1 else (tuple(kept) or None))
    return P(*entries)


# Kernels see whole sequences and head dims: only batch and heads are split.
_Q_NAMES = ("batch", None, "act_heads", None)
_KV_NAMES = ("batch", None, "act_kv_heads", None)


def _axes(entry) -> tuple[str, ...]:
    return (entry,) if isinstance(entry, str) else tuple(entry or ())


def _shard(fn: Callable, mesh, args: tuple, in_specs: tuple, out_specs):
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)(*args)


# ---- training attention --------------------------------------------------------------------------


def training_attention(q, k, v, spec: MaskSpec, segment_ids, backend: str) -> jax.Array:
    """Self-attention with pattern `spec` (see attention.attention) on the kernel of `backend`."""
    backend = resolve_backend(backend)
    _log_once("training", backend)
    if backend == "gpu":
        mask = dense_mask(spec, q.shape[1], k.shape[1], segment_ids, segment_ids)[:, None]
        implementation = "cudnn" if _platform() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16) else "xla"
        return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)
    if backend not in KERNEL_BACKENDS:
        raise ValueError(f"attention backend {backend!r} has no kernel; choose one of auto, xla, splash, pallas, gpu")
    kernel = functools.partial(training_lib.splash_attention, spec=spec, max_tile=_tiles()["training"], interpret=_interpret())
    mesh = _mesh()
    if mesh is None:
        return kernel(q, k, v, segment_ids=segment_ids)
    q_spec, kv_spec = _spec(mesh, _Q_NAMES, q.shape), _spec(mesh, _KV_NAMES, k.shape)
    if kv_spec[2] != q_spec[2]:  # kv heads split differently from query heads: give each query head its own
        k, v = (jnp.repeat(x, q.shape[2] // k.shape[2], axis=2) for x in (k, v))
        kv_spec = q_spec
    seg_spec = P(q_spec[0], None)
    if segment_ids is None:
        return _shard(lambda q, k, v: kernel(q, k, v), mesh, (q, k, v), (q_spec, kv_spec, kv_spec), q_spec)
    return _shard(
        lambda q, k, v, s: kernel(q, k, v, segment_ids=s), mesh, (q, k, v, segment_ids), (q_spec, kv_spec, kv_spec, seg_spec), q_spec
    )


# ---- block decode attention ----------------------------------------------------------------------


def decode_attention(
    q, k, v, cache_k, cache_v, cache_start, cache_length, positions, mode, block_size, backend, sliding_window=None
) -> jax.Array:
    """The chunk against the KV cache (see attention.cached_attention) on the kernel of `backend`."""
    backend = resolve_backend(backend)
    _log_once("decode", backend)
    if backend not in KERNEL_BACKENDS:
        return attention_lib.cached_attention(
            q, k, v, cache_k, cache_v, cache_start, cache_length, positions, mode, block_size, sliding_window
        )
    kernel = functools.partial(
        decode_lib.decode_attention, mode=mode, block_size=block_size, sliding_window=sliding_window,
        max_tile=_tiles()["decode"], interpret=_interpret(),
    )
    args = (q, k, v, cache_k, cache_v, cache_start, cache_length, positions)
    mesh = _mesh()
    if mesh is None:
        return kernel(*args)
    q_spec, kv_spec = _spec(mesh, _Q_NAMES, q.shape), _spec(mesh, _KV_NAMES, k.shape)
    heads = kv_spec[2] if kv_spec[2] == q_spec[2] else None  # else replicate heads: never copy the cache
    batch = q_spec[0]
    spec, row = P(batch, None, heads, None), P(batch)
    return _shard(kernel, mesh, args, (spec, spec, spec, spec, spec, row, row, P(batch, None)), spec)


# ---- LM-head confidence --------------------------------------------------------------------------


def xla_lm_head_confidence(hidden, w_out, *, temperature: float | jax.Array = 1.0, with_entropy: bool = False, allowed=None):
    """Reference: softmax of the full logits [B, T, V] -> (max_prob, argmax token, entropy or None)."""
    lm_head_lib.check_temperature(temperature)
    logits = jnp.einsum("bte,ev->btv", hidden, w_out.astype(hidden.dtype), preferred_element_type=jnp.float32) / temperature
    if allowed is not None:
        logits = jnp.where(jnp.asarray(allowed), logits, -jnp.inf)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    entropy = -jnp.sum(jnp.where(log_probs > -jnp.inf, jnp.exp(log_probs) * log_probs, 0.0), axis=-1) if with_entropy else None
    return jnp.exp(jnp.max(log_probs, axis=-1)), jnp.argmax(logits, axis=-1).astype(jnp.int32), entropy


def lm_head_confidence(
    hidden, w_out, *, temperature: float | jax.Array = 1.0, with_entropy: bool = False, allowed=None, backend: str = "auto"
):
    """Per position of hidden [B, T, E] with output embedding w_out [E, V]: (max_prob [B, T] float32,
    token [B, T] int32, entropy [B, T] or None) of softmax(hidden @ w_out / temperature), over the ids
    where `allowed` [V] bool is True (all when None). temperature may be a traced scalar.

    Kernel backends never materialise the [B, T, V] logits; under a mesh the vocab stays sharded and
    the per-shard summaries are combined exactly.
    """
    backend = resolve_backend(backend)
    _log_once("lm_head", backend)
    if backend not in KERNEL_BACKENDS:
        return xla_lm_head_confidence(hidden, w_out, temperature=temperature, with_entropy=with_entropy, allowed=allowed)
    embed = hidden.shape[-1]
    w_out = w_out.astype(hidden.dtype)
    allowed = jnp.ones((w_out.shape[1],), bool) if allowed is None else jnp.asarray(allowed, bool)
    lm_head_lib.check_temperature(temperature)
    temperature = jnp.asarray(temperature, jnp.float32)
    tiles = _tiles()
    summarize = functools.partial(
        lm_head_lib.lm_head_summary, block_rows=tiles["rows"], block_vocab=tiles["vocab"], interpret=_interpret()
    )

    def local(h, w, ok, t, vocab_axes=()):
        offset = jax.lax.axis_index(vocab_axes) * w.shape[1] if vocab_axes else 0
        summary = summarize(h.reshape(-1, embed), w, temperature=t, token_offset=offset, allowed=ok)
        if vocab_axes:
            summary = lm_head_lib.combine(summary, vocab_axes)
        entropy = summary.entropy().reshape(h.shape[:2]) if with_entropy else None
        return summary.max_prob().reshape(h.shape[:2]), summary.token.reshape(h.shape[:2]), entropy

    args = (hidden, w_out, allowed, temperature)
    mesh = _mesh()
    if mesh is None:
        return local(*args)
    w_spec = _spec(mesh, (None, "vocab"), w_out.shape)
    vocab_axes = _axes(w_spec[1])
    h_spec = _spec(mesh, ("batch", None, None), hidden.shape, exclude=vocab_axes)
    out = P(h_spec[0], None)
    in_specs = (h_spec, w_spec, P(w_spec[1]), P())
    return _shard(functools.partial(local, vocab_axes=vocab_axes), mesh, args, in_specs, (out, out, out if with_entropy else None))
