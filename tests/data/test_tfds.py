"""Every vision and GLUE task through tfds.data_source under tfds' mock data (no network,
no TensorFlow)."""

import sys

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from llora_jax import data  # noqa: E402

N = 20


def test_tensorflow_is_not_installed():
    with pytest.raises(ImportError):
        import tensorflow  # noqa: F401


@pytest.fixture
def mock():
    with tfds.testing.mock_data(num_examples=N):
        yield


@pytest.mark.parametrize("name", data.VISION_TASKS)
def test_class_names_match_tfds_label_order(name):
    spec = data.get_task(name)
    if spec.tfds_name is None:  # gtsrb: 43 classes, ClassId order
        assert len(spec.label_names) == 43
        return
    tfds_names = tfds.builder(spec.tfds_name, try_gcs=False).info.features["label"].names
    assert len(spec.label_names) == len(tfds_names)
    if name in ("resisc45", "dtd", "mnist", "svhn", "cars"):
        norm = [n.replace("_", " ") for n in tfds_names]
        assert list(spec.label_names) == norm
    if name == "sun397":
        assert spec.label_names[0] == "abbey"
        assert "apartment building outdoor" in spec.label_names
    if name == "eurosat":
        assert tfds_names[0] == "AnnualCrop" and tfds_names[-1] == "SeaLake"
        assert spec.label_names[0] == "annual crop land" and spec.label_names[-1] == "lake or sea"


@pytest.mark.parametrize("name", data.VISION_TASKS)
def test_vision_task_loads_from_tfds_mock(name, mock):
    spec = data.get_task(name)
    if spec.tfds_name is None:
        with pytest.raises(data.DataNotFoundError, match="LLORA_DATA_DIR"):
            data.load_task(name, "train", source="tfds")
        return
    full = data.load_task(name, "train_full", source="tfds")
    train = data.load_task(name, "train", source="tfds")
    val = data.load_task(name, "validation", source="tfds")
    test = data.load_task(name, "test", source="tfds")
    carved = round(spec.test_carve * N)
    assert len(full) == N - carved
    assert len(test) == (carved if carved else N)
    assert len(val) == len(full) // 10
    assert len(train) + len(val) == len(full)
    # validation is carved from train: disjoint, together the whole training split
    assert not set(train.indices) & set(val.indices)
    assert sorted(set(train.indices) | set(val.indices)) == sorted(full.indices)
    if carved:  # test carved out of tfds train: disjoint from training rows
        assert not set(test.indices) & set(full.indices)
    for split in (train, test):
        ex = split.take(np.arange(min(4, len(split))))
        assert ex["label"].dtype == np.int64
        assert np.all((ex["label"] >= 0) & (ex["label"] < spec.num_classes))
        images = ex["image"] if isinstance(ex["image"], list) else list(ex["image"])
        for im in images:
            assert im.dtype == np.uint8 and im.ndim == 3 and im.shape[-1] in (1, 3)
    # a fixed-shape batch through the image transform
    batch = next(
        data.batches(
            train,
            4,
            seed=1,
            process_index=0,
            process_count=1,
            transform=data.image_transform(16),
        )
    )
    assert batch["image"].shape == (4, 16, 16, 3) and batch["image"].dtype == np.uint8
    assert batch["weight"].tolist() == [1.0] * 4
    assert "tensorflow" not in sys.modules


@pytest.mark.parametrize("name", list(data.task_names("text")))
def test_glue_task_loads_from_tfds_mock(name, mock):
    spec = data.get_task(name)
    train = data.load_task(name, "train", source="tfds", val_size=3)
    val = data.load_task(name, "validation", source="tfds", val_size=3)
    test = data.load_task(name, "test", source="tfds")
    assert (len(train), len(val), len(test)) == (N - 3, 3, N)
    assert test.origin.endswith(f"[{spec.tfds_splits['test']}]")
    ex = test.examples
    for f in spec.text_fields:
        assert ex[f].dtype == object and all(isinstance(s, str) for s in ex[f])
    if spec.is_regression:
        assert ex["label"].dtype == np.float32
        assert np.all((ex["label"] >= 0) & (ex["label"] <= 5))
    else:
        assert ex["label"].dtype == np.int64
        assert np.all((ex["label"] >= 0) & (ex["label"] < spec.num_classes))
    inputs, targets = data.t5_format(test, ex)
    assert len(inputs) == len(targets) == N
    assert all(s.startswith(f"{name} {spec.prompt_fields[0]}: ") for s in inputs)
    if not spec.is_regression:
        assert set(targets) <= set(spec.label_names)
    enc = data.encoder_format(test, ex)
    assert (enc["text_b"] is None) == (len(spec.text_fields) == 1)
    assert "tensorflow" not in sys.modules


def test_glue_label_words_follow_tfds_label_order():
    import tensorflow_datasets.text.glue  # noqa: F401

    for name in data.task_names("text"):
        spec = data.get_task(name)
        feat = tfds.builder(f"glue/{name}", try_gcs=False).info.features["label"]
        if spec.is_regression:
            assert not hasattr(feat, "names")
        else:
            assert tuple(feat.names) == spec.label_names


def test_auto_never_mixes_local_and_tfds_splits(tmp_path, mock):
    (tmp_path / "vision").mkdir()
    imgs = np.zeros((3, 28, 28), np.uint8)
    np.savez(tmp_path / "vision" / "mnist_test.npz", images=imgs, labels=np.arange(3))
    assert data.load_task("mnist", "test", data_dir=tmp_path).source == "local"
    with pytest.raises(data.DataNotFoundError, match="mnist_train.npz is missing while other"):
        data.load_task("mnist", "train_full", data_dir=tmp_path)
    tr = data.load_task("mnist", "train_full", data_dir=tmp_path, source="tfds")  # explicit
    assert tr.source == "tfds" and len(tr) == N


def test_unprepared_tfds_dataset_says_how_to_provide_it(tmp_path):
    with pytest.raises(data.DataNotFoundError, match="LLORA_DATA_DIR") as e:
        data.load_task("rte", "train", source="tfds", tfds_data_dir=str(tmp_path))
    assert "text/rte/train.jsonl" in str(e.value) and "tfds build glue/rte" in str(e.value)
