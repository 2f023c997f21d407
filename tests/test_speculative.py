"""Speculative decoding against the verifier's own decoding: token for token when greedy (the AR sampler,
itself tested against a full-recompute loop in test_sample.py), and in distribution when sampled (exact
enumeration of the verifier's sampling distribution from full causal forwards, chi-square test)."""
import numpy as np
import pytest
from scipy import stats

from efficient_dlm.models.config import ModelConfig
from efficient_dlm.models.decoder import init_model
from efficient_dlm.sample import generate
from tests.sample_reference import full_logits, peaked_model

MAX_NEW = 16
# Ragged: 2 full blocks + 1 token, exactly 1 block, shorter than a block, 1 full block + 3 tokens (block 4).
PROMPTS = [[7, 3, 11, 42, 5, 17, 60, 2, 33], [9, 14, 80, 21], [50, 6], [1, 2, 3, 4, 5, 6, 7]]


def _context_free(attention_scale: float):
    """A peaked model whose [MASK] embedding is zero (a masked position predicts the uniform distribution,
    confidence 1/95) and whose attention output is scaled by `attention_scale`: at 0 every prediction
    depends on the previous token only, so a token-shift draft made left to right is the causal chain."""
    model = peaked_model()
    model.layers.attn.o_proj[...] = model.layers.attn.o_proj[...] * attention_scale
    model.embed_tokens[...] = model.embed_tokens[...].at[model.config.mask_token_id].set(0.0)
    return model


CASES = {
    # drafter, verifier ("self": the drafter in causal mode), generate settings
    "teacher": (peaked_model, lambda d: peaked_model(seed=1, mask_token_id=None), dict(draft_steps=1)),
    "agreeing": (lambda: _context_free(0.0), lambda d: d, dict(draft_steps=4, token_shift=True, threshold=0.5)),
    "self": (lambda: _context_free(1.0), lambda d: "self", dict(draft_steps=2, token_shift=True, threshold=0.5)),
    # fused self-speculation (one-step drafts: the next block's draft rides in the verifier's forward); the
    # unfused one-step path is checked against causal decoding in the forward-count test below
    "self_fused": (lambda: _context_free(1.0), lambda d: "self", dict(draft_steps=1, token_shift=True)),
}


def _stop_token(free) -> int:
    """A token some row generates mid-way and another never does: one row ends early, another runs to the end."""
    rows = free.sequences
    return next(t for row in rows for t in row[1:-1] if any(t not in other for other in rows))


@pytest.mark.parametrize("case", sorted(CASES))
def test_greedy_speculative_equals_the_verifiers_greedy_decoding(case):
    make_drafter, make_verifier, settings = CASES[case]
    drafter = make_drafter()
    verifier = make_verifier(drafter)
    verifier_model = drafter if verifier == "self" else verifier
    free = generate(verifier_model, PROMPTS, max_new_tokens=MAX_NEW, strategy="ar")
    stop = _stop_token(free)
    expected = generate(verifier_model, PROMPTS, max_new_tokens=MAX_NEW, strategy="ar", stop_tokens=[stop])
    result = generate(drafter, PROMPTS, max_new_tokens=MAX_NEW, block_size=4, strategy="speculative", verifier=verifier,
                      stop_tokens=[stop], **settings)
    assert expected.lengths.min() < MAX_NEW == expected.lengths.max()  # an early stop beside a full row
    np.testing.assert_array_equal(result.tokens, expected.tokens)
    np.testing.assert_array_equal(result.lengths, expected.lengths)
    assert result.verifier_forwards == result.row_verifier_forwards.max()
    assert result.forward_passes == result.verifier_forwards + result.draft_forwards
    assert result.tokens_per_verifier_forward == pytest.approx(result.lengths.sum() / result.row_verifier_forwards.sum())
    if case == "agreeing":  # every draft is the causal chain: all accepted, B - r + 1 tokens per verifier forward
        unstopped = generate(drafter, PROMPTS, max_new_tokens=MAX_NEW, block_size=4, strategy="speculative",
                             verifier=verifier, **settings)
        assert unstopped.sequences == free.sequences
        assert unstopped.acceptance_rate == 1.0 and unstopped.tokens_per_verifier_forward > 3


