"""Variable-size image sources (image folders, Hugging Face datasets, tfds mock data)
through load_task and the streaming pipeline, and their bad-input errors."""

import pathlib
import shutil

import numpy as np
import pytest
from PIL import Image

from llora_jax import data
from llora_jax.data import images, streaming

datasets = pytest.importorskip("datasets")
pytest.importorskip("grain")

SIZE = 24
MODES = ("RGB", "L", "RGBA", "CMYK", "P")


def random_image(rng, mode: str) -> Image.Image:
    h, w = (int(v) for v in rng.integers(20, 501, 2))
    rgb = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    if mode == "RGBA":
        alpha = Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8))
        return Image.merge("RGBA", (*rgb.split(), alpha))
    return rgb if mode == "RGB" else rgb.convert(mode)


def save(img: Image.Image, path: pathlib.Path) -> pathlib.Path:
    # JPEG cannot hold alpha or palettes: those go to PNG
    path = path.with_suffix(".png" if img.mode in ("RGBA", "P") else ".jpg")
    img.save(path)
    return path


def make_folder(root: pathlib.Path, classes=("cat", "dog", "eel"), per_class=(4, 2)):
    rng = np.random.default_rng(0)
    files = {}
    for split, n in zip(("train", "test"), per_class):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                files[save(random_image(rng, MODES[i % len(MODES)]), root / split / c / f"{i}")] = c
    return files


def reference(path_or_img, size=SIZE) -> np.ndarray:
    """Independent path: PIL -> RGB numpy -> the array-based CLIP resize of vision.py."""
    img = path_or_img if isinstance(path_or_img, Image.Image) else Image.open(path_or_img)
    return data.resize_center_crop(np.asarray(img.convert("RGB")), size)


def one_epoch(task, **kw):
    it = streaming.make_batch_iterator(
        task, 4, shuffle=False, num_epochs=1, drop_remainder=False, image_size=SIZE,
        shard_index=0, shard_count=1, **kw,
    )  # fmt: skip
    return it, list(it)


def test_image_folder_streams_variable_sizes_and_modes(tmp_path):
    files = make_folder(tmp_path / "pets")
    task = data.load_task("pets", "test", source=f"folder:{tmp_path / 'pets'}")
    assert task.label_names == ("cat", "dog", "eel") and task.source == "folder"
    paths = task.rows.paths
    assert {Image.open(p).mode for p in paths} >= {"RGB", "L"}
    it, batches = one_epoch(task)
    got = np.concatenate([b["image"] for b in batches])
    weight = np.concatenate([b["weight"] for b in batches])
    assert got.shape == (8, SIZE, SIZE, 3) and got.dtype == np.uint8
    assert weight.tolist() == [1.0] * 6 + [0.0] * 2  # 6 images, last batch padded
    for k, p in enumerate(paths):
        np.testing.assert_array_equal(got[k], reference(p))
        assert (
            task.label_names[np.concatenate([b["label"] for b in batches])[k]]
            == files[pathlib.Path(p)]
        )
    assert it.skipped == 0


def test_all_pil_modes_become_rgb(tmp_path):
    rng = np.random.default_rng(1)
    for mode in (*MODES, "LA", "I;16"):
        img = random_image(rng, "RGB").convert("L" if mode == "I;16" else mode)
        if mode == "I;16":
            img = Image.fromarray(np.asarray(img).astype(np.uint16) * 256)
        out = images.decode_resize(img, SIZE, "clip", "test")
        assert out.shape == (SIZE, SIZE, 3) and out.dtype == np.uint8, mode
    plain = images.decode_resize(random_image(rng, "RGB"), SIZE, "plain", "test")
    assert plain.shape == (SIZE, SIZE, 3)


def test_local_data_dir_image_folder_is_found(tmp_path):
    make_folder(tmp_path / "vision" / "pets")
    t = data.load_task("pets", "train_full", data_dir=tmp_path)
    assert t.source == "local" and len(t) == 12 and np.bincount(t.labels).tolist() == [4, 4, 4]


