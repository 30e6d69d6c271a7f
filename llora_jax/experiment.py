"""From a config to a runnable experiment: backbone, task model, arrays, metrics.

This is the only place (with ``main.py``) that reads config objects; it turns
them into the explicit arguments that the library functions take.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from llora_jax import config_checks, data, tasks
from llora_jax.adapters import LoraConfig
from llora_jax.backbones import hf, tokenizers
from llora_jax.backbones.attention import attention_for_method, with_attention_impl
from llora_jax.data import vision
from llora_jax.data.fingerprint import check_same_data, task_fingerprint
from llora_jax.evaluation import grid as grid_eval
from llora_jax.tasks import Experiment
from llora_jax.train import group as train_group
from llora_jax.train import loop as train_loop
from llora_jax.train import optim
from llora_jax.types import AdapterSpec, check_method

KINDS = tasks.KINDS


def compute_dtype(name: str) -> Any:
    if name == "auto":
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    try:
        return jnp.dtype(name)
    except TypeError as e:
        raise ValueError(f"unknown dtype {name!r}; use auto, float32 or bfloat16") from e


class BackboneCache:
    """Load each backbone once per process (a study fine-tunes many tasks on one base)."""

    def __init__(self) -> None:
        self._items: dict[tuple, Any] = {}

    def get(
        self, source: str, dtype: Any, param_dtype: Any, attention_impl: str = "auto"
    ) -> tuple[Any, Any]:
        key = (source, str(dtype), str(param_dtype), attention_impl)
        if key not in self._items:
            bb = hf.load_backbone(source, dtype=dtype, param_dtype=param_dtype)
            if attention_impl != "auto":
                bb = dataclasses.replace(bb, module=with_attention_impl(bb.module, attention_impl))
            # Vision-only checkpoints carry no tokenizer; any other must have its own.
            tok = (
                tokenizers.load_tokenizer(bb.path) if tokenizers.needs_tokenizer(bb.path) else None
            )
            self._items[key] = (bb, tok)
        return self._items[key]


def _lora_fields(c: Any) -> dict:
    out = dict(
        rank=int(c.lora.rank),
        alpha=float(c.lora.alpha),
        dropout=float(c.lora.dropout),
        init_b=str(c.lora.init_b),
        a0=str(c.lora.get("a0", "shared")),
    )
    if tuple(c.lora.targets):
        out["targets"] = tuple(c.lora.targets)
    return out


def lora_config(c: Any, default_targets: tuple[str, ...]) -> LoraConfig:
    return LoraConfig(**({"targets": tuple(default_targets)} | _lora_fields(c)))


def optim_config(c: Any) -> optim.OptimConfig:
    o = c.optim
    return optim.OptimConfig(
        optimizer=o.optimizer,
        learning_rate=float(o.learning_rate),
        weight_decay=float(o.weight_decay),
        schedule=o.schedule,
        warmup_steps=int(o.warmup_steps),
        total_steps=int(c.steps),
        clip_norm=float(o.clip_norm) or None,
        grad_accum=int(o.grad_accum),
    )


def loop_config(c: Any, progress: bool = True) -> train_loop.LoopConfig:
    return train_loop.LoopConfig(
        total_steps=int(c.steps),
        batch_size=int(c.batch_size),
        seed=int(c.seed),
        log_every=int(c.log_every),
        eval_every=int(c.eval_every),
        ckpt_every=int(c.ckpt_every),
        progress=progress,
        rng_impl=str(c.get("rng_impl", "rbg")),
        tensorboard=bool(c.get("tensorboard", True)),
    )


def load_splits(c: Any) -> dict[str, Any]:
    """The task's train / validation / test splits as config ``c`` reads them (data only:
    ``finetune-all`` checks every task's data before it trains the first)."""
    kw = dict(
        data_dir=c.data.data_dir or None,
        source=c.data.source,
        val_size=int(c.data.val_size) or None,
        val_max=int(c.data.val_max),
        seed=0,  # the validation carve is fixed, whatever the training seed
    )
    return {s: data.load_task(c.task, s, **kw) for s in ("train", "validation", "test")}


def _kind_arguments(c: Any) -> dict:
    """The arguments of ``c.kind``'s task builder that its config fields set."""
    if c.kind == "text_encoder":
        return dict(max_len=int(c.data.max_len), head_scale=float(c.get("head_scale", 20.0)))
    if c.kind == "t5":
        return dict(
            max_len=int(c.data.max_len),
            target_len=int(c.data.target_len),
            eval_batch_size=int(c.eval_batch_size),
        )
    templates = None if c.get("templates", "paper") == "paper" else vision.templates(c.task)
    mode = c.get("image_mode", "clip")
    return dict(
        image_size=int(c.data.image_size),
        normalized=mode == "clip",
        templates=templates,
        resize=tasks.clip_zeroshot.RESIZE_FOR_IMAGE_MODE[mode],
        skip_corrupt=bool(c.data.get("skip_corrupt", False)),
        workers=int(c.data.get("workers", 0)),
    )


