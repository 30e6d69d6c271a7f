"""Task registry: names, label words, class names, prompts, metrics and tfds routes.

A :class:`TaskSpec` says everything the rest of the package needs about a task. Known
tasks come from :func:`get_task`; tasks found only in a local data directory get a spec
inferred from their fields by :func:`infer_text_spec` (see ``sources.py``).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence

from llora_jax.data import vision

__all__ = [
    "TaskSpec",
    "GLUE_TASKS",
    "VISION_TASKS",
    "TEXT_LAYOUTS",
    "get_task",
    "canonical_name",
    "task_names",
    "infer_text_spec",
]

# Sentence / sentence-pair layouts that tfds GLUE uses, in encoder (natural) order.
TEXT_LAYOUTS: tuple[tuple[str, ...], ...] = (
    ("premise", "hypothesis"),
    ("question1", "question2"),
    ("sentence1", "sentence2"),
    ("question", "sentence"),
    ("sentence",),
)


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """Static description of one task.

    ``label_names`` are T5 label words for text tasks (index = tfds label id) and class
    names for vision tasks; empty for regression. ``text_fields`` are in encoder order
    (first segment, second segment); the T5 prompt uses ``prompt_fields`` order, which
    for GLUE follows T5's preprocessing (sorted field names, e.g. MNLI puts the
    hypothesis first). ``tfds_splits`` maps our ``"train"``/``"test"`` to tfds split
    strings; ``test_carve`` > 0 means the tfds source has no test split and that fraction
    of tfds train becomes test (seed 0, independent of the validation seed).
    """

    name: str
    kind: str  # "text" | "vision"
    label_names: tuple[str, ...] = ()
    is_regression: bool = False
    metrics: tuple[str, ...] = ("accuracy",)
    primary_metric: str = "accuracy"
    text_fields: tuple[str, ...] = ()
    prompt_fields: tuple[str, ...] = ()
    prompt_prefix: str = ""
    label_range: tuple[float, float] | None = None  # regression targets
    tfds_name: str | None = None
    tfds_splits: Mapping[str, str] = dataclasses.field(default_factory=dict)
    test_carve: float = 0.0
    templates: tuple[str, ...] = ()
    known: bool = True  # False for specs inferred from a local directory
    # One natural-language description per class (info.json ``descriptions``); the
    # text-encoder head embeds these instead of the label words when given.
    descriptions: tuple[str, ...] = ()

    @property
    def num_classes(self) -> int | None:
        return None if self.is_regression else len(self.label_names)


def _glue(
    name: str,
    fields: tuple[str, ...],
    labels: tuple[str, ...],
    metrics: tuple[str, ...] = ("accuracy",),
    test_split: str = "validation",
    **kw,
) -> TaskSpec:
    return TaskSpec(
        name=name,
        kind="text",
        label_names=labels,
        metrics=metrics,
        text_fields=fields,
        prompt_fields=tuple(sorted(fields)),
        prompt_prefix=name,
        tfds_name=f"glue/{name}",
        # GLUE test labels are hidden (-1): our "test" is the labelled tfds validation split.
        tfds_splits={"train": "train", "test": test_split},
        **kw,
    )


_GLUE_SPECS = {
    s.name: s
    for s in (
        _glue("cola", ("sentence",), ("unacceptable", "acceptable"), ("accuracy", "matthews")),
        _glue(
            "mnli",
            ("premise", "hypothesis"),
            ("entailment", "neutral", "contradiction"),
            test_split="validation_matched",
        ),
        _glue(
            "mrpc",
            ("sentence1", "sentence2"),
            ("not_equivalent", "equivalent"),
            ("accuracy", "f1"),
        ),
        _glue(
            "qqp", ("question1", "question2"), ("not_duplicate", "duplicate"), ("accuracy", "f1")
        ),
        _glue("rte", ("sentence1", "sentence2"), ("entailment", "not_entailment")),
        _glue("sst2", ("sentence",), ("negative", "positive")),
        _glue(
            "stsb",
            ("sentence1", "sentence2"),
            (),
            ("pearson", "spearman", "accuracy"),
            is_regression=True,
            primary_metric="spearman",
            label_range=(0.0, 5.0),
        ),
        _glue("qnli", ("question", "sentence"), ("entailment", "not_entailment")),
    )
}

GLUE_TASKS = ("cola", "mnli", "mrpc", "qqp", "rte", "sst2", "stsb")  # the paper's seven

# name -> (tfds name, tfds train split, tfds test split or None, fraction carved as test)
_VISION_ROUTES = {
    "sun397": ("sun397", "train", "test", 0.0),
    "cars": ("cars196", "train", "test", 0.0),
    "resisc45": ("resisc45", "train", None, 0.2),  # tfds has train only: 31,500 -> 6,300 test
    "eurosat": ("eurosat/rgb", "train", None, 0.1),  # tfds has train only: 27,000 -> 2,700 test
    "svhn": ("svhn_cropped", "train", "test", 0.0),
    "gtsrb": (None, "train", "test", 0.0),  # not in tfds: local npz only
    "mnist": ("mnist", "train", "test", 0.0),
    "dtd": ("dtd", "train+validation", "test", 0.0),  # split 1: 3,760 train / 1,880 test
}
VISION_TASKS = tuple(_VISION_ROUTES)

_ALIASES = {
    "stanford_cars": "cars",
    "cars196": "cars",
    "eurosat/rgb": "eurosat",
    "svhn_cropped": "svhn",
    "sst-2": "sst2",
    "sts-b": "stsb",
    "mnli_matched": "mnli",
}


def canonical_name(name: str) -> str:
    """Lower-case registry name: ``"glue/cola"`` -> ``"cola"``, ``"cars196"`` -> ``"cars"``."""
    n = name.strip().lower()
    if n.startswith("glue/"):
        n = n[len("glue/") :]
    return _ALIASES.get(n, n)


@functools.cache  # pure and cheap to key; sun397/cars read tfds metadata once
def _vision_spec(name: str) -> TaskSpec:
    tfds_name, train, test, carve = _VISION_ROUTES[name]
    splits = {"train": train} | ({"test": test} if test else {})
    return TaskSpec(
        name=name,
        kind="vision",
        label_names=vision.class_names(name),
        tfds_name=tfds_name,
        tfds_splits=splits,
        test_carve=carve,
        templates=vision.templates(name),
    )


def get_task(name: str) -> TaskSpec:
    """The registered spec of a task (GLUE or vision); raises KeyError with the known names."""
    n = canonical_name(name)
    if n in _GLUE_SPECS:
        return _GLUE_SPECS[n]
    if n in _VISION_ROUTES:
        return _vision_spec(n)
    raise KeyError(f"unknown task {name!r}; registered: {', '.join(task_names())}")


def task_names(kind: str | None = None) -> tuple[str, ...]:
    """Registered task names, optionally only ``"text"`` or ``"vision"`` ones."""
    text = tuple(_GLUE_SPECS)
    if kind == "text":
        return text
    if kind == "vision":
        return VISION_TASKS
    return text + VISION_TASKS


def infer_text_spec(
    name: str,
    fields: Sequence[str],
    *,
    regression: bool,
    label_names: Sequence[str] | None = None,
    num_classes: int | None = None,
    descriptions: Sequence[str] = (),
    metric: str | None = None,
) -> TaskSpec:
    """Spec for a text task known only from its data (field names and label type).

    The T5 prompt is ``"{name} {field_a}: {a} {field_b}: {b}"`` with the fields in sorted
    order (T5's generic GLUE rule). Label words are ``label_names`` if given, otherwise
    ``label_0 .. label_{k-1}``; metric: ``metric`` (first, primary) plus accuracy, default
    accuracy. Regression tasks get Pearson/Spearman (primary: ``metric`` or Spearman).
    """
    fields = tuple(fields)
    if regression:
        return TaskSpec(
            name=name,
            kind="text",
            is_regression=True,
            metrics=("pearson", "spearman", "accuracy"),
            primary_metric=metric or "spearman",
            text_fields=fields,
            prompt_fields=tuple(sorted(fields)),
            prompt_prefix=name,
            known=False,
        )
    if label_names is None:
        if num_classes is None:
            raise ValueError(f"task {name!r}: give label_names or num_classes")
        label_names = [f"label_{i}" for i in range(num_classes)]
    return TaskSpec(
        name=name,
        kind="text",
        label_names=tuple(label_names),
        metrics=tuple(dict.fromkeys((metric or "accuracy", "accuracy"))),
        primary_metric=metric or "accuracy",
        text_fields=fields,
        prompt_fields=tuple(sorted(fields)),
        prompt_prefix=name,
        known=False,
        descriptions=tuple(descriptions),
    )
