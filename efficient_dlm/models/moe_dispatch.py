"""Routed-expert computation: assignments grouped by expert, grouped matmuls, capacity, expert parallelism.

Our own code because nothing in the stack gives a Flax-NNX MoE dispatch that runs on a CPU (tests)
and shards on TPU; it is built from jax.lax.ragged_dot, jax.lax.all_to_all and jax.shard_map, with
megablox `gmm` as an opt-in TPU kernel (`moe_impl="gmm"`; interpret mode elsewhere).

An assignment is a (token, slot) pair: token t visits experts[t, 0..k-1]. Every path returns the
unweighted output of each assignment, [..., k, embed]; the caller weights and sums them.

Which positions route how is the caller's (docs/METHOD.md section 7): `capacity_len` = None routes
everything dropless (inference: the decoder's `decode`, scoring, export parity); an int routes the
first `capacity_segments` x `capacity_len` positions of every row with capacity, each segment of
`capacity_len` positions with a capacity of its own (training's x_t half, and the x_0 half under
`model.clean_routing="capacity"`; or the whole row without clean context), and the rest (training's
x_0 half under the default `clean_routing="dropless"`) dropless. capacity_factor unset: dropless.
- dropless: assignments sorted by expert, SwiGLU with grouped matmuls (group sizes = tokens per
  expert); nothing is dropped.
- capacity (capacity_factor = c): within the capacity positions of each batch row (T of them), expert
  e takes at most C = ceil(c * T * k / E) of their T*k assignments, earliest positions first (slot
  order breaks ties inside a position); the others are dropped (output 0: the token keeps its
  residual and its other experts). Per row, so the result is the same on any mesh. Compute is a dense
  [E, rows * C] batch per expert (GShard), so memory is bounded whatever the routing.
- expert parallelism: when the mesh's `experts` axis (the logical rules map "experts" -> expert) has
  more than one device, each device owns E / ep experts; the tokens (sharded by batch) are sent to
  their experts' devices and back with all_to_all inside shard_map. Dropless sends a static
  [ep, T_local * k] buffer per device (worst case, mostly padding; XLA:CPU has no
  ragged_all_to_all): capacity_factor bounds the traffic of training's x_t half (and of the x_0 half
  with clean_routing="capacity"); inference stays dropless. Capacity sends exactly [E, rows * C].
  The mlp dimension of the experts may also be split over the tensor axis (partial sums, psum).
  Without an expert axis, expert weights are sharded over fsdp/tensor by the rules and XLA
  partitions the grouped matmul.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from efficient_dlm.models.config import ModelConfig
from efficient_dlm.parallel.rules import logical_to_spec


class ExpertWeights(NamedTuple):
    gate: jax.Array  # [experts, embed, mlp]
    up: jax.Array  # [experts, embed, mlp]
    down: jax.Array  # [experts, mlp, embed]


def routed_outputs(
    x: jax.Array, experts: jax.Array, w: ExpertWeights, cfg: ModelConfig, capacity_len: int | None = None,
    capacity_segments: int = 1,
) -> jax.Array:
    """x [B, T, D], experts [B, T, k] -> per-assignment expert outputs [B, T, k, D].

    The first capacity_segments * capacity_len positions of each row route with capacity (when
    cfg.capacity_factor is set) in segments of capacity_len positions, each with its own capacity
    C = capacity(cfg, capacity_len) (tokens of different segments never compete); the other positions
    route dropless. capacity_len None: all dropless.
    """
    if capacity_len is None or cfg.capacity_factor is None:
        return _outputs(x, experts, w, cfg, None)
    b, t, d = x.shape
    k = experts.shape[-1]
    span = capacity_len * capacity_segments
    if span > t:
        raise ValueError(f"{capacity_segments} capacity segments of {capacity_len} exceed the row length {t}")
    # Segments become rows of their own (row-major, so a batch shard keeps its rows' segments): one
    # dispatch whose per-row capacity is each segment's.
    head = _outputs(x[:, :span].reshape(b * capacity_segments, capacity_len, d),
                    experts[:, :span].reshape(b * capacity_segments, capacity_len, k), w, cfg,
                    capacity(cfg, capacity_len)).reshape(b, span, k, d)
    if span == t:
        return head
    tail = _outputs(x[:, span:], experts[:, span:], w, cfg, None)
    return jnp.concatenate([head, tail], axis=1)


def _outputs(x, experts, w: ExpertWeights, cfg: ModelConfig, cap: int | None):
    """All positions of x routed with per-row capacity `cap`, or dropless when cap is None."""
    mesh = jax.sharding.get_abstract_mesh()
    axes = {} if mesh is None or mesh.empty else {a: n for a, n in zip(mesh.axis_names, mesh.axis_sizes) if n > 1}
    expert_axis = logical_to_spec(("experts",), mesh_axes=list(axes))[0]
    if expert_axis is None:
        return _local_outputs(x, experts, w, cfg, cap)
    return _expert_parallel_outputs(x, experts, w, cfg, mesh, axes, cap)


def capacity(cfg: ModelConfig, row_length: int) -> int:
    """Per-row, per-expert capacity C = ceil(capacity_factor * T * k / E) for T capacity positions."""
    return max(1, math.ceil(cfg.capacity_factor * row_length * cfg.num_experts_per_tok / cfg.num_experts))


# ---- local (one device, or experts sharded by the rules and partitioned by XLA) ----------------------


def _local_outputs(x, experts, w: ExpertWeights, cfg: ModelConfig, cap: int | None):
    b, t, d = x.shape
    k = experts.shape[-1]
    w = _cast(w, cfg.compute_dtype)
    if cap is not None:
        return _capacity_outputs(x, experts, w, cfg, cap, ep=1, exchange=lambda a: a, reduce=lambda a: a)
    rows = jnp.repeat(x.reshape(b * t, d), k, axis=0)
    out = _grouped_by_id(rows, experts.reshape(-1), cfg.num_experts, partial(_swiglu_grouped, w=w, impl=cfg.moe_impl))
    return out.reshape(b, t, k, d)


# ---- building blocks ------------------------------------------------------------------------------


def _cast(w: ExpertWeights, dtype) -> ExpertWeights:
    return ExpertWeights(*(a.astype(dtype) for a in w))


def grouped_matmul(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, impl: str = "auto") -> jax.Array:
    """lhs [m, k] rows sorted by group, rhs [groups, k, n] -> [m, n]; rows past sum(group_sizes) are 0."""
    if impl in ("auto", "ragged"):
        return jax.lax.ragged_dot(lhs, rhs, group_sizes)
    from jax.experimental.pallas.ops.tpu.megablox import gmm

    m = lhs.shape[0]
    tm = min(128, m)
    pad = -m % tm
    padded = jnp.pad(lhs, ((0, pad), (0, 0)))
    tiling = (tm, min(128, lhs.shape[1]), min(128, rhs.shape[2]))
    interpret = jax.default_backend() != "tpu"
    out = gmm(padded, rhs, group_sizes.astype(jnp.int32), lhs.dtype, tiling, None, None, False, interpret)[:m]
    valid = jnp.arange(m) < jnp.sum(group_sizes)  # gmm leaves rows past the groups undefined
    return jnp.where(valid[:, None], out, 0)


def _swiglu_grouped(rows, group_sizes, *, w: ExpertWeights, impl: str):
    gate = grouped_matmul(rows, w.gate, group_sizes, impl)
    up = grouped_matmul(rows, w.up, group_sizes, impl)
    return grouped_matmul(jax.nn.silu(gate) * up, w.down, group_sizes, impl)


def _inverse_permutation(order: jax.Array) -> jax.Array:
    return jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))


def _grouped_by_id(rows: jax.Array, ids: jax.Array, groups: int, mlp: Callable) -> jax.Array:
    """Applies group ids[r]'s expert to rows[r]; ids == groups marks an empty row (output 0)."""
    order = jnp.argsort(ids, stable=True)
    sizes = jnp.bincount(ids, length=groups).astype(jnp.int32)  # the empty-row id falls outside
    out = mlp(jnp.take(rows, order, axis=0), sizes)
    return jnp.take(out, _inverse_permutation(order), axis=0)


