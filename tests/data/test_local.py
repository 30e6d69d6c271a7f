"""Local JSONL / npz data: the shared real data (LLORA_DATA_DIR) and malformed files."""

import json
import os
import pathlib

import numpy as np
import pytest

from llora_jax import data

DATA_DIR = os.environ.get("LLORA_DATA_DIR")
realdata = pytest.mark.skipif(
    not DATA_DIR, reason="LLORA_DATA_DIR is unset (point it at the shared offline data)"
)

# Row counts and label counts from the data README.
COUNTS = {
    "cola": (8551, 516),
    "sst2": (6920, 1821),
    "mrpc": (4076, 1725),
    "rte": (1383, 1384),
    "stsb": (5749, 1500),
    "qqp": (18796, 4700),
}
TRAIN_LABEL_COUNTS = {
    "cola": [2528, 6023],
    "sst2": [3310, 3610],
    "mrpc": [1323, 2753],
    "rte": [697, 686],
    "qqp": [11801, 6995],
}
# (row of train.jsonl, exact T5 input, exact T5 target)
FIRST_ROWS = {
    "cola": (
        0,
        "cola sentence: our friends wo n't buy this analysis , let alone the next one we propose",
        "acceptable",
    ),
    "sst2": (
        1,
        "sst2 sentence: apparently reassembled from the cutting room floor of any given daytime soap",
        "negative",
    ),
    "mrpc": (
        0,
        'mrpc sentence1: Amrozi accused his brother, whom he called "the witness", of '
        'deliberately distorting his evidence. sentence2: Referring to him as only "the witness", '
        "Amrozi accused his brother of deliberately distorting his evidence.",
        "equivalent",
    ),
    "rte": (
        0,
        "rte sentence1: A place of sorrow, after Pope John Paul II died, became a place of "
        "celebration, as Roman Catholic faithful gathered in downtown Chicago to mark the "
        "installation of new Pope Benedict XVI. sentence2: Pope Benedict XVI is the new leader of "
        "the Roman Catholic Church.",
        "entailment",
    ),
    "stsb": (
        1,
        "stsb sentence1: A man is playing a large flute. sentence2: A man is playing a flute.",
        "3.8",
    ),
    "qqp": (
        2,
        "qqp question1: Which is the best book to study TENSOR for general relativity from basic? "
        "question2: Which is the best book for tensor calculus?",
        "duplicate",
    ),
}


