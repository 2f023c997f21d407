"""models/reductions.py: the vectorised argmax equals numpy's argmax (first maximum; NaN wins) on every case."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficient_dlm.models.reductions import argmax, max_and_argmax


def _cases(rng) -> list[np.ndarray]:
    ties = rng.integers(0, 3, size=(4, 5, 37)).astype(np.float32)  # many equal maxima per row
    nan = rng.standard_normal((3, 50)).astype(np.float32)
    nan[0, 7] = nan[0, 20] = np.nan
    nan[2, 49] = np.nan
    inf = rng.standard_normal((3, 9)).astype(np.float32)
    inf[0] = -np.inf
    inf[1, 4] = np.inf
    inf[2, [1, 5]] = np.inf
    return [rng.standard_normal((2, 16, 3072)).astype(np.float32), ties, nan, inf, np.zeros((1, 1), np.float32)]


@pytest.mark.parametrize("axis", [-1, 0, 1])
def test_argmax_equals_numpy_first_maximum(axis):
    for x in _cases(np.random.default_rng(0)):
        if axis >= x.ndim:
            continue
        got = jax.jit(argmax, static_argnums=1)(jnp.asarray(x), axis)
        assert got.dtype == jnp.int32
        np.testing.assert_array_equal(np.asarray(got), np.argmax(x, axis=axis))


def test_max_is_numpy_max_with_the_axis_kept():
    for x in _cases(np.random.default_rng(1)):
        top, index = max_and_argmax(jnp.asarray(x))
        np.testing.assert_array_equal(np.asarray(top), np.max(x, axis=-1, keepdims=True))
        np.testing.assert_array_equal(np.asarray(index), np.argmax(x, axis=-1))


def test_bfloat16_ties_resolve_to_the_first():
    x = np.random.default_rng(2).standard_normal((8, 300)).astype(np.float32)
    low = jnp.asarray(x, jnp.bfloat16)  # rounding creates ties
    np.testing.assert_array_equal(np.asarray(argmax(low)), np.argmax(np.asarray(low, np.float32), axis=-1))
