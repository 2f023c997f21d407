"""On-policy distillation: the KL against a direct formula, trajectory states against the sampler's own
logits, the constructed zero-KL case, and OPD training through `edlm train` (learning, frozen teacher,
exact resume, mixed recipes, bad configs)."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict

import efficient_dlm as edlm
from efficient_dlm.config import base_config, typed
from efficient_dlm.data.prompts import PromptEncoder, PromptSpec, build_prompt_dataset, layout_batch
from efficient_dlm.diffusion.objectives import predict_hidden
from efficient_dlm.diffusion.opd import choose_steps, distill_stats, kl_from_logits, student_example
from efficient_dlm.sample import generate
from efficient_dlm.sample.program import stop_id_array
from efficient_dlm.train import opd as opd_lib
from efficient_dlm.train import opd_loop
from efficient_dlm.train.loop import train
from efficient_dlm.train.state import split_model
from tests.hf_factory import variant
from tests.sample_reference import peaked_model

BLOCK, MAX_NEW, MASK = 4, 10, 95
PROMPTS = [[7, 3, 11, 42, 5, 17, 60, 2, 33], [9, 14, 80, 21], [50, 6]]  # 2 blocks + 1, exactly 1 block, < 1 block


def _kl_reference(student: np.ndarray, teacher: np.ndarray, top_k: int, valid: int) -> np.ndarray:
    """KL(p || q) per row, written out with NumPy: q over the student's valid ids, p the teacher's
    (top-k renormalised) softmax."""
    s = student[..., :valid].astype(np.float64)
    log_q = s - np.log(np.exp(s - s.max(-1, keepdims=True)).sum(-1, keepdims=True)) - s.max(-1, keepdims=True)
    t = teacher.astype(np.float64)
    out = np.zeros(t.shape[:-1])
    for idx in np.ndindex(*t.shape[:-1]):
        ids = np.argsort(-t[idx])[: top_k or t.shape[-1]]
        p = np.exp(t[idx][ids] - t[idx][ids].max())
        p /= p.sum()
        out[idx] = np.sum(p * (np.log(p) - log_q[idx][ids]))
    return out


def test_kl_matches_the_formula_top_k_at_vocab_equals_full_and_is_zero_only_for_equal_distributions():
    rng = np.random.default_rng(0)
    teacher = rng.normal(size=(2, 5, 12)).astype(np.float32) * 3
    student = rng.normal(size=(2, 5, 16)).astype(np.float32) * 3  # student vocab padded: 13 valid ids of 16
    for top_k in (0, 4, 12):
        ours = kl_from_logits(jnp.asarray(student), jnp.asarray(teacher), top_k=top_k, valid_vocab=13)
        np.testing.assert_allclose(ours.kl, _kl_reference(student, teacher, top_k, 13), rtol=1e-5, atol=1e-6)
    full = kl_from_logits(jnp.asarray(student), jnp.asarray(teacher), top_k=0, valid_vocab=13).kl
    at_vocab = kl_from_logits(jnp.asarray(student), jnp.asarray(teacher), top_k=12, valid_vocab=13).kl  # k = Vt = 12
    np.testing.assert_allclose(at_vocab, full, rtol=1e-6, atol=1e-6)
    assert np.all(np.asarray(full) > 0.05)
    same = np.concatenate([teacher, np.full((2, 5, 4), -30.0, np.float32)], axis=-1)  # q = p on the teacher's ids
    stats = kl_from_logits(jnp.asarray(same), jnp.asarray(teacher), top_k=0, valid_vocab=13)
    assert np.max(np.abs(stats.kl)) < 1e-5 and np.all(np.asarray(stats.agree) == 1)


class _Head:
    """An LM head alone (all `distill_stats` reads of a model): logits = h @ w."""

    def __init__(self, w):
        self.w = w

    def logits(self, h):
        return jnp.einsum("bte,ev->btv", h, self.w)


def test_chunked_kl_equals_plain_in_value_and_gradient():
    rng = np.random.default_rng(1)
    h_s, h_t = (jnp.asarray(rng.normal(size=(2, 10, 8)), jnp.float32) for _ in range(2))
    w_s, w_t = jnp.asarray(rng.normal(size=(8, 24)), jnp.float32), jnp.asarray(rng.normal(size=(8, 20)), jnp.float32)

    def total(w, chunk):
        stats = distill_stats(_Head(w), h_s, _Head(w_t), h_t, top_k=8, valid_vocab=22, chunk=chunk)
        return jnp.sum(stats.kl), stats

    grad = jax.jit(jax.value_and_grad(total, has_aux=True), static_argnums=1)
    (plain, plain_stats), g_plain = grad(w_s, 0)
    (chunked, chunked_stats), g_chunked = grad(w_s, 4)  # 10 positions = 4 + 4 + 2
    assert float(plain) > 0.1
    np.testing.assert_allclose(chunked, plain, rtol=1e-5)
    np.testing.assert_array_equal(chunked_stats.agree, plain_stats.agree)
    np.testing.assert_allclose(g_chunked, g_plain, rtol=1e-4, atol=1e-6)


def test_choose_steps_is_uniform_over_each_groups_distinct_steps():
    # One row, two blocks of 4: block 0 ran steps {1, 2} (step 1 committed three tokens), block 1 ran {3, 5}.
    steps = jnp.asarray([[1, 1, 2, 1, 3, 5, -1, -1]])
    keys = jax.random.split(jax.random.PRNGKey(0), 4000)
    choose = jax.jit(jax.vmap(choose_steps, in_axes=(0, None, None)), static_argnums=2)
    rows = np.asarray(choose(keys, steps, 8))[:, 0]
    assert np.all(rows == rows[:, :1])  # one step for the whole row
    counts = np.array([np.mean(rows[:, 0] == s) for s in (1, 2, 3, 5)])
    np.testing.assert_allclose(counts, 0.25, atol=0.03)  # uniform over steps, not over committed tokens
    blocks = np.asarray(choose(keys, steps, 4))[:, 0]
    assert set(np.unique(blocks[:, 0])) == {1, 2} and set(np.unique(blocks[:, 4])) == {3, 5}
    np.testing.assert_allclose(np.mean(blocks[:, 0] == 1), 0.5, atol=0.03)
    assert np.all(np.asarray(choose_steps(keys[0], jnp.asarray([[-1] * 8]), 4)) == -1)


def _batch(prompts, max_prompt_len=16, block=BLOCK) -> dict:
    spec = PromptSpec(batch_size=len(prompts), block_size=block, max_prompt_len=max_prompt_len, mask_id=MASK, pad_id=0,
                      vocab_size=96)
    ids = np.zeros((len(prompts), max_prompt_len), np.int32)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = p
    laid = layout_batch({"ids": ids, "length": np.array([len(p) for p in prompts])}, spec)
    return {k: jnp.asarray(v) for k, v in laid.items()}


@pytest.fixture(scope="module")
def model():
    """The sampler tests' peaked random model (vocab 96, [MASK] = 95): confident, position-dependent."""
    return peaked_model()