@realdata
@pytest.mark.realdata
@pytest.mark.parametrize("name", list(COUNTS))
def test_real_text_counts_format_and_validation_carve(name):
    n_train, n_test = COUNTS[name]
    full = data.load_task(name, "train_full")
    test = data.load_task(name, "test")
    assert full.source == "local" and (len(full), len(test)) == (n_train, n_test)
    if name in TRAIN_LABEL_COUNTS:
        assert np.bincount(full.labels).tolist() == TRAIN_LABEL_COUNTS[name]
    else:
        assert abs(float(full.labels.mean()) - 2.701) < 1e-3
    row, want_in, want_out = FIRST_ROWS[name]
    inputs, targets = data.t5_format(full, full.take([row]))
    assert (inputs[0], targets[0]) == (want_in, want_out)
    # validation: deterministic, disjoint from train, together the whole train file
    val = data.load_task(name, "validation", seed=3)
    train = data.load_task(name, "train", seed=3)
    assert len(val) == min(n_train // 10, 1000)
    assert not set(val.indices) & set(train.indices)
    assert len(val) + len(train) == n_train
    np.testing.assert_array_equal(val.indices, data.load_task(name, "validation", seed=3).indices)
    assert not np.array_equal(val.indices, data.load_task(name, "validation", seed=4).indices)
    assert len(data.load_task(name, "validation", val_size=50)) == 50


@realdata
@pytest.mark.realdata
def test_real_vision_counts():
    g_train = data.load_task("gtsrb", "train_full")
    g_test = data.load_task("gtsrb", "test")
    assert (len(g_train), len(g_test)) == (8600, 3000)
    assert g_train.num_classes == 43
    assert np.bincount(g_train.labels).tolist() == [200] * 43
    assert np.bincount(g_test.labels)[:3].tolist() == [14, 167, 168]
    ex = g_test.take([0, 1])
    assert ex["image"].shape == (2, 32, 32, 3) and ex["image"].dtype == np.uint8
    m = data.load_task("mnist", "test")
    assert len(m) == 10000 and m.take([0])["image"].shape == (1, 28, 28, 1)
    assert np.bincount(m.labels)[:2].tolist() == [980, 1135]
    val = data.load_task("gtsrb", "validation")
    train = data.load_task("gtsrb", "train")
    assert len(val) == 860 and not set(val.indices) & set(train.indices)


# ---------------------------------------------------------------------------------------
# synthetic directories


def write_jsonl(root: pathlib.Path, task: str, split: str, rows) -> pathlib.Path:
    d = root / "text" / task
    d.mkdir(parents=True, exist_ok=True)
    p = d / f"{split}.jsonl"
    p.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return p


def good_rte(i):
    return {"idx": i, "sentence1": f"a{i}", "sentence2": f"b{i}", "label": i % 2}


@pytest.mark.parametrize(
    "bad_row, pattern",
    [
        ('{"idx": 2, "sentence1": "x", ', "malformed JSON"),
        ({"idx": 2, "sentence1": "x", "label": 0}, "missing field 'sentence2'"),
        ({"idx": 2, "sentence1": "x", "sentence2": "y", "label": 2}, r"label 2 outside 0\.\.1"),
        (
            {"idx": 2, "sentence1": "x", "sentence2": "y", "label": "0"},
            "label '0' is a string; write the number without quotes",
        ),
        ({"idx": 2, "sentence1": "x", "sentence2": 3, "label": 0}, "must be a string"),
    ],
)
def test_malformed_row_names_file_and_line(tmp_path, bad_row, pattern):
    p = write_jsonl(tmp_path, "rte", "train", [good_rte(0), good_rte(1), bad_row, good_rte(3)])
    with pytest.raises(data.DataError, match=pattern) as e:
        data.load_task("rte", "train", data_dir=tmp_path)
    assert f"{p}:3:" in str(e.value)


def test_stsb_score_out_of_range_names_line(tmp_path):
    rows = [
        {"sentence1": "a", "sentence2": "b", "label": 5.0},
        {"sentence1": "a", "sentence2": "b", "label": 5.5},
    ]
    p = write_jsonl(tmp_path, "stsb", "test", rows)
    with pytest.raises(data.DataError, match=rf"{p}:2: label 5.5 is not a score in \[0.0, 5.0\]"):
        data.load_task("stsb", "test", data_dir=tmp_path)


def test_npz_label_out_of_range_and_missing_key(tmp_path):
    (tmp_path / "vision").mkdir()
    images = np.zeros((4, 8, 8, 3), np.uint8)
    np.savez(tmp_path / "vision" / "mnist_test.npz", images=images, labels=np.array([0, 1, 10, 2]))
    with pytest.raises(data.DataError, match=r"mnist_test.npz: labels\[2\] = 10 outside 0\.\.9"):
        data.load_task("mnist", "test", data_dir=tmp_path)
    np.savez(tmp_path / "vision" / "eurosat.npz", train_images=images, test_images=images)
    with pytest.raises(data.DataError, match="eurosat.npz: missing key 'train_labels'"):
        data.load_task("eurosat", "train", data_dir=tmp_path)


def test_missing_local_dataset_mentions_env_var(tmp_path, monkeypatch):
    monkeypatch.setenv("LLORA_DATA_DIR", str(tmp_path))
    with pytest.raises(data.DataNotFoundError, match="LLORA_DATA_DIR") as e:
        data.load_task("cola", "train", source="local")
    assert "text/cola/train.jsonl" in str(e.value)
    with pytest.raises(data.DataNotFoundError, match="LLORA_DATA_DIR"):
        data.load_task("gtsrb", "test")  # not in tfds either
    with pytest.raises(data.DataNotFoundError, match="LLORA_DATA_DIR"):
        data.load_task("my_task", "test")


def test_env_var_selects_directory(tmp_path, monkeypatch):
    write_jsonl(tmp_path, "rte", "test", [good_rte(i) for i in range(5)])
    monkeypatch.setenv("LLORA_DATA_DIR", str(tmp_path))
    t = data.load_task("rte", "test")
    assert t.source == "local" and len(t) == 5 and t.origin.startswith(str(tmp_path))


def test_unknown_tasks_infer_kind_from_fields(tmp_path):
    rows = [{"premise": f"p{i}", "hypothesis": f"h{i}", "label": i % 3} for i in range(6)]
    write_jsonl(tmp_path, "mytask", "train", rows)
    write_jsonl(tmp_path, "mytask", "test", rows[:2])
    t = data.load_task("mytask", "test", data_dir=tmp_path)
    assert not t.spec.known and t.label_names == ("label_0", "label_1", "label_2")
    inputs, targets = data.t5_format(t, t.examples)
    assert inputs == ["mytask hypothesis: h0 premise: p0", "mytask hypothesis: h1 premise: p1"]
    assert targets == ["label_0", "label_1"]
    enc = data.encoder_format(t, t.examples)
    assert enc["text_a"] == ["p0", "p1"] and enc["text_b"] == ["h0", "h1"]
    named = data.load_task("mytask", "test", data_dir=tmp_path, label_names=["yes", "maybe", "no"])
    assert data.t5_format(named, named.examples)[1] == ["yes", "maybe"]
    # label words of a registered task are used when its name is known
    write_jsonl(tmp_path, "sst2", "test", [{"sentence": "good", "label": 1}])
    s = data.load_task("sst2", "test", data_dir=tmp_path)
    assert data.t5_format(s, s.examples) == (["sst2 sentence: good"], ["positive"])
    # float labels -> regression; generic sentence-pair prompt
    reg = [
        {"sentence1": "a", "sentence2": "b", "label": 1.7},
        {"sentence1": "c", "sentence2": "d", "label": 2.0},
    ]
    write_jsonl(tmp_path, "simil", "test", reg)
    r = data.load_task("simil", "test", data_dir=tmp_path)
    assert r.is_regression and r.metrics[0] == "pearson"
    assert data.t5_format(r, r.examples) == (
        ["simil sentence1: a sentence2: b", "simil sentence1: c sentence2: d"],
        ["1.6", "2.0"],  # float32 1.7 * 5 = 8.5 rounds to even, as T5 (tf.round) does
    )
    # an unknown layout is refused, naming the file and the known layouts
    write_jsonl(tmp_path, "weird", "test", [{"text": "x", "label": 0}])
    with pytest.raises(data.DataError, match=r"weird/test.jsonl:1: no known field layout"):
        data.load_task("weird", "test", data_dir=tmp_path)
