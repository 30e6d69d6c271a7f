"""Local text tasks that cannot be misread: info.json, and each defect named by file and line."""

import json
import os
import pathlib

import numpy as np
import pytest

from llora_jax import data
from llora_jax.tasks import t5_text, text_encoder

DATA_DIR = os.environ.get("LLORA_DATA_DIR")
realdata = pytest.mark.skipif(
    not DATA_DIR, reason="LLORA_DATA_DIR is unset (point it at the shared offline data)"
)


def write_lines(root: pathlib.Path, task: str, split: str, rows) -> pathlib.Path:
    d = root / "text" / task
    d.mkdir(parents=True, exist_ok=True)
    p = d / f"{split}.jsonl"
    p.write_bytes(
        b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows)
    )
    return p


def write_info(root: pathlib.Path, task: str, info: dict) -> pathlib.Path:
    d = root / "text" / task
    d.mkdir(parents=True, exist_ok=True)
    (d / "info.json").write_text(json.dumps(info))
    return d / "info.json"


def row(label, text="some text"):
    return {"sentence": text, "label": label}


def both_splits(root, task, train_rows, test_rows=None):
    p = write_lines(root, task, "train", train_rows)
    write_lines(root, task, "test", test_rows or [row(0), row(1)])
    return p


# ---------------------------------------------------------------------------------------
# info.json names the classes for every head


def test_info_json_names_classes_for_every_head(tmp_path):
    words = ["world", "sports", "science and technology"]
    descriptions = ["a story about world news", "a story about sport", "a story about science"]
    write_info(
        tmp_path, "news", {"label_names": words, "descriptions": descriptions, "metric": "matthews"}
    )
    # class 2 is absent from train: allowed, since info.json lists the classes
    both_splits(tmp_path, "news", [row(0), row(1), row(0)], [row(2), row(1)])
    t = data.load_task("news", "test", data_dir=tmp_path)
    assert t.label_names == tuple(words) and t.num_classes == 3
    assert t.spec.primary_metric == "matthews" and t.metrics == ("matthews", "accuracy")
    assert data.t5_format(t, t.examples)[1] == ["science and technology", "sports"]
    assert t5_text.label_words(t.spec) == tuple(words)
    assert text_encoder.label_descriptions(t.spec) == tuple(descriptions)
    # without descriptions, the encoder head embeds the label names themselves
    write_info(tmp_path, "news", {"label_names": words})
    t = data.load_task("news", "test", data_dir=tmp_path)
    assert text_encoder.label_descriptions(t.spec) == tuple(words)


def test_info_json_label_outside_label_names(tmp_path):
    write_info(tmp_path, "news", {"label_names": ["a", "b"]})
    p = both_splits(tmp_path, "news", [row(0), row(1), row(2)])
    with pytest.raises(data.DataError, match=rf"{p}:3: label 2 outside 0\.\.1 .*'a', 'b'"):
        data.load_task("news", "train", data_dir=tmp_path)


def test_info_json_fields_give_the_layout(tmp_path):
    write_info(tmp_path, "pairs", {"label_names": ["no", "yes"], "fields": ["claim", "evidence"]})
    rows = [{"claim": f"c{i}", "evidence": f"e{i}", "label": i % 2} for i in range(4)]
    both_splits(tmp_path, "pairs", rows, rows[:2])
    t = data.load_task("pairs", "test", data_dir=tmp_path)
    assert data.encoder_format(t, t.examples)["text_b"] == ["e0", "e1"]


@pytest.mark.parametrize(
    "info, pattern",
    [
        ({"label_names": "ab"}, "'label_names' must be a non-empty list"),
        ({"label_names": ["a", "a"]}, "duplicates"),
        ({"label_names": ["a", "b"], "descriptions": ["x"]}, "1 entries for 2 label_names"),
        ({"label_names": ["a", "b"], "metric": "bleu"}, "metric 'bleu' is not one of"),
        ({"label_names": ["a", "b", "c"], "metric": "f1"}, "exactly 2 label_names"),
    ],
)
def test_bad_info_json_is_named(tmp_path, info, pattern):
    p = write_info(tmp_path, "news", info)
    both_splits(tmp_path, "news", [row(0), row(1)])
    with pytest.raises(data.DataError, match=pattern) as e:
        data.load_task("news", "train", data_dir=tmp_path)
    assert str(p) in str(e.value)


def test_registered_task_info_must_agree(tmp_path):
    write_info(tmp_path, "sst2", {"label_names": ["positive", "negative"]})
    write_lines(tmp_path, "sst2", "test", [row(1)])
    with pytest.raises(data.DataError, match="differ from registered task 'sst2'"):
        data.load_task("sst2", "test", data_dir=tmp_path)


# ---------------------------------------------------------------------------------------
# defects without info.json: each names file and line


