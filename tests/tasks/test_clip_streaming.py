"""The CLIP zero-shot task on variable-size images: streamed training batches, evaluation
arrays decoded once, fixed-size data unchanged, exact resume of a streamed run."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from llora_jax import data, experiment, task_vectors
from llora_jax.adapters import LoraConfig
from llora_jax.data import sources
from llora_jax.study.finetune import load_config
from llora_jax.tasks import DEFAULT_LORA_TARGETS, clip_zeroshot, limit_rows
from llora_jax.train import loop as train_loop
from llora_jax.train import optim
from tests.fixtures import tiny_models, variable_images

CLASSES = ["cat", "dog", "owl"]
SIZE = 32
LORA = LoraConfig(rank=2, alpha=4.0, targets=DEFAULT_LORA_TARGETS["clip"])


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    base = tmp_path_factory.mktemp("data")
    folder = variable_images.write_image_folder(
        base / "vision" / "pets", CLASSES, {"train": 3, "test": 2}
    )
    # A truncated JPEG in the test split: skipped and counted with skip_corrupt.
    good = next((folder / "test" / "dog").glob("*.jpg")).read_bytes()
    (folder / "test" / "dog" / "broken.jpg").write_bytes(good[: len(good) // 3])
    return base


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    path = tiny_models.tiny_clip(tmp_path_factory.mktemp("clip"), CLASSES, image_size=SIZE)
    return experiment.BackboneCache().get(str(path), jnp.float32, jnp.float32)


def _pil_reference(path, mode):
    """Independent decode: PIL to RGB, then the resize of the given geometry."""
    img = Image.open(path).convert("RGB")
    if mode == "plain":
        return np.asarray(img.resize((SIZE, SIZE), Image.Resampling.BICUBIC))
    return data.resize_center_crop(np.asarray(img), SIZE)


def _splits(root, **kw):
    kw = dict(data_dir=root, val_size=2) | kw
    return {s: data.load_task("pets", s, **kw) for s in ("train", "validation", "test")}


@pytest.mark.parametrize("mode", ["clip", "plain"])
def test_streamed_train_batches_are_the_rows_decoded_and_resized_by_pil(root, mode):
    split = _splits(root)["train"]
    assert clip_zeroshot.streams(split)
    settings = clip_zeroshot.StreamSettings(SIZE, mode)
    n = len(split)
    batch = next(clip_zeroshot.StreamedTrain(split, settings)(n, 0))  # epoch 1, shuffled
    assert batch["image"].shape == (n, SIZE, SIZE, 3) and batch["image"].dtype == np.uint8
    ref = {}
    for j in split.indices:
        ref[_pil_reference(split.rows.paths[j], mode).tobytes()] = int(
            split.rows.columns["label"][j]
        )
    got = {img.tobytes(): int(lab) for img, lab in zip(batch["image"], batch["label"])}
    assert got == ref  # every row once, each equal to PIL's decode + resize, right label


def test_build_streams_variable_size_splits_and_keeps_fixed_size_ones(root, backbone):
    bb, tok = backbone
    splits = _splits(root)
    limits = {"train": 5, "validation": 1, "test": 0}
    exp = clip_zeroshot.build(
        bb, tok, splits, method="lora", lora=LORA, limits=limits, image_size=SIZE,
        skip_corrupt=True,
    )  # fmt: skip
    assert "train" not in exp.arrays and exp.streams_train
    assert len(exp.train_batches.split) == 5  # train_limit restricts the streamed rows
    test = splits["test"]
    assert len(exp.arrays["validation"]["label"]) == 1  # eval_limit bounds the decoded rows
    chosen = test.indices
    good = [j for j in chosen if not test.rows.paths[j].endswith("broken.jpg")]
    assert exp.skipped["test"] == 1 and len(good) == len(chosen) - 1
    expected = np.stack([_pil_reference(test.rows.paths[j], "clip") for j in good])
    np.testing.assert_array_equal(exp.arrays["test"]["image"], expected)
    np.testing.assert_array_equal(exp.arrays["test"]["label"], test.rows.columns["label"][good])
    # Without skip_corrupt the broken file is named in the error.
    with pytest.raises(data.DataError, match="broken.jpg"):
        clip_zeroshot.build(
            bb, tok, splits, method="lora", lora=LORA, limits=limits, image_size=SIZE
        )
    # A fixed-size split keeps the arrays path: the same arrays as before streaming existed.
    rng = np.random.default_rng(0)
    rows = sources.ArrayRows(
        {"image": rng.integers(0, 256, (12, 20, 20, 3), dtype=np.uint8),
         "label": rng.integers(0, 3, 12)}, "memory",
    )  # fmt: skip
    fixed = {s: dataclasses.replace(d, rows=rows, indices=np.arange(12)) for s, d in splits.items()}
    assert not clip_zeroshot.streams(fixed["train"])
    exp = clip_zeroshot.build(bb, tok, fixed, method="lora", lora=LORA, limits=limits)
    assert exp.train_batches is None and exp.skipped == {}
    for s in fixed:
        pos = limit_rows(12, limits[s])
        np.testing.assert_array_equal(exp.arrays[s]["image"], rows.columns["image"][pos])


def _fit(exp, wd, steps):
    oc = optim.OptimConfig(optimizer="adam", learning_rate=1e-2, schedule="constant")
    lc = train_loop.LoopConfig(
        total_steps=steps, batch_size=4, ckpt_every=4, log_every=2, progress=False,
        tensorboard=False,
    )  # fmt: skip
    return train_loop.finetune(
        exp.tm, exp.spec, oc, lc, None, wd, meta={"task": "pets"},
        batches=exp.train_batches(4, 0), data_fingerprint="pets",
    )  # fmt: skip


def test_a_streamed_run_resumed_gives_the_task_vector_of_an_uninterrupted_one(
    root, backbone, tmp_path
):
    bb, tok = backbone
    limits = {"train": 0, "validation": 0, "test": 0}
    exp = clip_zeroshot.build(
        bb, tok, _splits(root), method="lora", lora=LORA, limits=limits, image_size=SIZE,
        skip_corrupt=True,
    )  # fmt: skip
    _fit(exp, tmp_path / "full", 10)
    _fit(exp, tmp_path / "run", 6)  # checkpoint (and data position) at step 4
    _fit(exp, tmp_path / "run", 10)
    full = jax.tree.leaves(task_vectors.load(tmp_path / "full" / "task_vector").tau)
    resumed = jax.tree.leaves(task_vectors.load(tmp_path / "run" / "task_vector").tau)
    assert any(np.abs(np.asarray(x)).max() > 0 for x in full)
    for a, b in zip(full, resumed):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)


def test_evaluation_arrays_keep_the_split_order_with_worker_processes(root):
    # grain's workers interleave their batches; the decoded split is put back in row order.
    split = _splits(root, val_size=0)["train"]
    settings = clip_zeroshot.StreamSettings(SIZE, "clip", workers=2)
    arrays, skipped = clip_zeroshot.decode_split(split, settings, batch_size=2)
    expected = np.stack([_pil_reference(split.rows.paths[j], "clip") for j in split.indices])
    assert skipped == 0
    np.testing.assert_array_equal(arrays["image"], expected)
    np.testing.assert_array_equal(arrays["label"], split.rows.columns["label"][split.indices])


def test_a_group_refuses_streamed_training_data(root, backbone, tmp_path):
    bb, tok = backbone
    limits = {"train": 0, "validation": 0, "test": 0}
    exp = clip_zeroshot.build(
        bb, tok, _splits(root), method="lora", lora=LORA, limits=limits, image_size=SIZE,
        skip_corrupt=True,
    )  # fmt: skip
    configs = [load_config("configs/clip.py", "tiny", {"seed": s}) for s in (0, 1)]
    with pytest.raises(ValueError, match=r"\['eurosat', 'eurosat'\] stream their training"):
        experiment.run_finetune_group(configs, [tmp_path / "a", tmp_path / "b"], exps=[exp, exp])
    assert not (tmp_path / "a").exists()


def test_an_empty_split_decodes_to_empty_arrays(root):
    split = _splits(root)["train"]
    empty = dataclasses.replace(split, indices=split.indices[:0])
    arrays, skipped = clip_zeroshot.decode_split(empty, clip_zeroshot.StreamSettings(SIZE))
    assert arrays["image"].shape == (0, SIZE, SIZE, 3) and arrays["label"].shape == (0,)
    assert skipped == 0
