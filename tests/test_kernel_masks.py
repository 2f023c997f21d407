"""Splash mask analysis: O(L) tile classification equals the patterns and the library's own analysis."""
import numpy as np
import pytest
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask_info as info_lib

from efficient_dlm.models.masks import MaskSpec, dense_mask
from pallas_kernels.splash_masks import DiffusionMask, computed_tile_fraction, mask_infos, visible_intervals

SPECS = [
    (MaskSpec("causal"), 40),
    (MaskSpec("causal", sliding_window=7), 40),
    (MaskSpec("bidirectional"), 40),
    (MaskSpec("block", 8), 40),
    (MaskSpec("block", 12, 36), 36),
    (MaskSpec("clean_context", 4, 20), 40),
    (MaskSpec("clean_context", 12, 36), 72),
    (MaskSpec("block", 8, sliding_window=5), 40),
    (MaskSpec("bidirectional", sliding_window=9), 40),
    (MaskSpec("clean_context", 4, 20, sliding_window=6), 40),
]


def _from_intervals(spec: MaskSpec, length: int) -> np.ndarray:
    lo1, hi1, lo2, hi2 = visible_intervals(spec, np.arange(length), length)
    k = np.arange(length)[None, :]
    return ((k >= lo1[:, None]) & (k < hi1[:, None])) | ((k >= lo2[:, None]) & (k < hi2[:, None]))


@pytest.mark.parametrize("spec,length", SPECS, ids=lambda x: str(x))
def test_intervals_equal_the_pattern(spec, length):
    expected = np.asarray(dense_mask(spec, length, length))[0]
    np.testing.assert_array_equal(_from_intervals(spec, length), expected)


@pytest.mark.parametrize(
    "spec,length,block",
    [(MaskSpec("clean_context", 24, 192), 384, 128), (MaskSpec("block", 40, 640), 640, 128),
     (MaskSpec("causal", sliding_window=300), 512, 128), (MaskSpec("clean_context", 128, 256), 512, 256),
     (MaskSpec("clean_context", 24, 192, sliding_window=100), 384, 128)],
    ids=lambda x: str(x),
)
def test_mask_info_equals_splash_process_mask(spec, length, block):
    """Same tiles computed and same grid order as the library's O(L^2) analysis of the same mask."""
    fwd, _, dkv = mask_infos(spec, length, length, block)
    mask = mask_lib.MultiHeadMask([DiffusionMask(spec, (length, length))])
    for ours, process in ((fwd, info_lib.process_mask), (dkv, info_lib.process_mask_dkv)):
        theirs, function = process(mask, (block, block))
        assert function is not None and theirs.mask_next is None and theirs.partial_mask_blocks is None
        ours_mask = np.asarray(ours.block_mask)
        assert ours_mask.shape == theirs.block_mask.shape
        computed = ours_mask != 0
        np.testing.assert_array_equal(computed, theirs.block_mask != 0)
        np.testing.assert_array_equal(np.asarray(ours.data_next)[computed], theirs.data_next[computed])
        np.testing.assert_array_equal(ours.q_sequence, theirs.q_sequence)


def test_tile_fraction_counts_the_visible_part():
    spec = MaskSpec("clean_context", 16, 256)
    tiles, visible = computed_tile_fraction(spec, 512, 128)
    dense = np.asarray(dense_mask(spec, 512, 512))[0]
    assert visible == pytest.approx(dense.mean())
    per_tile = dense.reshape(4, 128, 4, 128).any(axis=(1, 3))
    assert tiles == pytest.approx(per_tile.mean())
    assert visible < tiles < 1.0


def test_long_context_mask_info_is_built_from_indices():
    """L = 32768 in the clean-context layout (2L = 65536): 128 x 128 tiles, no L x L array anywhere."""
    spec = MaskSpec("clean_context", 32, 32768)
    fwd, _, dkv = mask_infos(spec, 65536, 65536, 512)
    assert fwd.block_mask.shape[1] == 128 and fwd.block_mask.shape[2] < 128  # grid shrunk to computed tiles
    assert dkv.block_mask.shape[2] == 128
    assert fwd.block_mask.dtype == np.int8 and fwd.data_next.dtype == np.int8
