"""The arithmetic of quantized inference, on qwix (the JAX quantization library): weight einsums, the
embedding gather and the int8 KV round trip. models/quantize.py turns a float model into one whose
weights are qwix `QArray`s; the layers call these helpers at every projection, so a float weight takes
the plain path unchanged and a quantized one the qwix path.

- Weight-only (`model.quantize` int8 / fp8): the weight is dequantized in its float32 scale dtype, cast
  to the compute dtype and contracted in floating point, which is what qwix's own dot_general does
  for a float input (XLA fuses the dequantisation into the matmul's operand). The result is exactly
  the float model run on the dequantized weights, up to accumulation order.
- Weights and activations (`model.quantize_activations`): the input is quantized per token (dynamic
  absmax over the contracted axes) to the weight's type and
  `qwix.einsum` contracts the quantized values (int8 x int8 -> int32 on the MXU), scaling the output.
- KV cache (`model.quantize_kv` int8): each key and value vector is quantized per token and head
  (absmax over head_dim). Every attention reads the dequantized values, in training-mode forwards
  as in decoding, so the model with int8 K/V is one well-defined function: the cached sampler stores
  the very int8 values and scales the forward produced and is exact with respect to it.
Activations and keys / values use scale = absmax / 127 (`_DYNAMIC_CALIBRATION`); weights keep qwix's
default absmax / 127.5 (quantized once, so no rounding tie can differ between two computations).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import qwix
from qwix import QArray

QTYPES = {"int8": jnp.int8, "fp8": jnp.float8_e4m3fn}
SCALE_DTYPE = jnp.float32
# Dynamic int8 quantization (activations, keys / values) with scale = absmax / 127, so a vector's absmax
# maps to +-127 itself. qwix's default bound 127.5 puts it exactly halfway between two levels, where a
# one-ulp difference in the float input (a different matmul shape) flips the rounding: the cached sampler
# and a full recompute would then quantize the same token differently.
_DYNAMIC_CALIBRATION = {"int8": f"absmax,{127.5 / 127!r}", "fp8": "absmax"}


def _dynamic_quantize(x: jax.Array, qtype, channelwise_axes: tuple[int, ...]) -> QArray:
    """Per-channel quantization of a value computed at run time (module docstring: the bound)."""
    kind = "int8" if jnp.dtype(qtype) == jnp.int8 else "fp8"
    return qwix.quantize(x, qtype, channelwise_axes=channelwise_axes, calibration_method=_DYNAMIC_CALIBRATION[kind],
                         scale_dtype=SCALE_DTYPE)


def is_quantized(value) -> bool:
    return isinstance(value, QArray)


def weight_value(variable):
    """The value of a weight variable: a jax.Array, or a QArray for a quantized weight."""
    return variable.get_value()


def dequantized(value, dtype) -> jax.Array:
    """The float weight in `dtype`: dequantized in the scale's float32 first (one rounding), or cast."""
    if is_quantized(value):
        return qwix.dequantize(value).astype(dtype)
    return value.astype(dtype)


def float_weight(variable, dtype):
    """A weight variable's value as a float array: unchanged when float, dequantized to `dtype` when quantized."""
    w = weight_value(variable)
    return dequantized(w, dtype) if is_quantized(w) else w


def _non_contracted_axes(equation: str, operand: int) -> tuple[int, ...]:
    """Axes of input `operand` of a two-operand einsum that do not contract (they keep their own scales)."""
    inputs, output = equation.split("->")
    subscripts = inputs.split(",")[operand]
    return tuple(i for i, char in enumerate(subscripts) if char in output)


def einsum(equation: str, x: jax.Array, variable, dtype, activations: bool = False,
           preferred_element_type=None) -> jax.Array:
    """einsum(equation, x, weight) in compute `dtype` for a float or quantized weight variable.

    activations: quantize x per token to the weight's type and contract the quantized values (only for
    a quantized weight; a float weight ignores it)."""
    w = weight_value(variable)
    if is_quantized(w) and activations:
        qx = _dynamic_quantize(x, w.qtype, _non_contracted_axes(equation, 0))
        out = qwix.einsum(equation, qx, w, preferred_element_type=preferred_element_type or SCALE_DTYPE)
        return out.astype(preferred_element_type or dtype)
    return jnp.einsum(equation, x, dequantized(w, dtype), preferred_element_type=preferred_element_type)


def take_rows(variable, ids: jax.Array, dtype) -> jax.Array:
    """Rows `ids` of an embedding table [vocab, embed] in `dtype`. A quantized table has one scale per
    row, so only the gathered rows are dequantized (never the whole table)."""
    table = weight_value(variable)
    if is_quantized(table):
        rows = QArray(jnp.take(table.qvalue, ids, axis=0), jnp.take(table.scale, ids, axis=0), qtype=table.qtype)
        return qwix.dequantize(rows).astype(dtype)
    return jnp.take(table, ids, axis=0).astype(dtype)


# ---- int8 KV cache --------------------------------------------------------------------------------


def quantize_kv(x: jax.Array) -> QArray:
    """Keys or values [..., heads, head_dim] -> int8 with one float32 scale per vector (per token and head)."""
    return _dynamic_quantize(x, jnp.int8, tuple(range(x.ndim - 1)))


def kv_values(x, dtype) -> jax.Array:
    """Cached keys or values as attention reads them: dequantized (int8 cache) or cast."""
    return dequantized(x, dtype)


def kv_round_trip(k: jax.Array, v: jax.Array, enabled: bool):
    """(k, v as attention sees them, (k, v) as the cache stores them). With the int8 KV cache attention
    reads the dequantized int8 values everywhere and the cache keeps the int8 values and scales."""
    if not enabled:
        return k, v, (k, v)
    qk, qv = quantize_kv(k), quantize_kv(v)
    return kv_values(qk, k.dtype), kv_values(qv, v.dtype), (qk, qv)