def test_image_folder_info_json_orders_the_classes(tmp_path):
    root = tmp_path / "pets"
    make_folder(root)
    (root / "info.json").write_text('{"label_names": ["eel", "dog", "cat"]}')
    t = data.load_task("pets", "train_full", source=f"folder:{root}")
    assert t.label_names == ("eel", "dog", "cat")
    assert [t.label_names[k] for k in t.labels[[0, 4, 8]]] == ["cat", "dog", "eel"]


def test_image_folder_errors(tmp_path):
    root = tmp_path / "pets"
    make_folder(root)
    with pytest.raises(data.DataNotFoundError, match=r"nope: the image folder does not exist"):
        data.load_task("pets", "train", source=f"folder:{tmp_path / 'nope'}")
    make_folder(tmp_path / "train_only", per_class=(1, 1))
    shutil.rmtree(tmp_path / "train_only" / "test")
    with pytest.raises(data.DataNotFoundError, match=r"split 'test' does not exist \(the folder"):
        data.load_task("pets", "test", source=f"folder:{tmp_path / 'train_only'}")
    (root / "test" / "cat").rename(root / "test" / "kitten")
    with pytest.raises(data.DataError, match=r"class folder 'kitten' is not in the class list"):
        data.load_task("pets", "test", source=f"folder:{root}")
    (root / "test" / "kitten").rename(root / "test" / "cat")
    (root / "test" / "fox").mkdir()
    with pytest.raises(data.DataError, match=r"test/fox: class folder 'fox' is not in"):
        data.load_task("pets", "test", source=f"folder:{root}")
    (root / "train" / "fox").mkdir()
    with pytest.raises(data.DataError, match=r"train/fox: empty class folder") as e:
        data.load_task("pets", "train", source=f"folder:{root}")
    assert "remove the folder" in str(e.value)


def test_corrupt_and_truncated_images_are_named_or_skipped(tmp_path):
    root = tmp_path / "pets"
    make_folder(root)
    good = sorted((root / "test" / "dog").iterdir())
    truncated = good[0].read_bytes()
    good[0].write_bytes(truncated[: len(truncated) // 2])
    (root / "test" / "dog" / "junk.jpg").write_bytes(b"not an image at all")
    task = data.load_task("pets", "test", source=f"folder:{root}")
    with pytest.raises(data.DataError, match=r"0\.jpg: cannot decode the image.*skip_corrupt=True"):
        one_epoch(task)
    it, batches = one_epoch(task, skip_corrupt=True)
    assert it.skipped == 2
    corrupt = np.concatenate([b["corrupt"] for b in batches])
    weight = np.concatenate([b["weight"] for b in batches])
    assert corrupt.sum() == 2 and weight.sum() == len(task) - 2
    assert it.get_state()["skipped"] == 2


def hf_image_dataset(rng, n: int, names=("ant", "bee", "cow")):
    imgs = [random_image(rng, MODES[i % len(MODES)]) for i in range(n)]
    feats = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=list(names))}
    )
    labels = [i % len(names) for i in range(n)]
    return datasets.Dataset.from_dict({"image": imgs, "label": labels}, features=feats), imgs


def test_hf_save_to_disk_with_image_column(tmp_path):
    rng = np.random.default_rng(2)
    train, _ = hf_image_dataset(rng, 9)
    test, imgs = hf_image_dataset(rng, 5)
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(tmp_path / "bugs"))
    t = data.load_task("bugs", "test", source=f"hf:{tmp_path / 'bugs'}")
    assert t.label_names == ("ant", "bee", "cow") and t.labels.tolist() == [0, 1, 2, 0, 1]
    _, batches = one_epoch(t)
    got = np.concatenate([b["image"] for b in batches])[: len(t)]
    for k, img in enumerate(imgs):
        # the dataset stores each image encoded (PNG for these modes): decode it the same way
        np.testing.assert_array_equal(got[k], reference(test[k]["image"]))
        assert img.size == test[k]["image"].size
    with pytest.raises(data.DataNotFoundError, match=r"split 'train' does not exist"):
        datasets.DatasetDict({"test": test}).save_to_disk(str(tmp_path / "only_test"))
        data.load_task("bugs", "train", source=f"hf:{tmp_path / 'only_test'}")


