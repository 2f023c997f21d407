"""The sampler against slow references that recompute the full sequence every step (no KV cache)."""
import numpy as np
import pytest

from efficient_dlm.sample import generate
from efficient_dlm.sample.program import TRACES
from tests.sample_reference import peaked_model, reference_ar, reference_dlm

BLOCK, MAX_NEW = 4, 10
# Ragged prompts: 2 full blocks + 1 token, exactly 1 block, shorter than a block (left padding differs).
PROMPTS = [[7, 3, 11, 42, 5, 17, 60, 2, 33], [9, 14, 80, 21], [50, 6]]
CASES = {  # strategy and its parameters, per test case
    "threshold": ("threshold", dict(threshold=0.5)),
    "threshold-token_shift": ("threshold", dict(threshold=0.5, token_shift=True)),
    "topk": ("topk", dict(tokens_per_step=1)),
    "factor": ("factor", dict(factor=1.0)),
    "entropy": ("entropy", dict(entropy_bound=0.5)),
}


@pytest.fixture(scope="module")
def model():
    return peaked_model()


def _assert_logits_close(ours, ref):
    assert ours.shape == ref.shape
    assert np.max(np.abs(ours - ref)) <= 1e-5 * max(1.0, np.max(np.abs(ref)))


@pytest.mark.parametrize("case", sorted(CASES))
def test_cached_generation_equals_full_recompute(model, case):
    strategy, knobs = CASES[case]
    result = generate(model, PROMPTS, max_new_tokens=MAX_NEW, block_size=BLOCK, strategy=strategy,
                      return_logits=True, **knobs)
    for row, prompt in enumerate(PROMPTS):
        tokens, logits, steps = reference_dlm(model, prompt, block=BLOCK, max_new=MAX_NEW, strategy=strategy, **knobs)
        assert result.sequences[row] == tokens
        _assert_logits_close(result.logits[row, : len(tokens)], logits)
        assert result.row_forwards[row] == steps  # the prompt rides along in block 0's first step: no prefill forward
    assert result.tokens_per_forward == pytest.approx(result.lengths.sum() / result.row_forwards.sum())


def test_threshold_zero_commits_the_whole_block_in_one_step(model):
    result = generate(model, PROMPTS, max_new_tokens=MAX_NEW, block_size=BLOCK, threshold=0.0, return_logits=True)
    for row, prompt in enumerate(PROMPTS):
        blocks = (len(prompt) + np.arange(result.lengths[row])) // BLOCK
        steps = result.commit_step[row, : result.lengths[row]]
        for block in np.unique(blocks):
            assert len(set(steps[blocks == block])) == 1
        assert result.row_forwards[row] == len(np.unique(blocks))
        assert result.sequences[row] == reference_dlm(model, prompt, block=BLOCK, max_new=MAX_NEW,
                                                      strategy="threshold", threshold=0.0)[0]


def test_topk_one_commits_exactly_one_token_per_step(model):
    result = generate(model, PROMPTS, max_new_tokens=MAX_NEW, block_size=BLOCK, strategy="topk", tokens_per_step=1,
                      return_logits=True)
    for row, prompt in enumerate(PROMPTS):
        steps = result.commit_step[row, : result.lengths[row]]
        assert result.lengths[row] == MAX_NEW and len(set(steps.tolist())) == MAX_NEW
        assert result.row_forwards[row] == MAX_NEW


def test_stop_token_ends_its_row_while_others_continue(model):
    free = generate(model, PROMPTS, max_new_tokens=MAX_NEW, block_size=BLOCK, threshold=0.5, return_logits=True)
    stop = next(t for t in free.sequences[0][2:] if t not in free.sequences[1])
    result = generate(model, PROMPTS, max_new_tokens=MAX_NEW, block_size=BLOCK, threshold=0.5, stop_tokens=[stop],
                      return_logits=True)
    expected = reference_dlm(model, PROMPTS[0], block=BLOCK, max_new=MAX_NEW, strategy="threshold", threshold=0.5,
                             stop_ids=(stop,))[0]
    assert result.sequences[0] == expected and expected[-1] == stop and len(expected) < MAX_NEW
    assert (result.tokens[0, len(expected):] == result.tokens[0, -1]).all()  # padding after the stop
    assert result.sequences[1] == free.sequences[1] and result.lengths[1] == MAX_NEW


def test_same_shape_never_recompiles_and_rows_ignore_their_companions(model):
    base = generate(model, PROMPTS, max_new_tokens=MAX_NEW, block_size=BLOCK, threshold=0.5, return_logits=True)
    traces = TRACES["diffusion"]
    others = [PROMPTS[2], [1, 2, 3, 4, 5, 6, 7, 8], PROMPTS[0]]  # same bucket, new companion, rows swapped
    swapped = generate(model, others, max_new_tokens=MAX_NEW, block_size=BLOCK, threshold=0.5, return_logits=True)
    generate(model, PROMPTS, max_new_tokens=MAX_NEW, block_size=BLOCK, threshold=0.8, seed=3, stop_tokens=[5, 6],
             return_logits=True)
    assert TRACES["diffusion"] == traces
    assert swapped.sequences[0] == base.sequences[2] and swapped.sequences[2] == base.sequences[0]


