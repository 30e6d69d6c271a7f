"""Image classification with a CLIP vision tower and a frozen zero-shot head (the paper's set-up).

The head is built once from the *frozen* text tower: class names × templates
→ L2-normalised text embeddings. logits = exp(logit_scale) · cos(image, class).
Only the vision tower (or its adapters) trains, so every task vector shares
its task's head and merged models need no head surgery.

Images travel at their stored size as uint8 and are resized / cropped /
normalised inside the jitted step (``data.preprocess_on_device``), so the
host never holds 224×224 float copies.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from llora_jax import forward
from llora_jax.adapters import LoraConfig
from llora_jax.backbones import clip
from llora_jax.data import compute_metrics, vision
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
) -> Experiment:
    """The experiment of one image-classification task with a frozen zero-shot head."""
    spec = splits["train"].spec
    arrays = {s: encode_examples(d.take(limit_rows(len(d), limits[s]))) for s, d in splits.items()}
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
    )