def test_hf_rows_decode_in_a_worker_process(tmp_path):
    # the dataset handle must pickle into grain's spawned worker and decode there
    ds, _ = hf_image_dataset(np.random.default_rng(4), 5)
    ds.save_to_disk(str(tmp_path / "one"))
    t = data.load_task("bugs", "test", source=f"hf:{tmp_path / 'one'}")
    in_process = np.concatenate([b["image"] for b in one_epoch(t)[1]])
    in_worker = np.concatenate([b["image"] for b in one_epoch(t, worker_count=1)[1]])
    np.testing.assert_array_equal(in_worker, in_process)


def test_hf_parquet_directory_and_missing_column(tmp_path):
    rng = np.random.default_rng(3)
    ds, _ = hf_image_dataset(rng, 4)
    (tmp_path / "pq").mkdir()
    ds.to_parquet(str(tmp_path / "pq" / "test-00000-of-00001.parquet"))
    t = data.load_task("bugs", "test", source=f"hf:{tmp_path / 'pq'}")
    assert len(t) == 4 and t.label_names == ("ant", "bee", "cow")
    ds.rename_column("label", "fine_label").save_to_disk(str(tmp_path / "renamed"))
    with pytest.raises(data.DataError, match=r"no column 'label' \(columns: \['fine_label'"):
        data.load_task("bugs", "test", source=f"hf:{tmp_path / 'renamed'}")


def test_hf_text_task_maps_to_registered_layout(tmp_path):
    feats = datasets.Features(
        {
            "sentence": datasets.Value("string"),
            "label": datasets.ClassLabel(names=["negative", "positive"]),
            "idx": datasets.Value("int32"),
        }
    )
    rows = {"sentence": ["good", "bad", "fine"], "label": [1, 0, 1], "idx": [0, 1, 2]}
    datasets.Dataset.from_dict(rows, features=feats).save_to_disk(str(tmp_path / "s"))
    t = data.load_task("sst2", "test", source=f"hf:{tmp_path / 's'}")
    assert data.t5_format(t, t.examples) == (
        ["sst2 sentence: good", "sst2 sentence: bad", "sst2 sentence: fine"],
        ["positive", "negative", "positive"],
    )
    swapped = datasets.Features({**feats, "label": datasets.ClassLabel(names=["pos", "neg"])})
    datasets.Dataset.from_dict(rows, features=swapped).save_to_disk(str(tmp_path / "w"))
    with pytest.raises(data.DataError, match=r"ClassLabel names \['pos', 'neg'\] differ"):
        data.load_task("sst2", "test", source=f"hf:{tmp_path / 'w'}")


def test_hub_table_covers_the_papers_tasks():
    from llora_jax.data import hf

    assert set(data.VISION_TASKS) | set(data.GLUE_TASKS) <= set(hf.HUB)
    assert hf.HUB["mnli"].splits["test"] == "validation_matched"
    with pytest.raises(data.DataError, match="no Hugging Face hub id is known for task 'pets'"):
        data.load_task("pets", "test", source="hf")


def test_tfds_mock_variable_size_images_stream():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=6):
        t = data.load_task("dtd", "test", source="tfds")
        raw = t.take(np.arange(len(t)))["image"]
        assert len({np.asarray(x).shape for x in raw}) > 1  # variable sizes
        _, batches = one_epoch(t)
    got = np.concatenate([b["image"] for b in batches])[: len(t)]
    for k, img in enumerate(raw):
        np.testing.assert_array_equal(got[k], reference(Image.fromarray(np.asarray(img))))
