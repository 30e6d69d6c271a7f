"""RowTasks for every task family, and the task models of a bank built from its configs.

A row is a JSON object: ``{"adapter": name | null, <the task's fields>}``. Each family
encodes rows with the same encoder as its training and evaluation data, so a row's
prediction equals the per-task evaluation of the same example:

* ``text_encoder`` (BERT / MiniLM, frozen label heads): the task's text fields
  (``sentence``, or a pair such as ``sentence1`` / ``sentence2``); the prediction is
  the label name (regression tasks: the predicted bin's centre).
* ``t5`` (label-word scoring): the same fields, formatted as the T5 prompt; the
  prediction is the best-scoring label word (STS-B: the score it spells).
* ``clip`` (zero-shot heads): ``"image"``, a path to an image file (any size: resized
  and centre-cropped on the host to the config's image size, as for variable-size
  datasets) or an HWC uint8 nested list; the prediction is the class name.

:func:`tasks_from_configs` builds the task models from the config every fine-tuning
run stores in its task vector's ``meta["config"]`` (or one config for a bank of
imported adapters), so ``llora predict`` needs no code from the user.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from llora_jax import data, experiment
from llora_jax.data import tasks as data_tasks
from llora_jax.data import vision
from llora_jax.data.tasks import TaskSpec
from llora_jax.serving.predict import RowTask
from llora_jax.tasks import clip_zeroshot, t5_text, text_encoder
from llora_jax.types import TaskModel


def _examples(rows: Sequence[dict], fields: Sequence[str], regression: bool) -> dict:
    """Rows as the columns the data encoders take, with a placeholder label (unused)."""
    out = {f: [r[f] for r in rows] for f in fields}
    out["label"] = [0.0 if regression else 0] * len(rows)
    return out


def _as_int(p: Any) -> int:
    return int(np.asarray(p))


def text_encoder_task(
    tm: TaskModel, tokenizer: Any, spec: TaskSpec, *, max_len: int = 128
) -> RowTask:
    fields = tuple(spec.text_fields)

    def encode(rows: Sequence[dict]) -> dict[str, np.ndarray]:
        arrays = text_encoder.encode_examples(
            tokenizer, spec, _examples(rows, fields, spec.is_regression), max_len
        )
        return {k: v for k, v in arrays.items() if k not in ("label", "score")}

    def decode(p: Any) -> Any:
        if spec.is_regression:
            return float(text_encoder.bin_centres(spec)[_as_int(p)])
        return spec.label_names[_as_int(p)]

    return RowTask(tm, fields, encode, decode)


def t5_task(
    tm: TaskModel, tokenizer: Any, spec: TaskSpec, *, max_len: int = 128, target_len: int = 8
) -> RowTask:
    fields = tuple(spec.prompt_fields or spec.text_fields)
    words = t5_text.label_words(spec)

    def encode(rows: Sequence[dict]) -> dict[str, np.ndarray]:
        arrays = t5_text.encode_examples(
            tokenizer, spec, _examples(rows, fields, spec.is_regression), max_len, target_len
        )
        return {k: v for k, v in arrays.items() if k not in ("label", "score")}

    def decode(p: Any) -> Any:
        word = words[_as_int(p)]
        return float(word) if spec.is_regression else word

    return RowTask(tm, fields, encode, decode)


def _image(value: Any, size: int) -> np.ndarray:
    if isinstance(value, str):
        from PIL import Image  # Pillow: only image rows need it

        with Image.open(Path(value)) as im:
            value = np.asarray(im.convert("RGB"))
    return vision.resize_center_crop(np.asarray(value, np.uint8), size)


def clip_task(tm: TaskModel, class_names: Sequence[str], *, image_size: int = 224) -> RowTask:
    names = tuple(class_names)

    def encode(rows: Sequence[dict]) -> dict[str, np.ndarray]:
        return {"image": np.stack([_image(r["image"], image_size) for r in rows])}

    return RowTask(tm, ("image",), encode, lambda p: names[_as_int(p)], token_keys=())


def _spec(c: Any) -> TaskSpec:
    """The task's spec from the registry; a local task's from its data directory."""
    try:
        return data_tasks.get_task(c.task)
    except KeyError:
        # A local task's spec (label names, fields) is read with its data.
        return data.load_task(
            c.task, "test", data_dir=c.data.data_dir or None, source=c.data.source
        ).spec


def row_task_from_config(c: Any, cache: experiment.BackboneCache) -> RowTask:
    """The RowTask of fine-tuning config ``c`` (its backbone, task and head settings)."""
    bb, tok = cache.get(
        c.backbone,
        experiment.compute_dtype(c.dtype),
        experiment.compute_dtype(c.param_dtype),
    )
    if c.kind == "text_encoder":
        spec = _spec(c)
        tm = text_encoder.task_model(bb, tok, spec, scale=float(c.get("head_scale", 20.0)))
        return text_encoder_task(tm, tok, spec, max_len=int(c.data.max_len))
    if c.kind == "t5":
        spec = _spec(c)
        tm = t5_text.task_model(bb, tok, spec, target_len=int(c.data.target_len))
        return t5_task(
            tm, tok, spec, max_len=int(c.data.max_len), target_len=int(c.data.target_len)
        )
    if c.kind == "clip":
        names = vision.class_names(c.task)
        size = int(c.data.image_size)
        templates = None if c.get("templates", "paper") == "paper" else vision.templates(c.task)
        tm = clip_zeroshot.task_model(
            bb,
            tok,
            c.task,
            image_size=size,
            normalized=c.get("image_mode", "clip") == "clip",
            templates=templates,
            class_names=names,
        )
        return clip_task(tm, names, image_size=size)
    raise ValueError(f"unknown config.kind {c.kind!r}; valid kinds: text_encoder, t5, clip")


def _pad_heads(tasks: dict[str, RowTask]) -> dict[str, RowTask]:
    """Text-encoder heads padded to one class count: every task shares one compiled program."""
    heads = [t.task_model.head for t in tasks.values()]
    if not all(isinstance(h, Mapping) and "valid" in h for h in heads):
        return tasks
    n = max(h["classes"].shape[0] for h in heads)
    return {
        k: dataclasses.replace(t, task_model=text_encoder.pad_classes(t.task_model, n))
        for k, t in tasks.items()
    }


def tasks_from_configs(metas: Mapping[str, dict]) -> dict[str, RowTask]:
    """{task name: RowTask} for a bank's adapters (``metas``: name → task-vector meta),
    each task's model from the ``meta["config"]`` its fine-tuning run stored. Adapters
    without one (imported PEFT adapters) need one config for all rows instead
    (:func:`row_task_from_config`)."""
    cache = experiment.BackboneCache()
    configs: dict[str, Any] = {}
    missing = []
    for name, meta in metas.items():
        if not isinstance(meta.get("config"), Mapping):
            missing.append(name)
            continue
        c = ml_collections.ConfigDict(meta["config"])
        configs.setdefault(str(c.task), c)
    if missing or not configs:
        raise ValueError(
            f"adapters {sorted(missing)[:5]} carry no fine-tuning config in their meta.json "
            "(imported adapters don't); pass --config=<the task's config file> to say which "
            "model and task they serve"
        )
    backbones = {c.backbone for c in configs.values()}
    if len(backbones) > 1:
        raise ValueError(
            f"the bank's adapters were trained on different backbones {sorted(backbones)}; "
            "a bank holds adapters of one base model"
        )
    return _pad_heads({t: row_task_from_config(c, cache) for t, c in configs.items()})
