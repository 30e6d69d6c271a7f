"""Image classification with a CLIP vision tower and a frozen zero-shot head (the paper's set-up).

The head is built once from the *frozen* text tower: class names × templates
→ L2-normalised text embeddings. logits = exp(logit_scale) · cos(image, class).
Only the vision tower (or its adapters) trains, so every task vector shares
its task's head and merged models need no head surgery.

Fixed-size datasets (npz, MNIST, SVHN, GTSRB...): images travel at their stored size as
uint8 and are resized / cropped / normalised inside the jitted step
(``data.preprocess_on_device``), so the host never holds 224×224 float copies.

Variable-size datasets and image files / encoded bytes (image folders, Hugging Face
datasets, tfds SUN397 / Cars / DTD) go through the streaming pipeline
(``data.streaming.make_batch_iterator``): worker processes decode, convert to RGB and
resize / crop to ``image_size`` on the host. Training reads a checkpointable stream
(``Experiment.train_batches``); validation and test are decoded once, by one pass of the
same pipeline, into fixed-size uint8 arrays (the device-side preprocessing is then only
the normalisation).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from collections.abc import Iterator, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from llora_jax import forward
from llora_jax.adapters import LoraConfig
from llora_jax.backbones import clip
from llora_jax.data import TaskData, compute_metrics, sources, vision
from llora_jax.tasks.base import Experiment, limit_rows
from llora_jax.types import AdapterSpec, TaskModel


def _images(examples: dict) -> np.ndarray:
    img = examples["image"]
    if isinstance(img, list):  # datasets with varying sizes: resize on the host once
        raise ValueError(
            "images of varying sizes: this readout needs fixed-size uint8 arrays; "
            "resize them first (data.image_transform) or use a fixed-size dataset"
        )
    img = np.asarray(img, np.uint8)
    return img[..., None] if img.ndim == 3 else img


def encode_examples(examples: dict) -> dict[str, np.ndarray]:
    return {"image": _images(examples), "label": np.asarray(examples["label"], np.int32)}


@dataclasses.dataclass(frozen=True)
class ZeroShotReadout:
    """uint8 images -> preprocessed on the device -> image embeddings -> zero-shot logits.

    A value (compared by its fields), not a closure: every task of one backbone and image
    size has an equal readout, so their train and predict programs are compiled once.
    """

    image_size: int
    normalized: bool

    def __call__(self, call, batch, head, train):
        pixels = vision.preprocess_on_device(
            batch["image"], self.image_size, normalized=self.normalized
        )
        emb = call(pixels, method="encode_image", deterministic=not train)
        return {
            "logits": clip.zeroshot_logits(
                emb.astype(jnp.float32), head["classes"], head["logit_scale"]
            )
        }


def task_model(
    backbone: Any,
    tokenizer: Any,
    task: str,
    *,
    image_size: int = 224,
    normalized: bool = True,
    templates: Sequence[str] | None = None,
    class_names: Sequence[str] | None = None,
) -> TaskModel:
    if tokenizer is None:
        raise ValueError(
            f"{backbone.source} has no tokenizer: the zero-shot head needs a full CLIPModel "
            "checkpoint (text tower + tokenizer files)"
        )
    names = tuple(class_names or vision.class_names(task))
    temps = tuple(templates or (vision.PAPER_TEMPLATE,))
    head = {
        "classes": clip.build_zeroshot_head(
            backbone.module, backbone.params, tokenizer, names, temps
        ),
        "logit_scale": jnp.asarray(backbone.params["logit_scale"], jnp.float32),
    }

    return TaskModel(
        module=backbone.module,
        params=backbone.params,
        readout=ZeroShotReadout(int(image_size), bool(normalized)),
        loss=forward.classification_loss,
        predict=forward.argmax_predict,
        head=head,
        base_model=str(backbone.source),
        full_ft_targets=(r"^vision_model/",),
    )


# ----------------------------------------------------------------------------- streaming

# Host-side geometry per config.image_mode: "clip" = shortest-side resize + centre crop,
# "resize" = the paper's plain image_size x image_size resize.
RESIZE_FOR_IMAGE_MODE = {"clip": "clip", "resize": "plain"}


def _streaming_module() -> Any:
    # grain (behind data.streaming) is absent from the GPU image: load the pipeline only
    # for datasets that stream (the pattern of backbones.hf's per-kind modules).
    return importlib.import_module("llora_jax.data.streaming")


def streams(split: TaskData) -> bool:
    """Whether a split goes through the streaming pipeline: its rows are image files or
    encoded bytes (image folders, Hugging Face datasets), or a tfds dataset whose images
    vary in size (SUN397, Cars, DTD). Fixed-size arrays (npz, MNIST, SVHN...) do not."""
    if hasattr(split.rows, "record"):  # FileRows / HFRows: one decoded record at a time
        return True
    if isinstance(split.rows, sources.TfdsRows):
        info = getattr(split.rows.ds, "dataset_info", None)
        shape = info.features["image"].shape if info is not None else None
        return shape is None or None in shape
    return False


def restrict(split: TaskData, limit: int) -> TaskData:
    """``split`` restricted to ``limit_rows`` of it (the rows ``take`` would read)."""
    return dataclasses.replace(split, indices=split.indices[limit_rows(len(split), limit)])


@dataclasses.dataclass(frozen=True)
class StreamSettings:
    """How streamed images are decoded: size, host geometry, corrupt files, workers."""

    image_size: int = 224
    resize: str = "clip"  # "clip" | "plain"
    skip_corrupt: bool = False
    workers: int = 0

    def iterator(self, split: TaskData, batch_size: int, **kw: Any) -> Any:
        return _streaming_module().make_batch_iterator(
            split,
            batch_size,
            image_size=self.image_size,
            resize=self.resize,
            skip_corrupt=self.skip_corrupt,
            worker_count=self.workers,
            **kw,
        )


@dataclasses.dataclass(frozen=True)
class StreamedTrain:
    """``(batch_size, seed) -> iterator`` of a split's training batches: shuffled, repeated,
    checkpointable (``get_state`` / ``set_state``), this process's shard."""

    split: TaskData
    settings: StreamSettings

    def __call__(self, batch_size: int, seed: int) -> Iterator[dict]:
        return self.settings.iterator(self.split, batch_size, seed=seed, num_epochs=None)