@pytest.mark.parametrize(
    "train_rows, line, pattern",
    [
        # one mistyped label (11 in a binary task) must not make a 12-class task
        ([row(0), row(1), row(11), row(0)], 3, r"label 11: the label ids \[0, 1, 11\] are not"),
        (
            [row(1), row(2), row(1)],
            2,
            r"label 2: .* \(missing \[0\]\)",
        ),  # labels 1..2: class 0 never occurs
        ([row(0), row(-1), row(1)], 2, "label -1"),
        ([row(0), row(1), row(1.0)], 3, "mixed label types: line 1 has integer 0, line 3 has"),
        ([row(0), row("1")], 2, "label '1' is a string; write the number without quotes"),
        ([row(0), row(True)], 2, "label True is not a finite number"),
        ([row(0), row(1, "   ")], 2, "field 'sentence' is empty"),
        ([row(0), b'{"sentence": "caf\xe9", "label": 1}'], 2, "byte 0xe9 at column 18 is not"),
        ([row(0), b'{"sentence": "x", "label": 1'], 2, "malformed JSON"),
    ],
)
def test_defect_names_file_and_line(tmp_path, train_rows, line, pattern):
    p = both_splits(tmp_path, "mine", train_rows)
    with pytest.raises(data.DataError, match=pattern) as e:
        data.load_task("mine", "train", data_dir=tmp_path)
    assert f"{p}:{line}: " in str(e.value)


def test_float_label_in_classification_task_names_line(tmp_path):
    p = write_lines(tmp_path, "rte", "test", [{"sentence1": "a", "sentence2": "b", "label": 1.0}])
    with pytest.raises(data.DataError, match=rf"{p}:1: label 1.0 is a float"):
        data.load_task("rte", "test", data_dir=tmp_path)


def test_empty_file_is_named(tmp_path):
    p = write_lines(tmp_path, "mine", "train", [])
    with pytest.raises(data.DataError, match=rf"{p}: the file is empty"):
        data.load_task("mine", "train", data_dir=tmp_path)
    (tmp_path / "text" / "mine" / "train.jsonl").write_text("\n  \n")
    with pytest.raises(data.DataError, match="the file is empty"):
        data.load_task("mine", "train", data_dir=tmp_path)


def test_all_float_labels_are_regression(tmp_path):
    both_splits(tmp_path, "score", [row(0.5), row(3.0)], [row(1.0)])
    t = data.load_task("score", "test", data_dir=tmp_path)
    assert t.is_regression and t.labels.dtype == np.float32


def test_missing_split_file_is_an_error_not_a_tfds_fallback(tmp_path):
    # sst2 is a tfds task too; with its train file here, a missing test file must not
    # silently come from tfds
    write_lines(tmp_path, "sst2", "train", [row(0), row(1)])
    with pytest.raises(
        data.DataNotFoundError, match="text/sst2/test.jsonl is missing while other splits are there"
    ):
        data.load_task("sst2", "test", data_dir=tmp_path)
    write_lines(tmp_path, "mine", "train", [row(0), row(1)])
    with pytest.raises(data.DataNotFoundError, match="text/mine/test.jsonl"):
        data.load_task("mine", "test", data_dir=tmp_path)


def test_missing_data_directory_is_reported_as_missing(tmp_path, monkeypatch):
    gone = tmp_path / "nope"
    monkeypatch.setenv("LLORA_DATA_DIR", str(gone))
    with pytest.raises(data.DataNotFoundError, match=r"nope' \(from \$LLORA_DATA_DIR\) does not"):
        data.load_task("cola", "train")
    with pytest.raises(data.DataNotFoundError, match=r"\(from data_dir\) does not exist"):
        data.load_task("cola", "train", data_dir=gone)


# ---------------------------------------------------------------------------------------
# the shared real data: all 20 tasks


@realdata
@pytest.mark.realdata
def test_all_real_text_tasks_load_with_their_names():
    root = pathlib.Path(DATA_DIR) / "text"
    tasks = sorted(p.name for p in root.iterdir() if (p / "train.jsonl").is_file())
    assert len(tasks) == 20
    for name in tasks:
        info_path = root / name / "info.json"
        info = json.loads(info_path.read_text()) if info_path.is_file() else None
        for split, counted in (("train_full", "train"), ("test", "test")):
            t = data.load_task(name, split)
            assert t.source == "local" and len(t) > 0
            if info is not None:
                assert t.label_names == tuple(info["label_names"]), name
                counts = np.bincount(t.labels, minlength=t.num_classes).tolist()
                want = info["counts"][counted]["labels"]
                assert counts == [want.get(n, 0) for n in info["label_names"]], (name, split)
                assert info["counts"][counted]["rows"] == len(t)
