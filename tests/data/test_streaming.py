"""The grain pipeline: exact resume, seeded order, shards, text arrays, padding."""

import json

import numpy as np
import pytest
from PIL import Image

from llora_jax import data
from llora_jax.data import streaming

pytest.importorskip("grain")

N = 37


def arrays(n: int = N) -> dict[str, np.ndarray]:
    """A text-like dataset: token ids derived from the row id, so rows can be identified."""
    rows = np.arange(n)
    return {"row": rows, "input_ids": (rows[:, None] * 10 + np.arange(5)).astype(np.int32)}


def make(source, batch=4, **kw):
    kw = {"seed": 3, "shard_index": 0, "shard_count": 1, **kw}
    return streaming.make_batch_iterator(source, batch, **kw)


def take(it, k):
    return [next(it) for _ in range(k)]


@pytest.mark.parametrize("workers", [0, 1])
def test_resume_yields_exactly_the_uninterrupted_batches(workers):
    first = make(arrays(), worker_count=workers)
    take(first, 6)
    state = json.loads(json.dumps(first.get_state()))  # as saved beside a checkpoint
    uninterrupted = take(first, 9)  # crosses epoch 1 -> 2
    del first
    resumed = make(arrays(), worker_count=workers)
    resumed.set_state(state)
    tail = take(resumed, 9)
    for a, b in zip(tail, uninterrupted, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])


def test_seeded_order_is_a_permutation_per_epoch():
    batches = take(make(arrays(), batch=1, num_epochs=2), 2 * N)
    rows = np.concatenate([b["row"] for b in batches])
    assert sorted(rows[:N]) == list(range(N)) and sorted(rows[N:]) == list(range(N))
    assert not np.array_equal(rows[:N], np.arange(N))  # shuffled
    again = np.concatenate([b["row"] for b in take(make(arrays(), batch=1, num_epochs=2), N)])
    np.testing.assert_array_equal(again, rows[:N])
    other = np.concatenate([b["row"] for b in take(make(arrays(), batch=1, seed=4), N)])
    assert not np.array_equal(other, rows[:N])
    batch = batches[0]
    np.testing.assert_array_equal(batch["input_ids"], arrays()["input_ids"][batch["row"]])


def test_shards_are_disjoint_and_cover_the_data():
    seen = []
    for i in range(3):
        it = make(arrays(), batch=3, shard_index=i, shard_count=3, num_epochs=1)
        shard = np.concatenate([b["row"] for b in it])
        seen.append(set(shard.tolist()))
    assert all(not (a & b) for a in seen for b in seen if a is not b)
    assert set().union(*seen) == set(range(N - N % 3))  # equal shards (drop_remainder)


def test_eval_order_padding_and_weights():
    it = make(arrays(), batch=8, shuffle=False, num_epochs=1, drop_remainder=False)
    batches = list(it)
    assert [len(b["row"]) for b in batches] == [8] * 5
    rows = np.concatenate([b["row"] for b in batches])
    weight = np.concatenate([b["weight"] for b in batches])
    np.testing.assert_array_equal(rows[:N], np.arange(N))
    assert weight.tolist() == [1.0] * N + [0.0] * (40 - N)


def test_state_from_other_settings_is_refused():
    it = make(arrays())
    next(it)
    state = it.get_state()
    other = make(arrays(), seed=4)
    with pytest.raises(ValueError, match=r"other pipeline settings.*'seed': \(3, 4\)"):
        other.set_state(state)


def test_bad_arguments():
    with pytest.raises(ValueError, match="not a multiple of 2 processes"):
        streaming.make_batch_iterator(arrays(), 3, shard_index=0, shard_count=2)
    with pytest.raises(ValueError, match="resize 'bilinear'"):
        make(arrays(), resize="bilinear")


def test_data_bench_streams_generated_jpegs(tmp_path):
    from benchmarks import data_bench

    data_bench.generate(tmp_path, 24, classes=3)
    sizes = {Image.open(p).size for p in (tmp_path / "train").glob("*/*.jpg")}
    assert len(sizes) > 1 and all(200 <= w <= 600 and 150 <= h <= 450 for w, h in sizes)
    r = data_bench.stream_one(tmp_path, 20, workers=0, batch=4)
    assert r["images"] == 20 and r["peak_rss"] >= r["base_rss"] > 0
    d = data_bench.decode_rate(tmp_path, 5)
    assert d["n"] == 5 and d["cpu_s"] > 0


def test_raw_text_rows_stream_as_object_arrays(tmp_path):
    d = tmp_path / "text" / "rte"
    d.mkdir(parents=True)
    rows = [{"sentence1": f"a {i}", "sentence2": f"b {i}", "label": i % 2} for i in range(6)]
    (d / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    t = data.load_task("rte", "test", data_dir=tmp_path)
    batches = list(make(t, batch=4, shuffle=False, num_epochs=1, drop_remainder=False))
    first = np.concatenate([b["sentence1"] for b in batches])
    assert first.dtype == object and first[:6].tolist() == [f"a {i}" for i in range(6)]
    assert np.concatenate([b["label"] for b in batches])[:6].tolist() == [0, 1, 0, 1, 0, 1]