def test_rebuilt_states_reproduce_the_samplers_logits_including_commits_after_a_stop(model):
    """For every step a row ran, the student's clean-context forward on the rebuilt state gives, at the
    positions that step committed, exactly the logits the sampler committed them with."""
    config = base_config()
    config.opd.update(dict(block_size=BLOCK, strategy="threshold", threshold=0.5))
    config = typed(config)
    plan = opd_lib.rollout_plan(config, model.config, MAX_NEW)
    graphdef, params = split_model(model)
    roll = jax.jit(opd_lib.rollout, static_argnums=(0, 2))
    knobs = opd_lib.rollout_knobs(config.opd, model.config, jax.random.PRNGKey(0))
    batch = _batch(PROMPTS)
    free, _ = roll(graphdef, params, plan, batch, knobs)
    stop = int(free.tokens[0, len(PROMPTS[0]) + 5])  # a token row 0 commits mid-block: rows then stop early
    traj, stats = roll(graphdef, params, plan, batch, {**knobs, "stop_ids": jnp.asarray(stop_id_array((stop,)))})
    ref = generate(model, PROMPTS, max_new_tokens=MAX_NEW, block_size=BLOCK, threshold=0.5, stop_tokens=[stop],
                   return_logits=True)
    assert int(stats["generated"]) == ref.generated_tokens and int(stats["row_forwards"]) == ref.row_forwards.sum()
    obj = opd_lib.student_objective(config, model.config)

    @jax.jit
    def logits(traj, chosen):
        ex = student_example(traj, chosen, obj)
        h, _ = predict_hidden(model, obj, ex)
        return model.logits(h), ex.weight

    after_stop_seen = False
    for b, prompt in enumerate(PROMPTS):
        p, n = len(prompt), int(traj.lengths[b])
        assert traj.tokens[b, :p].tolist() == prompt and traj.tokens[b, p : p + n].tolist() == ref.sequences[b]
        steps = np.asarray(traj.steps[b])
        np.testing.assert_array_equal(steps[p : p + n], ref.commit_step[b, :n])
        for s in np.unique(steps[steps >= 0]):
            out, weight = logits(traj, jnp.full(traj.steps.shape, -1).at[b].set(int(s)))
            for j in np.flatnonzero(steps == s):
                if j >= p + n:  # committed, then cut by an earlier stop: later states still saw it
                    after_stop_seen |= bool(np.any((steps > s) & (np.arange(len(steps)) < p + n)))
                    continue
                ref_logits = ref.logits[b, j - p]
                assert np.max(np.abs(np.asarray(out[b, j]) - ref_logits)) <= 1e-5 * max(1.0, np.max(np.abs(ref_logits)))
                assert weight[b, j] == 1.0  # still [MASK] in the state: trained
            block = (np.flatnonzero(steps == s)[0] // BLOCK) * BLOCK
            trained = np.flatnonzero(np.asarray(weight[b]))
            expected = [j for j in range(block, block + BLOCK) if p <= j < p + n and steps[j] >= s]
            assert trained.tolist() == expected
    assert after_stop_seen, "the case this test exists for did not occur; pick another stop token"


def test_quantized_rollouts_decode_as_generate_of_the_quantized_student(model):
    """opd.quantize / opd.quantize_kv: the step's rollout (the Roller, fed the full-precision parameters)
    commits the tokens, at the steps, that generate(student, quantize=..., quantize_kv=...) commits."""
    config = base_config()
    config.opd.update(dict(block_size=BLOCK, strategy="threshold", threshold=0.5, quantize="fp8", quantize_kv="int8"))
    graphdef, params = split_model(model)
    config = typed(config)
    roller = opd_lib.make_roller(config, model.config, graphdef, MAX_NEW)
    knobs = opd_lib.rollout_knobs(config.opd, model.config, jax.random.PRNGKey(0))
    traj, stats = jax.jit(roller)(params, _batch(PROMPTS), knobs)
    kwargs = dict(max_new_tokens=MAX_NEW, block_size=BLOCK, threshold=0.5)
    ref = generate(model, PROMPTS, quantize="fp8", quantize_kv="int8", **kwargs)
    plain = generate(model, PROMPTS, **kwargs)
    assert int(stats["generated"]) == ref.generated_tokens and int(stats["row_forwards"]) == ref.row_forwards.sum()
    for b, prompt in enumerate(PROMPTS):
        p, n = len(prompt), int(traj.lengths[b])
        assert traj.tokens[b, p : p + n].tolist() == ref.sequences[b]
        np.testing.assert_array_equal(np.asarray(traj.steps[b, p : p + n]), ref.commit_step[b, :n])
    assert ref.sequences != plain.sequences or not np.array_equal(ref.commit_step, plain.commit_step), (
        "quantization changed nothing on this model: the test cannot tell a quantized rollout from a float one")


def test_kl_is_zero_when_the_student_is_its_teacher_and_positive_otherwise(model):
    """Block size 1 with token shift makes the dLM's computation the AR one: the student reads token i
    from the clean causal state at i - 1, exactly as the teacher does. With the teacher's own weights
    the distributions coincide at every trained position (the shift alignment end to end)."""
    config = base_config()
    config.diffusion.token_shift = True
    config.opd.update(dict(block_size=1, steps_per_block=1, top_k=0, states="block"))
    teacher = variant(model, mask_token_id=None)
    teacher_params, params = split_model(teacher)[1], split_model(model)[1]
    step = opd_lib.make_opd_eval_step(typed(config), model.config, teacher.config, max_new_tokens=8)
    batch = _batch(PROMPTS, block=1)
    same = jax.device_get(step(params, teacher_params, batch, jax.random.PRNGKey(0)))
    assert same["count"] == 3 * 8  # block 1: every generated token is trained in its only state
    assert abs(same["kl"]) / same["count"] < 1e-5 and same["agree"] == same["count"]
    noisy = jax.tree.map(lambda x: x * (1 + 0.05 * jax.random.normal(jax.random.PRNGKey(1), x.shape)), params)
    other = jax.device_get(step(noisy, teacher_params, batch, jax.random.PRNGKey(0)))
    assert other["kl"] / other["count"] > 1e-2


def test_opd_steps_of_a_moe_student_move_its_selection_bias_and_log_expert_load():
    """The trainer's MoE handling (aux losses, aux-loss-free bias update, load metrics) applies to OPD steps."""
    from flax import nnx

    from efficient_dlm.config import model_config
    from efficient_dlm.models.decoder import init_model
    from efficient_dlm.models.moe import BIAS_PATH
    from efficient_dlm.train.optim import make_optimizer
    from efficient_dlm.train.state import create_state
    from tests.test_moe_configs import _recipe as moe_recipe

    c = moe_recipe("tiny_moe_train")
    c.model.update(vocab_size=96, mask_token_id=MASK, first_k_dense=0, num_layers=1)
    c.opd.update(dict(block_size=BLOCK, steps_per_block=BLOCK, top_k=0))
    student = init_model(model_config(c), seed=0)
    state = create_state(student, make_optimizer(c.train), seed=0)
    teacher_params = jax.tree.map(jnp.copy, state.params)  # the student's initial weights, frozen
    step = opd_lib.make_opd_step(typed(c), student.config, student.config, max_new_tokens=8, donate=False)
    bias = lambda s: np.asarray(dict(nnx.to_flat_state(s.params))[BIAS_PATH][...])  # noqa: E731
    rate, batch = c.model.router_bias_update_rate, _batch(PROMPTS)
    for i in range(2):
        before, (state, metrics) = bias(state), step(state, teacher_params, batch, jax.random.PRNGKey(i))
        moves = (bias(state) - before) / rate  # one step: every expert moved by exactly +-rate (or 0)
        assert np.allclose(np.abs(moves), np.round(np.abs(moves)), atol=1e-4) and np.abs(moves).max() == pytest.approx(1)
        assert float(metrics["aux_loss"]) > 0 and float(metrics["expert_load_max"]) >= 1 >= float(metrics["expert_load_min"])


def _write_prompts(path, count: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for _ in range(count):
            f.write(json.dumps({"prompt_ids": rng.integers(2, MASK, rng.integers(2, 13)).tolist()}) + "\n")
    return str(path)


RECIPE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "opd_tiny.py")


def _recipe(overrides: dict) -> ConfigDict:
    """configs/opd_tiny.py with `overrides` ({"section.key": value}), as `--config.section.key=value` would."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("opd_tiny", RECIPE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    for dotted, value in overrides.items():
        section, key = dotted.split(".")
        c[section][key] = value
    return c


@pytest.fixture(scope="module")
def opd_setup(model, tmp_path_factory):
    """(overrides of configs/opd_tiny.py, tmp dir): the peaked model is the AR teacher and the student's
    init; prompts are token ids. The CLI test passes the same overrides, so compiled steps are shared."""
    tmp = tmp_path_factory.mktemp("opd")
    teacher_dir = str(tmp / "teacher")
    edlm.save(variant(model, mask_token_id=None, eos_token_id=1), teacher_dir)
    overrides = {
        "init.checkpoint": teacher_dir, "init.tokenizer": "", "model.mask_token_id": MASK, "data.num_threads": 1,
        "opd.teacher": teacher_dir, "opd.prompt_files": _write_prompts(tmp / "p.jsonl", 64, 0),
        "opd.eval_files": _write_prompts(tmp / "held_out.jsonl", 16, 1), "opd.eval_batches": 2,
        "opd.max_prompt_len": 12, "opd.max_new_tokens": 8, "opd.max_new_tokens_schedule": "",
        "train.steps": 24, "train.batch_size": 8, "train.learning_rate": 3e-3, "train.warmup_steps": 2,
        "train.eval_every": 12, "train.save_every": 12, "train.log_every": 1, "train.progress": False,
        "run_dir": None,
    }
    return overrides, tmp


def _config(overrides: dict, run_dir) -> ConfigDict:
    c = _recipe({k: v for k, v in overrides.items() if k != "run_dir"})
    c.run_dir = str(run_dir)
    return c


def _leaves(tree) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_opd_training_lowers_held_out_kl_keeps_the_teacher_and_resumes_exactly(model, opd_setup):
    overrides, tmp = opd_setup
    config = _config(overrides, tmp / "run")
    result = train(config)
    run = opd_loop.OPDRun(typed(config), result.model_config, None)
    initial = run.evaluate(split_model(model)[1], 0, jax.device_put)  # the student starts as the teacher's weights
    final = result.evals[-1]
    assert [e["step"] for e in result.evals] == [12, 24]
    assert final["kl"] < 0.8 * initial["kl"], (initial, result.evals)  # 6.37 -> 4.98 at the commit that set 0.8
    assert all(h["opd"] == 1.0 and h["block_size"] == 4 for h in result.history)
    logged = [json.loads(x) for x in open(os.path.join(result.run_dir, "metrics.jsonl"))]
    assert {"kl", "teacher_accuracy", "tokens_per_forward", "grad_norm", "tokens_per_s"} <= set(logged[0])
    assert 0.5 < logged[0]["tokens_per_forward"] <= 1.0  # 4 steps per block of 4: one token per forward

    # The teacher is an argument of the compiled step: bitwise unchanged after training steps.
    before = _leaves(run.teacher.params)
    state = jax.tree.map(jnp.copy, result.state)
    fn, batch = run.step_fn(0), jax.device_put(next(run.iterator))
    for i in range(3):
        state, metrics = fn(state, batch, jax.random.PRNGKey(i))
    assert float(metrics["grad_norm"]) > 0
    for a, b in zip(_leaves(run.teacher.params), before):
        np.testing.assert_array_equal(a, b)

    # Kill after step 12 and resume: the prompt iterator, state and RNG continue exactly.
    resumed_dir = tmp / "resumed"
    shutil.copytree(result.run_dir, resumed_dir, ignore=shutil.ignore_patterns("24", "metrics.jsonl", "tensorboard"))
    again = ConfigDict(config.to_dict())
    again.run_dir = str(resumed_dir)
    resumed = train(again)
    assert [h["kl"] for h in resumed.history] == [h["kl"] for h in result.history[12:]]
    for a, b in zip(_leaves(resumed.state.params), _leaves(result.state.params)):
        np.testing.assert_array_equal(a, b)


def test_edlm_train_mixes_block_diffusion_and_opd_steps(opd_setup, capsys):
    """Interleaving by config through the CLI: block diffusion on text at even steps, OPD at odd ones."""
    from efficient_dlm import cli

    overrides, tmp = opd_setup
    tokens = np.random.default_rng(2).integers(2, MASK, 4000).astype(np.int32)
    np.save(tmp / "tokens.npy", tokens)
    mixed = {**overrides, "run_dir": str(tmp / "mixed"), "diffusion.objective": "block_diffusion",
             "diffusion.block_size": 4, "data.train_files": str(tmp / "tokens.npy"), "data.seq_len": 16,
             "opd.start_step": 1, "opd.every": 2}
    args = ["edlm", "train", f"--config={RECIPE}"] + [f"--config.{k}={v}" for k, v in mixed.items()]
    assert cli.main(args) == 0, capsys.readouterr().err
    assert "trained block_diffusion to step 24" in capsys.readouterr().out
    logged = [json.loads(x) for x in open(tmp / "mixed" / "metrics.jsonl") if '"train"' in x]
    assert [x["opd"] for x in logged] == [0.0, 1.0] * 12
    assert all("kl" in x and "nll" not in x for x in logged[1::2]) and all("nll" in x for x in logged[::2])
    assert {"data", "params", "prompts", "train_state"} <= set(os.listdir(tmp / "mixed" / "24"))


def test_edlm_train_self_distills_without_a_teacher_and_logs_cap(opd_setup, capsys):
    """opd.target=self through the CLI: no teacher is given or loaded; the rollout's own tokens are the targets
    (the loss itself: tests/test_self_distill.py) and CAP's term is logged."""
    from efficient_dlm import cli

    overrides, tmp = opd_setup
    own = {**overrides, "run_dir": str(tmp / "self"), "opd.target": "self", "opd.teacher": "", "opd.eval_files": "",
           "diffusion.confidence_weight": 0.5, "opd.states": "block", "train.steps": 3, "train.save_every": 3}
    args = ["edlm", "train", f"--config={RECIPE}"] + [f"--config.{k}={v}" for k, v in own.items()]
    assert cli.main(args) == 0, capsys.readouterr().err
    logged = [json.loads(x) for x in open(tmp / "self" / "metrics.jsonl") if '"train"' in x]
    assert len(logged) == 3 and all("kl" not in x for x in logged)
    for x in logged:
        assert np.isfinite([x["loss"], x["trajectory_nll"], x["confidence_loss"], x["grad_norm"]]).all()
        assert 0 <= x["trajectory_accuracy"] <= 1 and x["trained_tokens"] > 0 and x["grad_norm"] > 0


def test_prompt_pipeline_chat_template_truncation_and_layout(tmp_path):
    from efficient_dlm.data.byte_tokenizer import ASSET_DIR
    from efficient_dlm.sample.layout import block_layout

    tok_dir = tmp_path / "tok"
    shutil.copytree(ASSET_DIR, tok_dir)
    template = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    (tok_dir / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    spec = PromptSpec(batch_size=2, block_size=4, max_prompt_len=12, mask_id=511, pad_id=0, vocab_size=512,
                      tokenizer=str(tok_dir), chat_template=True)
    byte_ids = lambda text: [b + 3 for b in text.encode()]  # noqa: E731  (the byte tokenizer: byte b -> id b + 3)
    encode = PromptEncoder(spec)
    assert encode({"prompt": "hi"}).tolist() == byte_ids("<|user|>hi\n<|assistant|>")[-12:]  # the last 12 kept
    chat = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]}
    assert encode(chat).tolist() == byte_ids("<|system|>s\n<|user|>q\n<|assistant|>")[-12:]
    plain = PromptEncoder(PromptSpec(**{**spec.__dict__, "chat_template": False}))
    assert plain({"prompt": "hi"}).tolist() == byte_ids("hi") and plain({"prompt_ids": [5, 6]}).tolist() == [5, 6]
    with pytest.raises(ValueError, match="needs opd.chat_template=True"):
        plain(chat)
    (tok_dir / "tokenizer_config.json").write_text("{}")
    with pytest.raises(ValueError, match="has no chat template"):
        PromptEncoder(spec)
    # The pipeline: records -> ids -> the sampler's layout of each batch, in a seeded order.
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"prompt_ids": list(range(3, 3 + n))}) + "\n" for n in (1, 5, 9, 14)))
    spec = PromptSpec(**{**spec.__dict__, "chat_template": False})
    held_out = list(build_prompt_dataset(str(path), spec, train=False))
    rows = [list(range(3, 3 + n))[-12:] for n in (1, 5, 9, 14)]
    for i, batch in enumerate(held_out):
        expected = block_layout([np.array(r) for r in rows[2 * i : 2 * i + 2]], block_size=4, max_new_tokens=1,
                                mask_id=511, pad_id=0, max_positions=1 << 20, capacity=12).arrays()
        for key, value in expected.items():
            np.testing.assert_array_equal(batch[key], value)
    path.write_text('{"text": "no prompt"}\n{"prompt": "x"}\n')
    with pytest.raises(ValueError, match="record 0 needs one of prompt, prompt_ids, messages"):
        next(iter(build_prompt_dataset(str(path), spec, train=False)))


