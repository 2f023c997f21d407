"""grain pipeline: tokenization, packing, padding, mixtures, determinism, resume, sharding, errors."""
import numpy as np
import pytest

from efficient_dlm.data.pipeline import DataSpec, build_dataset, take
from efficient_dlm.data.tokenize import load_tokenizer
from tests.corpus import BYTE_TOKENIZER, documents, write_jsonl

EOS = 1


def _spec(**kw):
    base = dict(seq_len=32, batch_size=4, eos_id=EOS, vocab_size=512, tokenizer=BYTE_TOKENIZER, num_threads=1)
    return DataSpec(**{**base, **kw})


def _encode(docs):
    tok = load_tokenizer(BYTE_TOKENIZER)
    return [tok.encode(d, add_special_tokens=False).ids + [EOS] for d in docs]


def test_packing_concatenates_documents_with_eos_segments_and_positions(tmp_path):
    docs = documents(60)
    path = write_jsonl(tmp_path / "a.jsonl", docs)
    batches = take(build_dataset(path, _spec(), train=False), 100)
    tokens = np.concatenate([b["tokens"] for b in batches]).reshape(-1)
    stream = np.concatenate([np.array(ids) for ids in _encode(docs)])
    np.testing.assert_array_equal(tokens, stream[: len(tokens)])  # in order, EOS after every document
    for b in batches:
        for row_tokens, seg, pos in zip(b["tokens"], b["segment_ids"], b["positions"]):
            assert seg[0] == 1 and np.all(np.diff(seg) >= 0) and np.all(seg > 0)
            starts = np.flatnonzero(np.diff(seg)) + 1
            assert np.all(pos[starts] == 0) and np.all(row_tokens[starts - 1] == EOS)  # a new document follows EOS
            inside = np.ones(len(seg), bool)
            inside[starts] = False
            inside[0] = False
            assert np.all(pos[inside] == pos[np.flatnonzero(inside) - 1] + 1)


def test_padding_mode_one_truncated_document_per_row(tmp_path):
    docs = ["a" * 40, "bb", "ccc dd", "e"]
    path = write_jsonl(tmp_path / "p.jsonl", docs)
    (batch,) = take(build_dataset(path, _spec(packing=False, pad_id=0), train=False), 1)
    for row, ids in zip(range(4), _encode(docs)):
        n = min(len(ids), 32)
        np.testing.assert_array_equal(batch["tokens"][row, :n], ids[:n])
        assert np.all(batch["tokens"][row, n:] == 0)
        np.testing.assert_array_equal(batch["segment_ids"][row], (np.arange(32) < n).astype(int))
        np.testing.assert_array_equal(batch["positions"][row], np.arange(32))


def _first(ds, n):
    it = iter(ds)
    return [next(it) for _ in range(n)]


def test_train_order_is_deterministic_and_resumes_exactly(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", documents(50))
    a, b = _first(build_dataset(path, _spec(seed=3)), 6), _first(build_dataset(path, _spec(seed=3)), 6)
    other = _first(build_dataset(path, _spec(seed=4)), 6)
    assert all(np.array_equal(x["tokens"], y["tokens"]) for x, y in zip(a, b))
    assert not all(np.array_equal(x["tokens"], y["tokens"]) for x, y in zip(a, other))
    it = iter(build_dataset(path, _spec(seed=3)))
    for _ in range(3):
        next(it)
    state = it.get_state()
    resumed = iter(build_dataset(path, _spec(seed=3)))
    resumed.set_state(state)
    for want in a[3:]:
        got = next(resumed)
        assert all(np.array_equal(got[k], want[k]) for k in want)
    # Repetition: 50 short documents are exhausted long before 40 batches; epochs reshuffle.
    assert len(_first(build_dataset(path, _spec(seed=3)), 40)) == 40


def test_mixture_weights_and_process_sharding(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", documents(200, 1, prefix="A"))
    b = write_jsonl(tmp_path / "b.jsonl", documents(200, 2, prefix="B"))
    spec = _spec(packing=False, seq_len=16, batch_size=10)
    rows = np.concatenate([x["tokens"] for x in _first(build_dataset(f"{a},{b}", spec, weights="3,1"), 40)])
    share = np.mean(rows[:, 0] == ord("A") + 3)  # byte tokenizer: id = byte + 3
    assert abs(share - 0.75) < 0.05
    shards = [
        np.concatenate([x["tokens"] for x in take(build_dataset(a, spec, train=False, process_index=i, process_count=2), 100)])
        for i in range(2)
    ]
    full = np.concatenate([x["tokens"] for x in take(build_dataset(a, spec, train=False), 100)])
    assert len(shards[0]) + len(shards[1]) == len(full) == 200
    as_set = lambda rows: {r.tobytes() for r in rows}  # noqa: E731
    assert as_set(shards[0]) | as_set(shards[1]) == as_set(full)
    np.testing.assert_array_equal(shards[0], full[0::2])


def test_parquet_arrayrecord_and_token_arrays_read_the_same_documents(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from array_record.python.array_record_module import ArrayRecordWriter

    docs = documents(30, 7)
    spec = _spec(packing=False, seq_len=48, batch_size=30)
    expected = take(build_dataset(write_jsonl(tmp_path / "d.jsonl", docs), spec, train=False), 1)[0]
    pq.write_table(pa.table({"text": docs}), tmp_path / "d.parquet")
    writer = ArrayRecordWriter(str(tmp_path / "d.arrayrecord"), "group_size:1")
    for i, d in enumerate(docs):
        writer.write(d.encode() if i % 2 else ('{"text": "%s"}' % d).encode())  # raw text or JSON records
    writer.close()
    np.save(tmp_path / "d.npy", np.concatenate([np.array(ids, np.int32) for ids in _encode(docs)]))
    for name in ("d.parquet", "d.arrayrecord", "d.npy"):
        got = take(build_dataset(str(tmp_path / name), spec, train=False), 1)[0]
        for key in expected:
            np.testing.assert_array_equal(got[key], expected[key], err_msg=name)


def test_bad_inputs_fail_with_one_clear_line(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="empty dataset"):
        build_dataset(str(empty), _spec())
    good = write_jsonl(tmp_path / "g.jsonl", documents(5))
    with pytest.raises(FileNotFoundError, match="tokenizer not found"):
        build_dataset(good, _spec(tokenizer=str(tmp_path / "nowhere")))
    with pytest.raises(FileNotFoundError, match="data file not found"):
        build_dataset(str(tmp_path / "missing*.jsonl"), _spec())
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unknown data file type"):
        build_dataset(str(tmp_path / "x.csv"), _spec())
    np.save(tmp_path / "big.npy", np.array([5, 600, 1], np.int32))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        build_dataset(str(tmp_path / "big.npy"), _spec())
    wrong_key = write_jsonl(tmp_path / "k.jsonl", documents(5), key="body")
    with pytest.raises(ValueError, match="no 'text' field"):
        take(build_dataset(wrong_key, _spec(), train=False), 1)