def _rank_within_group(ids: jax.Array, groups: int) -> jax.Array:
    """For each element, how many earlier elements share its id (stable counting)."""
    order = jnp.argsort(ids, stable=True)
    sizes = jnp.bincount(ids, length=groups)
    starts = jnp.cumsum(sizes) - sizes
    sorted_rank = jnp.arange(ids.shape[0]) - starts[ids[order]]
    return jnp.zeros_like(ids).at[order].set(sorted_rank.astype(ids.dtype))


def _capacity_slots(experts_row: jax.Array, num_experts: int, cap: int) -> jax.Array:
    """Buffer slot e * C + rank of each of a row's assignments [T*k]; num_experts * C means dropped."""
    rank = _rank_within_group(experts_row, num_experts)
    return jnp.where(rank < cap, experts_row * cap + rank, num_experts * cap)


def _capacity_outputs(x, experts, w: ExpertWeights, cfg: ModelConfig, cap: int, ep: int, exchange, reduce):
    """Capacity-mode outputs for rows x [b, T, D] (expert capacity `cap` per row); exchange moves
    [ep, E/ep, b*C, D] buffers between expert shards (identity locally), reduce finishes partial sums
    over a split mlp dimension."""
    b, t, d = x.shape
    k = experts.shape[-1]
    num_experts = cfg.num_experts
    slots = jax.vmap(partial(_capacity_slots, num_experts=num_experts, cap=cap))(experts.reshape(b, t * k))
    rows = jnp.repeat(x, k, axis=1)  # [b, T*k, D]
    buf = jax.vmap(lambda r, s: jnp.zeros((num_experts * cap, d), x.dtype).at[s].set(r, mode="drop"))(rows, slots)
    buf = buf.reshape(b, num_experts, cap, d).transpose(1, 0, 2, 3).reshape(ep, num_experts // ep, b * cap, d)
    buf = exchange(buf)  # [source shard, local experts, rows, D]
    hidden = jax.nn.silu(jnp.einsum("serd,edm->serm", buf, w.gate)) * jnp.einsum("serd,edm->serm", buf, w.up)
    out = exchange(reduce(jnp.einsum("serm,emd->serd", hidden, w.down)))
    out = out.reshape(num_experts, b, cap, d).transpose(1, 0, 2, 3).reshape(b, num_experts * cap, d)
    gathered = jax.vmap(lambda o, s: o.at[s].get(mode="fill", fill_value=0))(out, slots)
    return gathered.reshape(b, t, k, d)


# ---- expert parallelism -----------------------------------------------------------------------------


def _expert_parallel_outputs(x, experts, w: ExpertWeights, cfg: ModelConfig, mesh, axes: dict[str, int], cap: int | None):
    active = list(axes)
    batch_axes = logical_to_spec(("batch",), mesh_axes=active)[0]
    w_in = logical_to_spec(("experts", None, "mlp"), mesh_axes=active)
    w_out = logical_to_spec(("experts", "mlp", None), mesh_axes=active)
    expert_axis, tensor_axis = w_in[0], w_in[2]
    ep = _axis_size(expert_axis, axes)
    if cfg.num_experts % ep:
        raise ValueError(f"model.num_experts ({cfg.num_experts}) must be divisible by the expert mesh axis size ({ep})")
    shards = _axis_size(batch_axes, axes)
    w = _cast(w, cfg.compute_dtype)
    b, t, d = x.shape
    k = experts.shape[-1]
    exchange = partial(jax.lax.all_to_all, axis_name=expert_axis, split_axis=0, concat_axis=0, tiled=True)
    reduce = (lambda a: a) if tensor_axis is None else partial(jax.lax.psum, axis_name=tensor_axis)
    if cap is not None:
        xs, es = _pad_rows(x, shards), _pad_rows(experts, shards)
        body = partial(_capacity_outputs, cfg=cfg, cap=cap, ep=ep, exchange=exchange, reduce=reduce)
        token_spec = PartitionSpec(batch_axes, None, None)
        out_spec = PartitionSpec(batch_axes, None, None, None)
    else:  # tokens flattened so any batch shape shards; padding tokens are computed and dropped
        xs, es = _pad_rows(x.reshape(b * t, d), shards), _pad_rows(experts.reshape(b * t, k), shards)
        body = partial(_dropless_exchange, impl=cfg.moe_impl, exchange=exchange, reduce=reduce, ep=ep)
        token_spec = PartitionSpec(batch_axes, None)
        out_spec = PartitionSpec(batch_axes, None, None)
    sharded = jax.shard_map(
        lambda xs, es, g, u, dn: body(xs, es, ExpertWeights(g, u, dn)),
        mesh=mesh,
        in_specs=(token_spec, token_spec, w_in, w_in, w_out),
        out_specs=out_spec,
    )
    out = sharded(xs, es, *w)
    return out[:b].reshape(b, t, k, d) if cap is not None else out[: b * t].reshape(b, t, k, d)


def _dropless_exchange(x2, experts, w: ExpertWeights, *, impl, exchange, reduce, ep: int):
    """One device's dropless share: local tokens x2 [n, D] -> outputs [n, k, D] via all_to_all."""
    n, d = x2.shape
    k = experts.shape[-1]
    assignments = n * k
    local_experts = w.gate.shape[0]
    flat = experts.reshape(-1)
    dest = flat // local_experts
    slot = dest * assignments + _rank_within_group(dest, ep)
    send = jnp.zeros((ep * assignments, d), x2.dtype).at[slot].set(jnp.repeat(x2, k, axis=0))
    send_ids = jnp.full((ep * assignments,), local_experts, jnp.int32).at[slot].set(flat - dest * local_experts)
    recv = exchange(send.reshape(ep, assignments, d)).reshape(ep * assignments, d)
    recv_ids = exchange(send_ids.reshape(ep, assignments)).reshape(-1)
    mlp = lambda rows, sizes: reduce(_swiglu_grouped(rows, sizes, w=w, impl=impl))  # noqa: E731
    out = _grouped_by_id(recv, recv_ids, local_experts, mlp)
    back = exchange(out.reshape(ep, assignments, d)).reshape(ep * assignments, d)
    return jnp.take(back, slot, axis=0).reshape(n, k, d)


def _axis_size(spec_entry, axes: dict[str, int]) -> int:
    if spec_entry is None:
        return 1
    names = (spec_entry,) if isinstance(spec_entry, str) else spec_entry
    return math.prod(axes[a] for a in names)


def _pad_rows(a: jax.Array, multiple: int) -> jax.Array:
    pad = -a.shape[0] % multiple
    return a if not pad else jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1))