def test_bad_opd_configs_fail_with_one_clear_line(opd_setup):
    from efficient_dlm.config import validate
    from efficient_dlm.train.opd_loop import check_teacher

    overrides, tmp = opd_setup
    bad = {
        "opd.strategy": ("factor", "unknown opd.strategy 'factor'; choose one of topk, threshold"),
        "opd.steps_per_block": (3, "opd.steps_per_block (3) must divide opd.block_size (4)"),
        "opd.states": ("all", "unknown opd.states 'all'; choose one of sequence, block"),
        "opd.target": ("ar", "unknown opd.target 'ar'; choose one of teacher, self"),
        "opd.quantize": ("int4", "opd.quantize must be one of none, int8, fp8, got 'int4'"),
        "opd.quantize_kv": ("fp8", "opd.quantize_kv must be one of none, int8, got 'fp8'"),
        "opd.max_new_tokens_schedule": ("0:8,4:x", "opd.max_new_tokens_schedule item '4:x' must be step:value"),
        "diffusion.objective": ("mdlm", "unknown diffusion.objective 'mdlm'; choose one of block_diffusion, block, "
                                        "bidirectional, ar, opd"),
    }
    for key, (value, message) in bad.items():
        with pytest.raises((ValueError, FileNotFoundError)) as err:
            validate(_config({**overrides, key: value}, tmp / "bad"))
        assert str(err.value) == message or message in str(err.value), (key, err.value)
        assert "\n" not in str(err.value)
    missing = [("opd.teacher", "", "opd.teacher is not set"), ("opd.prompt_files", "", "opd.prompt_files is not set"),
               ("opd.teacher", "/nonexistent", "opd.teacher '/nonexistent' is not a directory")]
    for key, value, message in missing:  # checked when a run starts, before any weights load
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            train(_config({**overrides, key: value}, tmp / "bad_paths"))
    with pytest.raises(ValueError, match=r"opd.quantize / opd.quantize_kv \(quantized rollouts\) are not supported with lora"):
        validate(_config({**overrides, "lora.rank": 4, "opd.quantize_kv": "int8"}, tmp / "bad"))
    with pytest.raises(ValueError, match="needs a diffusion student"):
        validate(_config({**overrides, "diffusion.objective": "ar", "opd.start_step": 0}, tmp / "bad"))
    with pytest.raises(ValueError, match="needs 132 positions, beyond the model's max_position_embeddings=128"):
        train(_config({**overrides, "opd.max_prompt_len": 120}, tmp / "bad_positions"))
    cfg = edlm.ModelConfig(vocab_size=96)
    with pytest.raises(ValueError, match="opd.teacher has a vocabulary of 128 tokens, more than the student's 96"):
        check_teacher(cfg.replace(vocab_size=128), cfg, None)
