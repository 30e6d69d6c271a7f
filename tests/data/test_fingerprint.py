"""Data provenance: per-split row hashes and the refusal to mix data."""

import hashlib
import json
import shutil

import numpy as np
import pytest

from llora_jax import data
from llora_jax.data import fingerprint
from llora_jax.errors import UserError


def _write_task(root, name="sst2", n_train=40, n_test=12, flip_test_row=None):
    d = root / "text" / name
    d.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        rows = [{"sentence": f"{split} sentence {i}", "label": i % 2, "idx": i} for i in range(n)]
        if split == "test" and flip_test_row is not None:
            rows[flip_test_row]["label"] = 1 - rows[flip_test_row]["label"]
        (d / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _splits(root, name="sst2", val_size=8):
    kw = dict(data_dir=root, source="local", val_size=val_size)
    return {s: data.load_task(name, s, **kw) for s in ("train", "validation", "test")}


def test_record_shape_and_independent_hash(tmp_path):
    rec = fingerprint.task_fingerprint(_splits(_write_task(tmp_path)))
    assert rec["task"] == "sst2" and rec["source"] == "local"
    assert set(rec["splits"]) == {"train", "validation", "test"}
    t = rec["splits"]["test"]
    assert t["rows"] == 12 and t["origin"].endswith("text/sst2/test.jsonl")
    # Independent reference: the same hash rule written out for the test split.
    td = data.load_task("sst2", "test", data_dir=tmp_path, source="local")
    rows = td.examples
    h = hashlib.sha256()
    for name in sorted(rows):
        col = hashlib.sha256()
        for v in rows[name]:
            if isinstance(v, str):
                col.update(len(v.encode()).to_bytes(8, "little") + v.encode())
            else:
                a = np.asarray(v)
                col.update(f"{a.dtype.str}{a.shape}".encode() + a.tobytes())
        h.update(f"{name}\0{col.hexdigest()}".encode())
    assert t["sha256"] == h.hexdigest()
    assert json.loads(json.dumps(rec)) == rec


def test_same_rows_at_another_path_are_the_same_data(tmp_path):
    a = _write_task(tmp_path / "a")
    shutil.copytree(a, tmp_path / "b")
    ra, rb = (
        fingerprint.task_fingerprint(_splits(a)),
        fingerprint.task_fingerprint(_splits(tmp_path / "b")),
    )
    assert ra["digest"] == rb["digest"]
    assert ra["splits"]["test"]["origin"] != rb["splits"]["test"]["origin"]
    fingerprint.check_same_data(ra, rb)


def test_one_changed_label_is_refused_naming_both(tmp_path):
    ra = fingerprint.task_fingerprint(_splits(_write_task(tmp_path / "a")))
    rb = fingerprint.task_fingerprint(_splits(_write_task(tmp_path / "b", flip_test_row=5)))
    assert ra["splits"]["train"] == {
        **rb["splits"]["train"],
        "origin": ra["splits"]["train"]["origin"],
    }
    with pytest.raises(fingerprint.DataMismatch) as exc:
        fingerprint.check_same_data(ra, rb, recorded_by="task vector sst2")
    msg = str(exc.value)
    assert "test:" in msg and str(tmp_path / "a") in msg and str(tmp_path / "b") in msg
    assert "train:" not in msg and "task vector sst2" in msg and "LLORA_DATA_DIR" in msg
    assert isinstance(exc.value, UserError)


def test_another_validation_carve_is_other_data(tmp_path):
    root = _write_task(tmp_path)
    ra = fingerprint.task_fingerprint(_splits(root, val_size=8))
    rb = fingerprint.task_fingerprint(_splits(root, val_size=4))
    with pytest.raises(fingerprint.DataMismatch, match="validation: .*8 rows.*4 rows"):
        fingerprint.check_same_data(ra, rb, splits=["validation", "test"])
    fingerprint.check_same_data(ra, rb, splits=["test"])


def test_missing_split_and_no_common_split(tmp_path):
    splits = _splits(_write_task(tmp_path))
    full = fingerprint.task_fingerprint(splits)
    only_test = fingerprint.task_fingerprint({"test": splits["test"]})
    with pytest.raises(fingerprint.DataMismatch, match="validation: not loaded now"):
        fingerprint.check_same_data(full, only_test, splits=["validation", "test"])
    only_train = fingerprint.task_fingerprint({"train": splits["train"]})
    with pytest.raises(fingerprint.DataMismatch, match="share no split"):
        fingerprint.check_same_data(only_train, only_test)


def test_string_boundaries_and_images(tmp_path):
    class Rows:  # a TaskData stand-in: len + take
        origin = "mem"

        def __init__(self, cols):
            self.cols = cols

        def __len__(self):
            return len(next(iter(self.cols.values())))

        def take(self, idx):
            return {
                k: (v[idx] if isinstance(v, np.ndarray) else [v[i] for i in idx])
                for k, v in self.cols.items()
            }

    ab_c = fingerprint.split_fingerprint(Rows({"s": np.array(["ab", "c"], object)}))
    a_bc = fingerprint.split_fingerprint(Rows({"s": np.array(["a", "bc"], object)}))
    assert ab_c["sha256"] != a_bc["sha256"]
    img = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    one = fingerprint.split_fingerprint(Rows({"image": img}), chunk=1)
    two = fingerprint.split_fingerprint(Rows({"image": img}), chunk=2)
    assert one == two  # chunking does not change the hash
    img2 = img.copy()
    img2[1, 3, 3, 2] ^= 1
    assert fingerprint.split_fingerprint(Rows({"image": img2}))["sha256"] != one["sha256"]
    ragged = [img[0], img[1, :2]]
    assert fingerprint.split_fingerprint(Rows({"image": ragged}))["rows"] == 2


def test_file_sha256(tmp_path):
    f = tmp_path / "x.bin"
    f.write_bytes(bytes(range(256)) * 100)
    assert (
        fingerprint.file_sha256(f, chunk_bytes=1000) == hashlib.sha256(f.read_bytes()).hexdigest()
    )


def test_image_folder_is_hashed_by_file_bytes_without_decoding(tmp_path, monkeypatch):
    """Image files are hashed by their bytes (no decoding): the same files at another path
    give the same fingerprint, one changed byte another."""
    import shutil

    from PIL import Image

    from llora_jax.data import images

    rng = np.random.default_rng(0)
    root = tmp_path / "a"
    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(2):
                pixels = rng.integers(0, 255, (8 + i, 9, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(d / f"{i}.png")
    shutil.copytree(root, tmp_path / "b")

    def no_decoding(*args, **kwargs):
        raise AssertionError("an image was decoded to fingerprint it")

    monkeypatch.setattr(images, "open_rgb", no_decoding)
    a = fingerprint.split_fingerprint(data.load_task("toyimgs", "test", source=f"folder:{root}"))
    b_task = data.load_task("toyimgs", "test", source=f"folder:{tmp_path / 'b'}")
    assert fingerprint.split_fingerprint(b_task)["sha256"] == a["sha256"]
    target = tmp_path / "b" / "test" / "dog" / "1.png"
    raw = bytearray(target.read_bytes())
    raw[-5] ^= 1
    target.write_bytes(bytes(raw))
    assert fingerprint.split_fingerprint(b_task)["sha256"] != a["sha256"]
