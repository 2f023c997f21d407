"""Chat SFT: conversations rendered with a chat template, only assistant turns masked and supervised,
blocks where the sampler puts them, exact resume, and a chat-SFT'd tiny dLM sampled through `edlm sample`.

References are independent of data/chat.py: conversations are rendered here by string formatting and
tokenized whole (the byte tokenizer maps one byte to one id, so piecewise and whole tokenization agree),
and the objectives' masks and weights are checked against the batch's own assistant mask.
"""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tokenizers import AddedToken, Tokenizer

import efficient_dlm as edlm
from efficient_dlm import cli
from efficient_dlm.data.pipeline import DataSpec, build_dataset, take
from efficient_dlm.diffusion import corruption
from efficient_dlm.diffusion.objectives import Objective, corrupt
from efficient_dlm.errors import UserError
from tests.corpus import BYTE_TOKENIZER

EOS, MASK, L, ALIGN = 1, 511, 128, 8
CHATML = (
    "{%- for m in messages -%}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)
WORDS = "cat dog sun moon red blue".split()


def _conversations(count: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        words = [" ".join(rng.choice(WORDS, rng.integers(1, 4))) for _ in range(4)]
        if i % 3 == 0:  # multi-turn, with a system turn
            messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": words[0]},
                        {"role": "assistant", "content": words[1]}, {"role": "user", "content": words[2]},
                        {"role": "assistant", "content": words[3]}]
            out.append({"messages": messages})
        else:
            out.append({"prompt": f"{i} {words[0]}", "response": words[1]})
    return out


def _write(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.fixture(scope="module")
def chatml(tmp_path_factory):
    """The byte tokenizer with <|im_start|> / <|im_end|> added as special tokens (ids 259, 260), a
    ChatML template file, and 60 conversations."""
    root = tmp_path_factory.mktemp("chat")
    tok = Tokenizer.from_file(os.path.join(BYTE_TOKENIZER, "tokenizer.json"))
    tok.add_special_tokens([AddedToken("<|im_start|>", special=True), AddedToken("<|im_end|>", special=True)])
    (root / "tok").mkdir()
    tok.save(str(root / "tok" / "tokenizer.json"))
    (root / "chatml.jinja").write_text(CHATML)
    records = _conversations(60)
    return root, tok, _write(root / "chat.jsonl", records), records


def _messages(record: dict) -> list[dict]:
    if "messages" in record:
        return record["messages"]
    return [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["response"]}]


def _reference(record: dict) -> tuple[list[int], list[int]]:
    """ChatML written out: (ids, supervised) with the assistant contents and their <|im_end|> supervised."""
    ids, sup = [], []
    for m in _messages(record):
        head, body = list((f"{m['role']}\n").encode()), list(m["content"].encode())
        a = int(m["role"] == "assistant")
        ids += [259] + [b + 3 for b in head] + [b + 3 for b in body] + [260] + [ord("\n") + 3]
        sup += [0] * (1 + len(head)) + [a] * len(body) + [a, 0]
    return ids, sup


def _spec(tok_dir, **kw) -> DataSpec:
    base = dict(seq_len=L, batch_size=4, eos_id=EOS, vocab_size=512, tokenizer=str(tok_dir), num_threads=1,
                format="chat", align=ALIGN)
    return DataSpec(**{**base, **kw})


def _segments(batch):
    """(row, start, end) of every conversation in a batch."""
    for r, seg in enumerate(batch["segment_ids"]):
        for s in np.unique(seg[seg > 0]):
            where = np.flatnonzero(seg == s)
            yield r, where[0], where[-1] + 1


def test_chat_batches_supervise_every_assistant_turn_and_nothing_else(chatml):
    root, _, path, records = chatml
    spec = _spec(root / "tok", chat_template=str(root / "chatml.jinja"), batch_size=1)  # no remainder dropped
    batches = take(build_dataset(path, spec, train=False), 100)
    reference = {tuple(ids): sup for ids, sup in map(_reference, records)}
    seen = []
    for b in batches:
        assert np.array_equal(b["maskable"], b["loss_weights"] > 0) and b["maskable"].dtype == bool
        for r, start, end in _segments(b):
            ids = tuple(b["tokens"][r, start:end].tolist())
            assert start % ALIGN == 0, start  # every conversation starts on a block boundary
            np.testing.assert_array_equal(b["positions"][r, start:end], np.arange(end - start))
            np.testing.assert_array_equal(b["loss_weights"][r, start:end], reference[ids])
            seen.append(ids)
        assert not b["loss_weights"][b["segment_ids"] == 0].any()
    assert sorted(seen) == sorted(reference)  # every conversation once, whole (none longer than a row here)
    multi = next(r for r in records if "messages" in r)
    ids, sup = _reference(multi)
    turns = np.split(np.asarray(sup), np.flatnonzero(np.diff(sup)) + 1)
    assert sum(t[0] == 1 for t in turns) == 2  # both assistant turns supervised, as two separate runs


def test_sampler_prompt_is_the_conversation_prefix_before_each_reply(chatml):
    """The ids `edlm sample --chat` feeds for a history equal the training row's ids before that reply."""
    from efficient_dlm.data.chat import ChatEncoder

    root, tok, _, records = chatml
    encoder = ChatEncoder(str(root / "tok"), eos_id=EOS, chat_template=str(root / "chatml.jinja"))
    multi = next(r for r in records if "messages" in r)
    row = encoder(("test", multi["messages"]))
    starts = np.flatnonzero(np.diff(np.concatenate([[0], row["assistant"]])) == 1)
    for turn, start in zip((2, 4), starts):
        assert encoder.prompt_ids(multi["messages"][:turn]) == row["tokens"][:start].tolist()
    assert encoder.end_of_turn_id() == 260


OBJECTIVES = [
    Objective("block_diffusion", ALIGN, mask_token_id=MASK),
    Objective("block_diffusion", ALIGN, mask_token_id=MASK, token_shift=True, complementary=True, ar_weight=0.5),
    Objective("block", ALIGN, mask_token_id=MASK, masking="uniform"),
    Objective("bidirectional", None, mask_token_id=MASK, masking="uniform", weighting="mean"),
    Objective("ar", None),
]


@pytest.mark.parametrize("obj", OBJECTIVES, ids=lambda o: f"{o.kind}{'_shift' if o.token_shift else ''}")
def test_no_prompt_or_template_token_is_masked_weighted_or_predicted(chatml, obj):
    root, _, path, _ = chatml
    batch = take(build_dataset(path, _spec(root / "tok", chat_template=str(root / "chatml.jinja")), train=False), 1)[0]
    assistant = batch["loss_weights"] > 0
    copies = 2 if obj.complementary else 1
    for seed in range(3):
        ex = corrupt(obj, jax.tree.map(jnp.asarray, batch), jax.random.PRNGKey(seed))
        sup = np.tile(assistant, (copies, 1))
        noised, weight, count = (np.asarray(x) for x in (ex.noised, ex.weight, ex.count))
        assert not (noised & ~sup).any() and not (weight[~sup] != 0).any() and not (count[~sup] != 0).any()
        x_t = np.asarray(ex.inputs)[:, :L]
        np.testing.assert_array_equal(x_t[~sup], np.tile(batch["tokens"], (copies, 1))[~sup])  # prompts clean
        if obj.kind == "block_diffusion":
            np.testing.assert_array_equal(np.asarray(ex.inputs)[:, L:], np.tile(batch["tokens"], (copies, 1)))
        if ex.ar_count is not None:
            assert not (np.asarray(ex.ar_count)[~sup] != 0).any() and np.asarray(ex.ar_count).sum() > 0
        if obj.is_diffusion:
            assert noised.any() and (x_t[noised] == MASK).all()
        else:  # AR: every assistant token but a document's first is a target, nothing else
            want = assistant & np.asarray(corruption.predecessor_in_document(jnp.asarray(batch["segment_ids"])))
            np.testing.assert_array_equal(count > 0, want)
        if obj.kind == "block_diffusion" and obj.weighting == "elbo" and not obj.token_shift:
            # n / k per block with n = the block's assistant tokens (the ones the sampler would generate)
            n = assistant.reshape(-1, L // ALIGN, ALIGN).sum(-1)
            k = noised.reshape(-1, L // ALIGN, ALIGN).sum(-1)
            per_block = np.where(k > 0, n / np.maximum(k, 1), 0)
            np.testing.assert_allclose(weight, np.repeat(per_block, ALIGN, axis=1) * noised, rtol=1e-6)


def test_cap_confidence_term_covers_only_assistant_tokens(chatml):
    """CAP (diffusion.confidence_weight) on a chat batch: its sum is the entropy of the already-correct
    masked assistant tokens, recomputed here from the model's own logits; prompts add nothing. The final
    norm is zeroed so every position predicts id 0 (<pad>, written into prompts and replies as text):
    'correct' then happens on both sides of the prompt / reply boundary."""
    from efficient_dlm.diffusion.objectives import loss_and_sums, predict_hidden

    root, _, _, _ = chatml
    records = [{"prompt": f"{i} <pad> <pad>", "response": "<pad><pad> a<pad><pad>"} for i in range(24)]
    path = _write(root / "pads.jsonl", records)
    batch = take(build_dataset(path, _spec(root / "tok", chat_template=str(root / "chatml.jinja")), train=False), 1)[0]
    cfg = edlm.ModelConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                           num_kv_heads=1, head_dim=16, mask_token_id=MASK, eos_token_id=EOS)
    model = edlm.init_model(cfg, seed=0)
    model.final_norm.scale[...] = jnp.zeros_like(model.final_norm.scale[...])
    obj = Objective("block_diffusion", ALIGN, mask_token_id=MASK, confidence_weight=0.5)
    ex = corrupt(obj, jax.tree.map(jnp.asarray, batch), jax.random.PRNGKey(0))
    _, _, sums = loss_and_sums(model, obj, ex, normaliser=1.0)
    h, _ = predict_hidden(model, obj, ex)
    logits = np.asarray(model.logits(h), np.float64)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    entropy = -(p * np.log(p)).sum(-1)
    chosen = np.asarray(ex.noised) & (batch["loss_weights"] > 0) & (logits.argmax(-1) == batch["tokens"])
    np.testing.assert_allclose(float(sums["confidence"]), entropy[chosen].sum(), rtol=1e-4)
    assert chosen.any() and ((logits.argmax(-1) == batch["tokens"]) & (batch["loss_weights"] == 0)).any()


def test_chat_iterator_resumes_bitwise_and_shards_by_process(chatml):
    root, _, path, records = chatml
    spec = _spec(root / "tok", chat_template=str(root / "chatml.jinja"), seed=5)
    it = iter(build_dataset(path, spec))
    first = [next(it) for _ in range(3)]
    state = it.get_state()
    want = [next(it) for _ in range(3)]
    resumed = iter(build_dataset(path, spec))
    resumed.set_state(state)
    for w in want:
        got = next(resumed)
        assert set(got) == set(w) and all(np.array_equal(got[k], w[k]) and got[k].dtype == w[k].dtype for k in w)
    again = iter(build_dataset(path, spec))
    assert all(np.array_equal(next(again)["tokens"], f["tokens"]) for f in first)  # order is the seed's
    one = _spec(root / "tok", chat_template=str(root / "chatml.jinja"), batch_size=1)
    shards = [take(build_dataset(path, one, train=False, process_index=p, process_count=2), 100) for p in (0, 1)]
    ids = [{tuple(b["tokens"][r, s:e].tolist()) for b in bs for r, s, e in _segments(b)} for bs in shards]
    assert not ids[0] & ids[1] and len(ids[0] | ids[1]) == len(records)


def test_bad_chat_records_fail_with_one_line_naming_file_and_line(chatml, tmp_path):
    root, _, _, _ = chatml
    spec = _spec(root / "tok", chat_template=str(root / "chatml.jinja"))
    good = json.dumps({"prompt": "a", "response": "b"})
    bad = {
        '{"messages": [{"role": "user", "content": "hi"}]}': "line 2: no assistant message",
        '{"messages": [{"role": "bot", "content": "hi"}]}': "line 2: message 0 has role 'bot'",
        '{"prompt": "hi"}': "line 2: needs \"messages\" or both \"prompt\" and \"response\"",
        '{"messages": [{"role": "assistant", "content": 3}]}': "line 2: message 0 (assistant) needs a string",
        "{oops": "line 2 is not valid JSON",
    }
    for line, message in bad.items():
        path = tmp_path / "bad.jsonl"
        path.write_text(good + "\n" + line + "\n")
        with pytest.raises(UserError) as err:
            take(build_dataset(str(path), spec, train=False), 10)
        assert f"{path}: {message}" in str(err.value) and "\n" not in str(err.value), err.value
    with pytest.raises(UserError, match="has no chat template.*data.chat_template=builtin"):
        take(build_dataset(str(path), _spec(root / "tok"), train=False), 1)


def test_a_chat_sft_tiny_dlm_samples_a_reply_through_edlm_sample(tmp_path, capsys):
    """configs/tiny_sft.py for a few steps (the mechanics), then `edlm sample` renders the prompt as a
    user turn with the run's (builtin) template and decodes exactly what generate() decodes from it."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    data = _write(tmp_path / "chat.jsonl", _conversations(40))
    run = tmp_path / "sft"
    small = ["hidden_size=32", "intermediate_size=64", "num_layers=1", "num_heads=2", "num_kv_heads=1", "head_dim=16"]
    recipe = [f"--config={root}/configs/tiny_sft.py", *(f"--config.model.{kv}" for kv in small)]
    argv = ["edlm", "train", *recipe, f"--config.data.train_files={data}", "--config.data.seq_len=64",
            "--config.train.steps=3", "--config.train.batch_size=2", "--config.train.progress=False", f"--config.run_dir={run}"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    tok_dir = run / "tokenizer"
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True).chat_template  # serve / lm-eval see it
    out, prompts = tmp_path / "out.jsonl", tmp_path / "prompts.jsonl"
    model = edlm.load(str(run))
    want = [b + 3 for b in b"<|user|>cat dog"] + [EOS] + [b + 3 for b in b"<|assistant|>"]
    expected = edlm.generate(model, [want], max_new_tokens=8, threshold=0.5, stop_tokens=(EOS,)).sequences[0]
    reply = Tokenizer.from_file(str(tok_dir / "tokenizer.json")).decode(expected, skip_special_tokens=True)
    _write(prompts, [{"prompt": "cat dog", "reference": f" {reply} "}, {"prompt": "cat dog", "reference": reply + "x"}])
    sample = ["edlm", "sample", f"--config={root}/configs/tiny_sft.py", "--ckpt", str(run), "--prompts_jsonl",
              str(prompts), "--out", str(out), "--config.sample.max_new_tokens=8", "--config.sample.threshold=0.5"]
    capsys.readouterr()
    assert cli.main(sample) == 0
    assert "exact match 1/2 (50.0%)" in capsys.readouterr().err
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["prompt_ids"] for r in records] == [want, want]
    assert records[0]["completion_ids"] == expected and len(expected) >= 1


def _demo_chat_segments(path, template: str, count: int):
    """(ids, supervised, maskable) of each conversation in the first `count` batches of a demo chat file,
    through the chat pipeline with the shipped demo teacher's tokenizer; and that tokenizer."""
    from efficient_dlm.demo.teacher import teacher_dir

    tok_dir = teacher_dir("")
    spec = DataSpec(seq_len=64, batch_size=1, eos_id=0, vocab_size=4096, tokenizer=tok_dir, num_threads=1,
                    format="chat", chat_template=template, align=4)
    segments = [(b["tokens"][r, start:end].tolist(), (b["loss_weights"][r, start:end] > 0).tolist(),
                 b["maskable"][r, start:end].tolist())
                for b in take(build_dataset(str(path), spec, train=False), count) for r, start, end in _segments(b)]
    return segments, Tokenizer.from_file(os.path.join(tok_dir, "tokenizer.json"))


def test_demo_tasks_as_chat_turns_render_with_the_demo_tokenizer(tmp_path):
    """`edlm demo-data --chat`: the demo's instances as prompt / response turns; through the chat pipeline
    with the demo teacher's tokenizer (no template of its own: builtin) each reply is the answer + EOS."""
    from efficient_dlm.demo import data as demo_data, tasks

    counts = demo_data.write_chat(str(tmp_path), train_tasks=12, eval_tasks_per_task=2, task_names=["reverse", "add"])
    assert counts == {"chat_train.jsonl": 12, "chat_eval.jsonl": 4}
    train = [json.loads(x) for x in (tmp_path / "chat_train.jsonl").read_text().splitlines()]
    items = tasks.instances("train", 12, 0, ["reverse", "add"])
    assert train == [{"prompt": i.prompt, "response": i.answer} for i in items]
    held = [json.loads(x) for x in (tmp_path / "chat_eval.jsonl").read_text().splitlines()]
    assert [(r["task"], r["prompt"], r["answer"]) for r in held] == [
        (i.task, i.prompt, i.answer) for i in tasks.instances("eval", 4, 0, ["reverse", "add"])]
    segments, tok = _demo_chat_segments(tmp_path / "chat_train.jsonl", "builtin", 12)
    replies = []
    for ids, sup, _ in segments:
        replies.append(tok.decode([t for t, s in zip(ids, sup) if s], skip_special_tokens=False))
        text = tok.decode(ids, skip_special_tokens=False)
        assert text.startswith("<|user|>") and text.endswith("<|endoftext|>")
    assert replies == [i.answer + "<|endoftext|>" for i in items]


def test_sft_recipes_validate_and_chat_keys_are_checked():
    from efficient_dlm.config import sibling_recipe, validate

    anchor = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "x.py")
    for name in ("tiny_sft", "qwen3_8b_sft", "demo_sft", "tiny_lora"):
        c = validate(sibling_recipe(anchor, name))
        assert c.data.format == "chat", name
    c = sibling_recipe(anchor, "tiny_train")
    c.data.format = "dialog"
    with pytest.raises(UserError, match="^unknown data.format 'dialog'; choose one of text, chat$"):
        validate(c)
    c.data.format, c.data.chat_template = "text", "builtin"
    with pytest.raises(UserError, match="data.chat_template is set .* set data.format=chat"):
        validate(c)


def test_plain_template_renders_the_raw_document_and_supervises_only_the_answer(tmp_path):
    """data.chat_template=plain (the demo's prompt-clean conversion): a prompt/response record is the
    teacher's own document, prompt + answer + EOS, token for token, and only the answer + EOS is
    supervised and maskable: the prompt stays clean, as the sampler sees it."""
    from efficient_dlm.demo import data as demo_data, tasks

    demo_data.write_chat(str(tmp_path), train_tasks=10, eval_tasks_per_task=1, task_names=["add", "upper"])
    items = tasks.instances("train", 10, 0, ["add", "upper"])
    segments, tok = _demo_chat_segments(tmp_path / "chat_train.jsonl", "plain", 10)
    assert all(sup == maskable for _, sup, maskable in segments)
    seen = [(ids, sup) for ids, sup, _ in segments]
    expected = []
    for inst in items:
        prompt, full = tok.encode(inst.prompt).ids, tok.encode(inst.text).ids + [0]
        expected.append((full, [False] * len(prompt) + [True] * (len(full) - len(prompt))))
    assert seen == expected
