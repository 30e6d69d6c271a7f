"""The CLIP study's tiny mode end to end on variable-size images from each source: tfds
(mock data, DTD's images vary in size), an image folder of generated JPEG / PNG files of
20-500 px (RGB, grayscale, RGBA, CMYK) and a locally saved Hugging Face dataset."""

import json
from pathlib import Path

from llora_jax.data import vision
from llora_jax.study import runner as study
from tests.fixtures import tiny_models, variable_images

ROOT = Path(__file__).resolve().parents[2]


def _tiny_clip_study(tmp_path, tasks, words, overrides):
    path = tiny_models.tiny_clip(tmp_path / "clip", words)
    s = study.load_module(ROOT / "experiments/clip_vit_b16/study.py", "clip_vit_b16")
    s = s.get_study("tiny")
    s.tasks, s.pairs = list(tasks), [tuple(tasks)]
    s.overrides = (("backbone", str(path)), ("data.val_size", 4), *overrides)
    out = tmp_path / "out"
    res = json.loads(study.run_study(s, out).read_text())
    assert set(res["single"][s.methods[0]]) == set(tasks)
    assert res["fusion"][s.methods[0]] and res["disentanglement"][s.methods[0]]
    assert (out / "report.md").is_file()
    return out


def _metrics(out, task):
    (path,) = [p for p in out.rglob("metrics.json") if task in p.parts]
    return json.loads(path.read_text())


def _names(*tasks):
    return [n for t in tasks for n in vision.class_names(t)]


def test_clip_tiny_study_on_tfds_mock_data_of_varying_sizes(tmp_path):
    import tensorflow_datasets as tfds  # tfds: only this source's test needs it

    # dtd streams (its mock images vary in size); svhn (32 x 32) keeps the arrays path.
    with tfds.testing.mock_data(num_examples=12):
        out = _tiny_clip_study(
            tmp_path, ["dtd", "svhn"], _names("dtd", "svhn"), [("data.source", "tfds")]
        )
    assert _metrics(out, "dtd")["data/skipped_corrupt"] == 0  # only streamed runs count
    assert "data/skipped_corrupt" not in _metrics(out, "svhn")


def test_clip_tiny_study_on_image_folders_of_varying_sizes(tmp_path):
    data_dir = tmp_path / "data"
    for task in ("eurosat", "mnist"):
        variable_images.write_image_folder(
            data_dir / "vision" / task, vision.class_names(task), {"train": 1, "test": 1}
        )
    out = _tiny_clip_study(
        tmp_path,
        ["eurosat", "mnist"],
        _names("eurosat", "mnist"),
        [("data.data_dir", str(data_dir))],
    )
    metrics = _metrics(out, "eurosat")
    assert metrics["data/skipped_corrupt"] == 0 and metrics["test/skipped_corrupt"] == 0


def test_clip_tiny_study_on_a_saved_hugging_face_dataset(tmp_path):
    classes = [f"kind {c}" for c in "abcdefghij"]  # 10 classes: eurosat's and mnist's count
    hf_dir = variable_images.write_hf_dataset(tmp_path / "hf", classes, {"train": 1, "test": 1})
    out = _tiny_clip_study(
        tmp_path, ["eurosat", "mnist"], classes, [("data.source", f"hf:{hf_dir}")]
    )
    assert "data/skipped_corrupt" in _metrics(out, "mnist")