class NumberedRows:
    """A split's rows with each record's row number added as ``"position"`` (picklable for
    worker processes): grain's workers interleave their batches, so an evaluation pass puts
    its rows back in order by it."""

    def __init__(self, rows: Any):
        self.rows, self.origin = rows, rows.origin

    def __len__(self) -> int:
        return len(self.rows)

    def record(self, j: int) -> dict[str, Any]:
        if hasattr(self.rows, "record"):
            out = dict(self.rows.record(j))
        else:
            out = {k: v[0] for k, v in self.rows.take(np.asarray([j])).items()}
        return out | {"position": np.int64(j)}


def decode_split(
    split: TaskData, settings: StreamSettings, batch_size: int = 64
) -> tuple[dict[str, np.ndarray], int]:
    """One in-order pass of the pipeline over ``split``: ({"image": uint8 [N, S, S, 3],
    "label": int32 [N]}, corrupt images skipped). Every process decodes the whole split
    (evaluation is not sharded); padding and skipped rows (weight 0) are dropped; rows
    keep the split's order whatever the number of workers."""
    side = settings.image_size
    if not len(split):  # e.g. no validation carve of a tiny train split
        return {"image": np.zeros((0, side, side, 3), np.uint8), "label": np.zeros(0, np.int32)}, 0
    numbered = dataclasses.replace(split, rows=NumberedRows(split.rows))
    it = settings.iterator(
        numbered,
        min(batch_size, len(split)),
        shuffle=False,
        num_epochs=1,
        drop_remainder=False,
        shard_index=0,
        shard_count=1,
    )
    images, labels, positions = [np.zeros((0, side, side, 3), np.uint8)], [], []
    for batch in it:
        keep = batch["weight"] > 0
        images.append(batch["image"][keep])
        labels.append(np.asarray(batch["label"])[keep])
        positions.append(np.asarray(batch["position"])[keep])
    order = np.argsort(np.concatenate(positions), kind="stable")
    out = {
        "image": np.concatenate(images)[order],
        "label": np.concatenate(labels).astype(np.int32)[order],
    }
    return out, int(it.skipped)


def label_metrics(spec: Any, preds: np.ndarray, arrays: dict) -> dict:
    return compute_metrics(spec, preds, arrays["label"])


def build(
    backbone: Any,
    tokenizer: Any,
    splits: dict,
    *,
    method: str,
    lora: LoraConfig,
    limits: dict[str, int],
    image_size: int = 224,
    normalized: bool = True,
    templates: Sequence[str] | None = None,
    resize: str = "clip",
    skip_corrupt: bool = False,
    workers: int = 0,
) -> Experiment:
    """The experiment of one image-classification task with a frozen zero-shot head.

    Splits that ``streams`` are read through the pipeline (``StreamSettings``: ``resize``
    "clip" or "plain", ``skip_corrupt``, ``workers`` decode processes): training from a
    stream (``Experiment.train_batches``; no "train" arrays), evaluation from arrays
    decoded once. Every other split is materialised as today (device-side resize).
    """
    spec = splits["train"].spec
    settings = StreamSettings(int(image_size), resize, bool(skip_corrupt), int(workers))
    arrays, skipped, train_batches = {}, {}, None
    for name, split in splits.items():
        part = restrict(split, limits[name])
        if not streams(split):
            arrays[name] = encode_examples(part.examples)
        elif name == "train":
            train_batches = StreamedTrain(part, settings)
        else:
            arrays[name], skipped[name] = decode_split(part, settings)
    tm = task_model(
        backbone,
        tokenizer,
        spec.name,
        image_size=image_size,
        normalized=normalized,
        templates=templates,
        class_names=spec.label_names,  # the source's class order (HF ClassLabel, folders)
    )
    return Experiment(
        task=spec.name,
        tm=tm,
        spec=AdapterSpec(method, lora),
        arrays=arrays,
        metric_fn=functools.partial(label_metrics, spec),
        task_spec=spec,
        primary_metric=spec.primary_metric,
        train_batches=train_batches,
        skipped=skipped,
    )