def build(c: Any, cache: BackboneCache | None = None) -> Experiment:
    """Build the experiment that config ``c`` describes (validated before anything loads).

    ``Experiment.data`` records where each split came from and a hash of its rows
    (``task_fingerprint``): it goes into ``run.json`` and the task vector's meta."""
    check_method(c.method)
    if c.kind not in tasks.KINDS:
        raise ValueError(f"unknown config.kind {c.kind!r}; valid kinds: {', '.join(tasks.KINDS)}")
    config_checks.validate_run_config(c)
    attention = attention_for_method(str(c.get("attention_impl", "auto")), c.method)
    cache = cache or BackboneCache()
    dtype = compute_dtype(c.dtype)
    splits = load_splits(c)  # first: a missing dataset is reported before any model loads
    bb, tok = cache.get(c.backbone, dtype, compute_dtype(c.param_dtype), attention)
    limits = {
        "train": int(c.data.train_limit),
        "validation": int(c.data.eval_limit),
        "test": int(c.data.eval_limit),
    }
    exp = tasks.BUILDERS[c.kind](
        bb,
        tok,
        splits,
        method=c.method,
        lora=lora_config(c, tasks.DEFAULT_LORA_TARGETS[c.kind]),
        limits=limits,
        **_kind_arguments(c),
    )
    return dataclasses.replace(exp, data=task_fingerprint(splits))


def check_scored_data(meta: dict, exp: Experiment, recorded_by: str) -> None:
    """Refuse to score a task vector on other validation / test rows than it was scored on.

    ``meta``: the task vector's meta (``meta["data"]`` is the provenance ``finetune``
    recorded); ``exp``: the experiment its run's config builds now. Vectors made before
    provenance was recorded cannot be checked: a warning says so.
    """
    recorded = meta.get("data")
    if not recorded:
        warnings.warn(
            f"{recorded_by} records no data provenance (made before llora-jax recorded it); "
            "cannot check that it is scored on the data it was made with",
            stacklevel=2,
        )
        return
    if exp.data is None:
        return  # an experiment built without a config (tests, library use)
    check_same_data(recorded, exp.data, splits=("validation", "test"), recorded_by=recorded_by)


# ----------------------------------------------------------------------------- running


def evaluate_split(exp: Experiment, trainable: Any, phi0: Any, split: str, batch_size: int) -> dict:
    arr = exp.arrays[split]
    preds = grid_eval.predict(exp.tm, exp.spec, trainable, phi0, arr, batch_size)
    return exp.metric_fn(preds, arr)


def _with_method(exp: Experiment, c: Any) -> Experiment:
    """``exp`` (built for any method) with the adapter spec of config ``c``."""
    lora = dataclasses.replace(exp.spec.lora, **_lora_fields(c))
    return dataclasses.replace(exp, spec=AdapterSpec(c.method, lora))


def _final_eval(exp: Experiment, c: Any) -> Callable[[Any, Any], dict]:
    """(trainable, phi0) -> {"val/...": ..., "test/...": ...} at the end of a run."""
    bs = int(c.eval_batch_size)

    def final_eval(trainable, phi0):
        out = {}
        for split, prefix in (("validation", "val"), ("test", "test")):
            for k, v in evaluate_split(exp, trainable, phi0, split, bs).items():
                out[f"{prefix}/{k}"] = v
            if split in exp.skipped:  # corrupt images left out of this split (streamed)
                out[f"{prefix}/skipped_corrupt"] = exp.skipped[split]
            if exp.extra_eval is not None:
                for k, v in exp.extra_eval(trainable, phi0, split).items():
                    out[f"{prefix}/{k}"] = v
        return out

    return final_eval


def _periodic_eval(exp: Experiment, c: Any) -> Callable[[Any, Any], dict]:
    """(trainable, phi0) -> validation metrics every ``eval_every`` steps."""
    bs = int(c.eval_batch_size)

    def periodic(trainable, phi0):
        return {
            f"val/{k}": v for k, v in evaluate_split(exp, trainable, phi0, "validation", bs).items()
        }

    return periodic


def _meta(exp: Experiment, c: Any) -> dict:
    return {
        "task": exp.task,
        "model": c.model,
        "config": json.loads(c.to_json_best_effort()),
        "data": exp.data,  # provenance: fuse / disentangle / the study check it
    }


def _run_record(exp: Experiment, c: Any) -> dict:
    """What the loop records in and checks against ``run.json``, and the ``config.json`` it
    writes once the workdir is claimed (after a ``--restart`` moved the old one aside)."""
    return dict(
        config=json.loads(c.to_json_best_effort()),
        data_fingerprint=exp.data["digest"] if exp.data else None,
        files={"config.json": c.to_json_best_effort(indent=2, sort_keys=True)},
    )


