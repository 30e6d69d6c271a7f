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

from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from llora_jax import model as M
from llora_jax.backbones import clip
from llora_jax.data import vision


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


def task_model(
    backbone: Any,
    tokenizer: Any,
    task: str,
    *,
    image_size: int = 224,
    normalized: bool = True,
    templates: Sequence[str] | None = None,
    class_names: Sequence[str] | None = None,
) -> M.TaskModel:
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

    def readout(call, batch, head, train):
        pixels = vision.preprocess_on_device(batch["image"], image_size, normalized=normalized)
        emb = call(pixels, method="encode_image", deterministic=not train)
        return {
            "logits": clip.zeroshot_logits(
                emb.astype(jnp.float32), head["classes"], head["logit_scale"]
            )
        }

    return M.TaskModel(
        module=backbone.module,
        params=backbone.params,
        readout=readout,
        loss=M.classification_loss,
        predict=M.argmax_predict,
        head=head,
        base_model=str(backbone.source),
        full_ft_targets=(r"^vision_model/",),
    )


def build_experiment(c: Any, bb: Any, tok: Any, splits: dict) -> Any:
    from llora_jax.data import compute_metrics
    from llora_jax.experiment import Experiment, _limit, lora_config

    spec = splits["train"].spec
    limits = {
        "train": int(c.data.train_limit),
        "validation": int(c.data.eval_limit),
        "test": int(c.data.eval_limit),
    }
    arrays = {s: encode_examples(d.take(_limit(len(d), limits[s]))) for s, d in splits.items()}
    templates = None if c.get("templates", "paper") == "paper" else vision.templates(spec.name)
    tm = task_model(
        bb,
        tok,
        spec.name,
        image_size=int(c.data.image_size),
        normalized=c.get("image_mode", "clip") == "clip",
        templates=templates,
        class_names=spec.label_names,  # the source's class order (HF ClassLabel, folders)
    )
    return Experiment(
        task=spec.name,
        tm=tm,
        spec=M.AdapterSpec(c.method, lora_config(c, clip.DEFAULT_LORA_TARGETS)),
        arrays=arrays,
        metric_fn=lambda preds, arr: compute_metrics(spec, preds, arr["label"]),
        task_spec=spec,
        primary_metric=spec.primary_metric,
    )