def _tiny(seed: int):
    """Vocabulary 6 ([MASK] = 5, so 5 tokens can be emitted), peaked enough that rows disagree often."""
    cfg = ModelConfig(vocab_size=6, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                      head_dim=8, tie_word_embeddings=False, mask_token_id=5, max_position_embeddings=64, rope_theta=100.0)
    model = init_model(cfg, seed)
    model.lm_head[...] = model.lm_head[...] * 8
    return model


def _ar_distribution(model, prompt, new: int, temperature: float) -> dict[tuple, float]:
    """The verifier's sampling distribution over every continuation of `new` tokens, by enumeration."""
    allowed = [i for i in range(model.config.vocab_size) if i != model.config.mask_token_id]
    table = {(): 1.0}
    for _ in range(new):
        grown = {}
        for seq, mass in table.items():
            z = full_logits(model, list(prompt) + list(seq), "causal")[-1, allowed].astype(np.float64) / temperature
            p = np.exp(z - z.max())
            p /= p.sum()
            grown.update({seq + (t,): mass * p[i] for i, t in enumerate(allowed)})
        table = grown
    return table


def _chi_square_p_value(counts: dict[tuple, int], expected: dict[tuple, float], total: int) -> float:
    """Pearson's test of the counts against the distribution; cells expected below 5 are pooled."""
    big = [seq for seq, p in expected.items() if p * total >= 5]
    observed = [counts.get(seq, 0) for seq in big]
    predicted = [expected[seq] * total for seq in big]
    observed.append(total - sum(observed))
    predicted.append(total - sum(predicted))
    return float(stats.chisquare(observed, predicted).pvalue)


ALPHA = 1e-3  # significance level: a correct sampler fails this test with probability 0.001


def test_sampled_speculative_draws_from_the_verifiers_distribution():
    drafter, verifier = _tiny(0), _tiny(1)
    prompt, new, rows, temperature = [2, 0, 3], 3, 1000, 1.0
    counts: dict[tuple, int] = {}
    accepted = proposed = 0
    for seed in range(4):
        result = generate(drafter, [prompt] * rows, max_new_tokens=new, block_size=2, strategy="speculative",
                          verifier=verifier, draft_steps=2, threshold=0.3, temperature=temperature, seed=seed)
        for seq in result.sequences:
            counts[tuple(seq)] = counts.get(tuple(seq), 0) + 1
        accepted, proposed = accepted + result.accepted.sum(), proposed + result.proposed.sum()
    total = 4 * rows
    assert 0.1 < accepted / proposed < 0.9  # both the acceptance and the residual draw are exercised
    assert _chi_square_p_value(counts, _ar_distribution(verifier, prompt, new, temperature), total) > ALPHA
    # The test has power: the same samples are rejected against the verifier at another temperature.
    assert _chi_square_p_value(counts, _ar_distribution(verifier, prompt, new, 2 * temperature), total) < ALPHA


def test_fused_self_speculation_spends_one_forward_per_accepted_block():
    """With a zero LM head every logit ties, so the drafter's and the verifier's argmax are the same id
    everywhere: every draft is accepted. Fused, only the first iteration runs a drafter forward; unfused,
    every iteration runs one. Either way the tokens are the causal decoding's."""
    model = peaked_model()
    model.lm_head[...] = model.lm_head[...] * 0.0
    expected = generate(model, PROMPTS, max_new_tokens=MAX_NEW, strategy="ar")
    runs = {fuse: generate(model, PROMPTS, max_new_tokens=MAX_NEW, block_size=4, strategy="speculative", verifier="self",
                           token_shift=True, fuse_draft=fuse) for fuse in (True, False)}
    for result in runs.values():
        assert result.sequences == expected.sequences and result.acceptance_rate == 1.0
    np.testing.assert_array_equal(runs[True].row_forwards, runs[True].row_verifier_forwards + 1)
    np.testing.assert_array_equal(runs[False].row_forwards, 2 * runs[False].row_verifier_forwards)
    assert runs[True].shapes["fused"] and not runs[False].shapes["fused"]