def test_streaming_and_padding_do_not_change_rows(model):
    base = generate(model, PROMPTS, max_new_tokens=MAX_NEW, block_size=BLOCK, threshold=0.5, return_logits=True)
    streamed = [[] for _ in PROMPTS]

    def on_block(index, rows):
        for row, tokens in enumerate(rows):
            streamed[row] += tokens

    padded = generate(model, PROMPTS, max_new_tokens=MAX_NEW, block_size=BLOCK, threshold=0.5, prompt_bucket=16,
                      on_block=on_block)
    assert padded.shapes["prompt_bucket"] == 16 and base.shapes["prompt_bucket"] == 8
    assert padded.sequences == base.sequences == streamed


def test_sampling_is_reproducible_from_the_seed(model):
    def run(seed):
        return generate(model, PROMPTS, max_new_tokens=MAX_NEW, block_size=BLOCK, threshold=0.5, temperature=1.0,
                        top_p=0.9, top_k=20, seed=seed).sequences

    first = run(0)
    assert run(0) == first
    assert run(1) != first


def test_pallas_kernels_inside_the_sampler_give_the_same_tokens(model):
    """Block-decode attention and the fused LM-head confidence kernel (Pallas interpret mode on CPU)."""
    kernels = peaked_model(attention_backend="pallas")
    expected = generate(model, PROMPTS, max_new_tokens=MAX_NEW, block_size=BLOCK, threshold=0.5, return_logits=True)
    assert generate(kernels, PROMPTS, max_new_tokens=MAX_NEW, block_size=BLOCK, threshold=0.5).sequences == expected.sequences


def test_ar_baseline_equals_naive_argmax_loop(model):
    result = generate(model, PROMPTS, max_new_tokens=MAX_NEW, strategy="ar", return_logits=True)
    for row, prompt in enumerate(PROMPTS):
        tokens, logits = reference_ar(model, prompt, max_new=MAX_NEW)
        assert result.sequences[row] == tokens
        _assert_logits_close(result.logits[row], logits)
    assert result.forward_passes == MAX_NEW and result.tokens_per_forward == 1.0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(block_size=0), "block_size must be a positive integer, got 0"),
        (dict(max_new_tokens=0), "max_new_tokens must be an integer >= 1, got 0"),
        (dict(prompt_bucket=8), "prompt 0 has 9 tokens, longer than the cache's prompt capacity prompt_bucket=8"),
        (dict(max_new_tokens=125), "beyond the model's max_position_embeddings=128"),
        (dict(strategy="greedy"), "strategy must be one of ar, threshold, topk, factor, entropy, speculative, self_speculative, got 'greedy'"),
        (dict(threshold=1.5), "threshold must be in [0, 1], got 1.5"),
        (dict(prompts=[[3], []]), "prompt 1 is empty"),
        (dict(prompts=[[3, 96]]), "prompt 0 holds token id 96 outside the vocabulary (size 96)"),
        (dict(stop_tokens=[-1]), "stop token -1 is outside the vocabulary"),
    ],
)
def test_bad_arguments_fail_with_one_clear_line(model, kwargs, message):
    args = dict(prompts=PROMPTS, max_new_tokens=MAX_NEW, block_size=BLOCK) | kwargs
    with pytest.raises(ValueError) as err:
        generate(model, args.pop("prompts"), **args)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_missing_mask_token_is_a_clear_error():
    with pytest.raises(ValueError, match="no mask_token_id") as err:
        generate(peaked_model(mask_token_id=None), PROMPTS, max_new_tokens=4, block_size=BLOCK)
    assert "\n" not in str(err.value)


def test_threshold_fast_path_equals_the_ranked_commit():
    """The sort-free threshold commit equals the general ranked one, ties and all-below rows included."""
    import jax.numpy as jnp

    from efficient_dlm.sample.strategies import commit_mask

    rng = np.random.default_rng(3)
    confidence = rng.choice([0.2, 0.5, 0.9, 0.95], size=(256, 6)).astype(np.float32)  # many exact ties
    open_ = rng.random((256, 6)) < 0.6
    for threshold in (0.0, 0.5, 0.9, 0.99, 1.0):
        knobs = {"threshold": jnp.float32(threshold)}
        fast = commit_mask("threshold", jnp.asarray(confidence), None, jnp.asarray(open_), knobs)
        ranked = commit_mask("threshold", jnp.asarray(confidence), None, jnp.asarray(open_), knobs, ranked=True)
        np.testing.assert_array_equal(fast, ranked)
        assert (np.asarray(fast).sum(-1) >= open_.any(-1)).all()  # a row with open positions commits one at least