def run_finetune(
    c: Any,
    workdir: str | Path,
    cache: BackboneCache | None = None,
    progress: bool = True,
    mesh: Any = None,
    exp: Experiment | None = None,
    restart: bool = False,
) -> dict:
    """Fine-tune one task as configured; writes checkpoints, metrics and the task vector.

    ``exp``: an already built experiment of this task and config (a study reuses one
    per task: data, tokenisation and heads do not depend on method, seed or rate).
    ``restart``: move an old run in ``workdir`` aside and start over (``--restart``).
    Returns the final metrics ({"val/...": ..., "test/...": ...}).
    """
    config_checks.validate_run_config(c)
    exp = build(c, cache) if exp is None else _with_method(exp, c)
    lc = loop_config(c, progress)
    streamed = exp.train_batches(lc.batch_size, lc.seed) if exp.streams_train else None
    return train_loop.finetune(
        exp.tm,
        exp.spec,
        optim_config(c),
        lc,
        None if streamed is not None else exp.arrays["train"],
        workdir,
        batches=streamed,
        evaluate=_periodic_eval(exp, c),
        final_eval=_final_eval(exp, c),
        meta=_meta(exp, c),
        mesh=mesh,
        restart=restart,
        **_run_record(exp, c),
    )


# Fields in which the runs of one group may differ (every other config field is shared).
GROUP_FREE_FIELDS = ("task", "seed", "optim.learning_rate")


def _flat_fields(node: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(node, dict):
        return {prefix: node}
    out: dict[str, Any] = {}
    for k, v in node.items():
        out.update(_flat_fields(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def check_group_configs(configs: list[Any]) -> None:
    """Refuse configs that differ in anything but task, seed and optim.learning_rate."""
    if not configs:
        raise ValueError("run_finetune_group: no configs given (an empty group)")
    flat = [_flat_fields(json.loads(c.to_json_best_effort())) for c in configs]
    for f in flat:
        for name in GROUP_FREE_FIELDS:
            f.pop(name, None)
    missing = object()
    for i, f in enumerate(flat[1:], 1):
        for name in sorted(set(flat[0]) | set(f)):
            a, b = flat[0].get(name, missing), f.get(name, missing)
            if a != b:
                show = lambda v: "(absent)" if v is missing else repr(v)  # noqa: E731
                raise ValueError(
                    f"configs of one group may differ only in {', '.join(GROUP_FREE_FIELDS)}; "
                    f"field {name!r} differs: {show(a)} (config 0, task {configs[0].task}) vs "
                    f"{show(b)} (config {i}, task {configs[i].task}). Fine-tune them in "
                    "separate groups (or one at a time with run_finetune)"
                )


def run_finetune_group(
    configs: list[Any],
    workdirs: list[str | Path],
    cache: BackboneCache | None = None,
    progress: bool = True,
    mesh: Any = None,
    exps: list[Experiment] | None = None,
) -> list[dict]:
    """Fine-tune several runs at once (train_group.finetune_group); outputs as run_finetune.

    The configs may differ only in task, seed and optim.learning_rate, and their task
    models must share one backbone, readout and head shape (a study's padded text heads
    do). ``exps``: already built experiments, one per config (as in run_finetune).
    No Orbax checkpoints are written (``ckpt_every`` is ignored): a group is resumed
    run by run, by skipping members whose task vector exists.
    Returns every run's final metrics, in order.
    """

    for c in configs:
        config_checks.validate_run_config(c)
    check_group_configs(configs)
    if len(workdirs) != len(configs) or (exps is not None and len(exps) != len(configs)):
        raise ValueError(
            f"run_finetune_group: {len(configs)} configs need as many workdirs "
            f"(got {len(workdirs)}) and experiments (got {len(exps or configs)})"
        )
    cache = cache or BackboneCache()  # one backbone for every member
    exps = [
        build(c, cache) if e is None else _with_method(e, c)
        for c, e in zip(configs, exps or [None] * len(configs))
    ]
    streamed = [c.task for c, e in zip(configs, exps) if e.streams_train]
    if streamed:
        raise ValueError(
            f"run_finetune_group: tasks {streamed} stream their training images (variable "
            "sizes or image files); a group needs arrays: fine-tune them with run_finetune"
        )
    key = train_group.group_key(exps[0].tm)
    for c, e in zip(configs[1:], exps[1:]):
        if train_group.group_key(e.tm) != key or e.spec != exps[0].spec:
            raise ValueError(
                f"run_finetune_group: tasks {configs[0].task!r} and {c.task!r} do not share one "
                "backbone, readout, adapter spec and head shape, so they cannot train in one "
                "group; fine-tune them in separate groups"
            )
    oc, lc = train_group.shared_configs(
        [optim_config(c) for c in configs], [loop_config(c, progress) for c in configs]
    )
    members = [
        train_loop.Run(
            workdir=Path(wd),
            seed=int(c.seed),
            learning_rate=float(c.optim.learning_rate),
            head=e.tm.head,
            train_arrays=e.arrays["train"],
            final_eval=_final_eval(e, c),
            evaluate=_periodic_eval(e, c),
            meta=_meta(e, c),
            **_run_record(e, c),
        )
        for c, wd, e in zip(configs, workdirs, exps)
    ]
    train_group.check_runs(members)  # before anything is written
    return train_loop.fit(exps[0].tm, exps[0].spec, oc, lc, members, mesh=mesh, group_step=True)
