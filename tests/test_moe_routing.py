"""Routers against direct NumPy implementations; expert dispatch against dense computations."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efficient_dlm.models.config import ModelConfig
from efficient_dlm.models.moe import moe_loss_terms, update_expert_bias
from efficient_dlm.models.moe_dispatch import ExpertWeights, capacity, grouped_matmul, routed_outputs
from efficient_dlm.models.routers import route

MOE = dict(model_type="glm4_moe", hidden_size=16, num_experts=16, num_experts_per_tok=4, moe_intermediate_size=8)


def _np_route(logits, bias, k, score, groups, topk_groups, norm, scale):
    """Token by token, written from the DeepSeek-V3 / HF descriptions."""
    weights, experts = [], []
    for row, b in zip(logits.astype(np.float64), np.broadcast_to(bias, logits.shape)):
        s = np.exp(row - row.max()) / np.exp(row - row.max()).sum() if score == "softmax" else 1 / (1 + np.exp(-row))
        choice = s + b
        per = len(row) // groups
        group_score = [np.sort(choice[g * per:(g + 1) * per])[-2:].sum() for g in range(groups)]
        best = np.argsort(group_score)[::-1][:topk_groups]
        eligible = np.isin(np.arange(len(row)) // per, best)
        picked = np.argsort(np.where(eligible, choice, -np.inf))[::-1][:k]
        w = s[picked] / (s[picked].sum() if norm else 1.0) * scale
        order = np.argsort(picked)
        experts.append(picked[order])
        weights.append(w[order])
    return np.array(weights), np.array(experts)


@pytest.mark.parametrize(
    "options",
    [
        dict(router_score="sigmoid", router_groups=4, router_topk_groups=2, router_norm_topk=True, routed_scaling_factor=2.5),
        dict(router_score="sigmoid", router_groups=8, router_topk_groups=3, router_norm_topk=False),
        dict(router_score="softmax", router_norm_topk=True),
        dict(router_score="softmax", router_norm_topk=False),
    ],
    ids=["sigmoid_groups_norm_scaled", "sigmoid_groups_plain", "softmax_norm", "softmax_plain"],
)
def test_router_matches_numpy(options):
    cfg = ModelConfig(**MOE, **options)
    rng = np.random.RandomState(0)
    logits = rng.randn(64, 16).astype(np.float32) * 2
    bias = (rng.rand(16) * 0.5).astype(np.float32) if cfg.router_score == "sigmoid" else np.zeros(16, np.float32)
    weights, experts, _ = route(cfg, jnp.asarray(logits), jnp.asarray(bias))
    order = np.argsort(np.asarray(experts), axis=-1)
    ours_e = np.take_along_axis(np.asarray(experts), order, -1)
    ours_w = np.take_along_axis(np.asarray(weights), order, -1)
    ref_w, ref_e = _np_route(logits, bias, 4, cfg.router_score, cfg.router_groups, cfg.router_topk_groups,
                             cfg.router_norm_topk, cfg.routed_scaling_factor)
    np.testing.assert_array_equal(ours_e, ref_e)
    np.testing.assert_allclose(ours_w, ref_w, rtol=1e-5, atol=1e-6)


def _weights(cfg, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    e, d, m = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
    return ExpertWeights(*(jax.random.normal(k, s) * 0.3 for k, s in zip(keys, [(e, d, m), (e, d, m), (e, m, d)])))


def _every_expert(x, w):
    """[E, B, T, D]: every token through every expert, NumPy float64."""
    x, g, u, dn = (np.asarray(a, np.float64) for a in (x, *w))
    h = np.einsum("btd,edm->ebtm", x, g)
    return np.einsum("ebtm,emd->ebtd", h / (1 + np.exp(-h)) * np.einsum("btd,edm->ebtm", x, u), dn)


def _routing(cfg, shape, seed=1):
    rng = np.random.RandomState(seed)
    x = rng.randn(*shape, cfg.hidden_size).astype(np.float32)
    experts = np.argsort(rng.rand(*shape, cfg.num_experts), axis=-1)[..., : cfg.num_experts_per_tok].astype(np.int32)
    experts[0, :5] = experts[0, 0]  # a crowded expert
    return x, experts


def _dispatch(cfg, capacity_len=None):
    return jax.jit(lambda x, experts, w: routed_outputs(x, experts, w, cfg, capacity_len))


def test_dropless_dispatch_equals_dense_weighted_sum():
    cfg = ModelConfig(**MOE)
    x, experts = _routing(cfg, (3, 10))
    weights = np.random.RandomState(2).rand(3, 10, 4).astype(np.float32)
    w = _weights(cfg)
    out = np.asarray(_dispatch(cfg)(jnp.asarray(x), jnp.asarray(experts), w))
    dense = _every_expert(x, w)  # [E, B, T, D]
    b, t = np.meshgrid(np.arange(3), np.arange(10), indexing="ij")
    expected = dense[experts, b[..., None], t[..., None]]  # [B, T, k, D]
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)
    combined = np.einsum("btkd,btk->btd", out, weights)
    dense_weights = np.zeros((3, 10, cfg.num_experts))
    np.put_along_axis(dense_weights, experts, weights, -1)
    np.testing.assert_allclose(combined, np.einsum("ebtd,bte->btd", dense, dense_weights), rtol=1e-4, atol=1e-4)


def _capacity_reference(experts, dense, cap, positions):
    """Earliest-first capacity over `positions` of each row (per expert at most cap assignments)."""
    b_, t_, k_ = experts.shape
    expected = np.zeros((b_, t_, k_, dense.shape[-1]), np.float32)
    for b in range(b_):
        taken = np.zeros(dense.shape[0], int)
        for t in positions:
            for j, e in enumerate(experts[b, t]):
                if taken[e] < cap:
                    expected[b, t, j] = dense[e, b, t]
                taken[e] += 1
    return expected


def test_capacity_mode_drops_later_assignments_beyond_capacity():
    """capacity_len = T: the whole row under capacity. capacity_len = 6 (training's x_t half of a
    [x_t ; x_0] row of 12): the first 6 positions compete for C = capacity(6), the x_0 half is dropless."""
    cfg = ModelConfig(**MOE, capacity_factor=0.5)
    x, experts = _routing(cfg, (2, 12))
    w = _weights(cfg)
    dense = _every_expert(x, w)
    out = np.asarray(_dispatch(cfg, 12)(jnp.asarray(x), jnp.asarray(experts), w))
    cap = capacity(cfg, 12)
    assert cap == 2  # ceil(0.5 * 12 * 4 / 16)
    expected = _capacity_reference(experts, dense, cap, range(12))
    assert (np.abs(expected).sum(-1) == 0).sum() > 5  # the test really drops
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)
    half = np.asarray(_dispatch(cfg, 6)(jnp.asarray(x), jnp.asarray(experts), w))
    expected = _capacity_reference(experts, dense, capacity(cfg, 6), range(6))
    b, t = np.meshgrid(np.arange(2), np.arange(6, 12), indexing="ij")
    expected[:, 6:] = dense[experts[:, 6:], b[..., None], t[..., None]]  # x_0: every assignment computed
    assert (np.abs(expected[:, :6]).sum(-1) == 0).sum() > 0
    np.testing.assert_allclose(half, expected, rtol=1e-4, atol=1e-4)
    dropless = np.asarray(_dispatch(cfg)(jnp.asarray(x), jnp.asarray(experts), w))  # inference: no drops
    np.testing.assert_allclose(dropless[:, 6:], half[:, 6:], rtol=1e-5, atol=1e-5)
    assert np.all(np.abs(dropless).sum(-1) > 0)


def test_capacity_segments_route_each_half_with_a_capacity_of_its_own():
    """clean_routing="capacity": [x_t ; x_0] rows of 2 x 6, each half with C = capacity(6) of its own
    (plus a dropless tail of 2 positions). Expert e0 is crowded in both halves: x_0 keeps its own C
    assignments of e0 however many x_t took; one capacity over the 12 would drop x_0's in favour of x_t's."""
    cfg = ModelConfig(**MOE, capacity_factor=0.5)
    x, experts = _routing(cfg, (2, 14))
    e0 = experts[0, 0, 0]
    experts[0, 6:10] = experts[0, 0]  # x_0 crowds the same experts as x_t's positions 0..4
    w = _weights(cfg)
    dense = _every_expert(x, w)
    out = np.asarray(jax.jit(lambda x, e, w: routed_outputs(x, e, w, cfg, 6, 2))(jnp.asarray(x), jnp.asarray(experts), w))
    cap = capacity(cfg, 6)
    expected = _capacity_reference(experts, dense, cap, range(6)) + _capacity_reference(experts, dense, cap, range(6, 12))
    b, t = np.meshgrid(np.arange(2), np.arange(12, 14), indexing="ij")
    expected[:, 12:] = dense[experts[:, 12:], b[..., None], t[..., None]]
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)
    kept_e0_x0 = int(np.sum(np.abs(out[0, 6:12][experts[0, 6:12] == e0]).sum(-1) > 0))
    assert kept_e0_x0 == cap  # x_0's own capacity; whole-row capacity(12) would have left it none
    assert np.sum(np.abs(_capacity_reference(experts, dense, capacity(cfg, 12), range(12))[0, 6:12][experts[0, 6:12] == e0]).sum(-1) > 0) == 0


def test_megablox_gmm_matches_ragged_dot():
    rng = np.random.RandomState(0)
    lhs, rhs = jnp.asarray(rng.randn(24, 32), jnp.float32), jnp.asarray(rng.randn(4, 32, 16), jnp.float32)
    sizes = jnp.array([5, 0, 7, 6], jnp.int32)  # an empty group; 6 rows past the groups
    ours = grouped_matmul(lhs, rhs, sizes, "gmm")
    ref = np.concatenate([lhs[:5] @ rhs[0], lhs[5:12] @ rhs[2], lhs[12:18] @ rhs[3], np.zeros((6, 16))])
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(grouped_matmul(lhs, rhs, sizes, "ragged"), ref, rtol=1e-4, atol=1e-4)


def _random_model(cfg: ModelConfig, seed: int = 0):
    """A model with NumPy-random weights (no XLA-compiled initialisers: seconds cheaper on CPU)."""
    from efficient_dlm.models.decoder import abstract_model

    model = abstract_model(cfg)
    rng = np.random.RandomState(seed)
    nnx.update(model, jax.tree.map(lambda a: jnp.asarray(rng.randn(*a.shape) * 0.2, a.dtype), nnx.state(model)))
    return model


def test_aux_loss_free_bias_update_balances_the_load():
    cfg = ModelConfig(**{**MOE, "hidden_size": 32}, num_layers=2, num_heads=2, num_kv_heads=1, vocab_size=64,
                      router_score="sigmoid", router_bias=True)
    model = _random_model(cfg)
    bias = model.layers.mlp.router.bias
    bias[...] = bias[...].at[:, :4].set(0.5)  # experts 0-3 start out favoured
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, 64, (4, 32)))

    @nnx.jit
    def step(model):
        _, aux = model.hidden(tokens)
        update_expert_bias(model, aux, 0.02)
        return jnp.max(aux["expert_load"]) * cfg.num_experts, moe_loss_terms(aux)["load_balancing"]  # 1.0 = uniform

    imbalance = [float(step(model)[0]) for _ in range(30)]
    assert imbalance[0] > 3.0 and max(imbalance[-5:]) < 0.6 * imbalance[0], imbalance
    assert float(step(model)[1]) < 1.2 * cfg.num_experts_per_tok  # the Switch loss is k when balanced


def test_training_routing_counts_real_x_t_tokens_and_routes_x_0_by_clean_routing():
    """[x_t ; x_0] rows with padding under a capacity that drops: the router statistics count the real
    x_t tokens only (not padding, not the x_0 copy). clean_routing="dropless": the x_0 half's hidden
    states (which never see x_t) are the same with and without training's capacity; x_t's are not.
    clean_routing="capacity": the x_0 half equals a block-causal forward of x_0 alone, routed with one
    capacity over its own row (never competing with x_t), and differs from the dropless x_0."""
    cfg = ModelConfig(**{**MOE, "hidden_size": 32}, num_layers=2, num_heads=2, num_kv_heads=1, vocab_size=64,
                      capacity_factor=0.25, router_score="sigmoid", router_bias=True)
    model = _random_model(cfg)
    clean_capacity = _random_model(cfg.replace(clean_routing="capacity"))
    nnx.update(clean_capacity, nnx.state(model))  # the same weights
    length = 16
    tokens = jnp.asarray(np.random.RandomState(1).randint(0, 64, (3, 2 * length)))
    seg = jnp.asarray(np.array([[1] * length, [1] * 10 + [0] * 6, [1] * 5 + [2] * 8 + [0] * 3]))

    @jax.jit
    def run(tokens):
        def hidden(m, c):
            return m.hidden(tokens, attention="clean_context", block_size=4, segment_ids=seg, moe_capacity=c)
        out = {"dropless": hidden(model, False), "capacity": hidden(model, True), "clean": hidden(clean_capacity, True)}
        alone = clean_capacity.hidden(tokens[:, length:], attention="block", block_size=4, segment_ids=seg,
                                      moe_capacity=True)[0]
        return {c: (h, aux["router_tokens"], aux["expert_counts"]) for c, (h, aux) in out.items()}, alone

    out, x_0_alone = run(tokens)
    real_x_t = float(np.sum(np.asarray(seg) > 0))
    for _, tokens_counted, counts in out.values():
        np.testing.assert_array_equal(np.asarray(tokens_counted), [real_x_t] * 2)
        np.testing.assert_allclose(np.asarray(counts).sum(-1), [real_x_t * cfg.num_experts_per_tok] * 2)
    dropless, capacity_routed, clean = (np.asarray(out[c][0]) for c in ("dropless", "capacity", "clean"))
    np.testing.assert_allclose(capacity_routed[:, length:], dropless[:, length:], rtol=1e-6, atol=1e-6)
    assert np.abs(capacity_routed[:, :length] - dropless[:, :length]).max() > 1e-3  # x_t tokens were dropped
    np.testing.assert_allclose(clean[:, length:], np.asarray(x_0_alone), rtol=1e-5, atol=1e-5)
    assert np.abs(clean[:, length:] - dropless[:, length:]).max() > 1e-3  # x_0 tokens were dropped too


def test_weighted_routing_stats_match_numpy():
    rng = np.random.RandomState(3)
    logits = rng.randn(10, 6).astype(np.float32)
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    experts = np.argsort(-logits, -1)[:, :2].astype(np.int32)
    weight = (rng.rand(10) > 0.4).astype(np.float32)
    from efficient_dlm.models.routers import routing_stats

    stats = jax.jit(routing_stats, static_argnums=3)(logits, probs, experts, 6, weight)
    kept = weight > 0
    lse = np.log(np.exp(logits[kept]).sum(-1))
    np.testing.assert_allclose(np.asarray(stats["expert_counts"]), np.bincount(experts[kept].ravel(), minlength=6))
    np.testing.assert_allclose(np.asarray(stats["router_prob_sum"]), probs[kept].sum(0), rtol=1e-6)
    assert float(stats["router_tokens"]) == kept.sum()
    np.testing.assert_allclose(float(stats["router_z"]), np.mean(lse**2), rtol=1e-5)


def test_selection_bias_moves_only_on_steps_the_optimizer_applied():
    """A finite loss with a non-finite gradient: apply_if_finite skips the step, so the bias stays."""
    from efficient_dlm.config import base_config
    from efficient_dlm.models.moe import BIAS_PATH
    from efficient_dlm.train.optim import make_optimizer
    from efficient_dlm.train.state import init_state, split_model
    from efficient_dlm.train.step import apply_gradients

    cfg = ModelConfig(**{**MOE, "hidden_size": 32}, num_layers=1, num_heads=2, num_kv_heads=1, vocab_size=64,
                      router_score="sigmoid", router_bias=True, router_bias_update_rate=0.1)
    t = base_config().train
    tx = make_optimizer(t)
    state = init_state(split_model(_random_model(cfg))[1], tx, 0)
    counts = jnp.arange(cfg.num_experts, dtype=jnp.float32)[None]  # expert e took e assignments
    sums = {"loss": jnp.float32(1.0), "aux_loss": jnp.float32(0.0), "expert_counts": counts}
    zeros = jax.tree.map(jnp.zeros_like, state.params)
    poisoned = jax.tree.map(lambda g: g.at[(0,) * g.ndim].set(jnp.nan), zeros)
    step = jax.jit(lambda state, grads: apply_gradients(t, tx, cfg, state, grads, sums))
    bias = lambda s: np.asarray(dict(nnx.to_flat_state(s.params))[BIAS_PATH][...])  # noqa: E731
    skipped, metrics = step(state, poisoned)
    assert bool(metrics["skipped"]) and np.all(bias(skipped) == bias(state))
    applied, metrics = step(state, zeros)
    expected = bias(state) + 0.1 * np.sign(np.mean(np.asarray(counts)) - np.asarray(counts))
    assert not bool(metrics["skipped"])
    np.testing.assert_allclose(bias(applied), expected, rtol=1e-6)
