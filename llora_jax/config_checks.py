"""Validate a fine-tuning config before any data or weights load.

``validate_run_config(config)`` checks every field of ``configs/common.py`` (and the
per-backbone extras of ``configs/*.py``) for type, range and known names, and raises
one ``ConfigError`` listing *every* problem with its fix, so a user corrects them all
in one go. Cross-field rules (warm-up shorter than the run, the cuDNN kernel with
``l_lora_model``) are checked too. ``validate_fusion_names`` checks ``--fusion``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from llora_jax.backbones.attention import ATTENTION_IMPLS
from llora_jax.errors import ConfigError
from llora_jax.train import optim
from llora_jax.train.sharding import RULES
from llora_jax.types import METHODS

__all__ = [
    "DTYPES",
    "KINDS",
    "OPTIMIZERS",
    "SCHEDULES",
    "config_problems",
    "validate_fusion_names",
    "validate_run_config",
]

# Names the library accepts. KINDS is tasks.KINDS (tests/test_config_checks.py checks they
# agree: the tasks package is too heavy to import for a config check).
KINDS = ("text_encoder", "t5", "clip")
OPTIMIZERS = optim.OPTIMIZERS
SCHEDULES = optim.SCHEDULES
DTYPES = ("auto", "float32", "bfloat16", "float16")
PARAM_DTYPES = ("auto", "float32", "bfloat16", "float16")
RNG_IMPLS = ("rbg", "unsafe_rbg", "threefry2x32")
SOURCES = ("auto", "local", "tfds", "hf")
SOURCE_PREFIXES = ("hf:", "folder:")  # hf:<hub id or dir>[#<config>], folder:<root>
INIT_B = ("zero", "normal")
TEMPLATES = ("paper", "ensemble")
IMAGE_MODES = ("clip", "resize")

Check = Callable[[Any], str | None]


def _int(lo: int | None = None, *, or_minus_one: bool = False) -> Check:
    def check(v: Any) -> str | None:
        if isinstance(v, bool) or not isinstance(v, int):
            return f"must be an integer, got {v!r} ({type(v).__name__})"
        if or_minus_one and v == -1:
            return None
        if lo is not None and v < lo:
            extra = " (or -1 for all the rest)" if or_minus_one else ""
            return f"must be >= {lo}{extra}, got {v}"
        return None

    return check


def _float(lo: float, *, strict: bool, below: float | None = None) -> Check:
    def check(v: Any) -> str | None:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return f"must be a number, got {v!r} ({type(v).__name__})"
        if not math.isfinite(v):
            return f"must be finite, got {v}"
        if (v <= lo) if strict else (v < lo):
            return f"must be {'>' if strict else '>='} {lo:g}, got {v:g}"
        if below is not None and v >= below:
            return f"must be < {below:g}, got {v:g}"
        return None

    return check


def _one_of(names: Iterable[str]) -> Check:
    names = tuple(names)

    def check(v: Any) -> str | None:
        if v not in names:
            return f"unknown value {v!r}; valid: {', '.join(names)}"
        return None

    return check


def _source(v: Any) -> str | None:
    if isinstance(v, str) and any(v.startswith(p) and v[len(p) :].strip() for p in SOURCE_PREFIXES):
        return None
    if v in SOURCES:
        return None
    return (
        f"unknown value {v!r}; valid: {', '.join(SOURCES)}, hf:<hub id or directory>[#<config>], "
        "folder:<root>"
    )


def _text(v: Any) -> str | None:
    if not isinstance(v, str) or not v.strip():
        return f"must be a non-empty string, got {v!r}"
    return None


def _bool(v: Any) -> str | None:
    return None if isinstance(v, bool) else f"must be true or false, got {v!r}"


def _targets(v: Any) -> str | None:
    if not isinstance(v, (list, tuple)) or not all(isinstance(t, str) and t for t in v):
        return f"must be a list of layer-name patterns (empty = the default), got {v!r}"
    return None


# Field -> check. Fields absent from a config are skipped (per-backbone extras).
RULES_BY_FIELD: dict[str, Check] = {
    "model": _text,
    "backbone": _text,
    "kind": _one_of(KINDS),
    "task": _text,
    "method": _one_of(METHODS),
    "seed": _int(0),
    "dtype": _one_of(DTYPES),
    "param_dtype": _one_of(PARAM_DTYPES),
    "attention_impl": _one_of(ATTENTION_IMPLS),
    "lora.rank": _int(1),
    "lora.alpha": _float(0, strict=True),
    "lora.dropout": _float(0, strict=False, below=1),
    "lora.targets": _targets,
    "lora.init_b": _one_of(INIT_B),
    "optim.optimizer": _one_of(OPTIMIZERS),
    "optim.learning_rate": _float(0, strict=True),
    "optim.weight_decay": _float(0, strict=False),
    "optim.schedule": _one_of(SCHEDULES),
    "optim.warmup_steps": _int(0),
    "optim.clip_norm": _float(0, strict=False),
    "optim.grad_accum": _int(1),
    "steps": _int(1),
    "batch_size": _int(1),
    "log_every": _int(1),
    "eval_every": _int(0),
    "ckpt_every": _int(0),
    "tensorboard": _bool,
    "rng_impl": _one_of(RNG_IMPLS),
    "eval_batch_size": _int(1),
    "data.source": _source,
    "data.skip_corrupt": _bool,
    "data.workers": _int(0),
    "data.val_size": _int(0),
    "data.val_max": _int(0),
    "data.max_len": _int(1),
    "data.target_len": _int(1),
    "data.train_limit": _int(0),
    "data.eval_limit": _int(0),
    "data.image_size": _int(1),
    "mesh.data": _int(1, or_minus_one=True),
    "mesh.fsdp": _int(1, or_minus_one=True),
    "mesh.model": _int(1, or_minus_one=True),
    "mesh.rules": _one_of(RULES),
    "head_scale": _float(0, strict=True),
    "templates": _one_of(TEMPLATES),
    "image_mode": _one_of(IMAGE_MODES),
}


def _as_dict(config: Any) -> Mapping[str, Any]:
    return config.to_dict() if hasattr(config, "to_dict") else config


def _get(config: Mapping[str, Any], dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return _ABSENT
        node = node[part]
    return node


_ABSENT = object()
_REQUIRED = ("model", "backbone", "kind", "task", "method", "steps", "batch_size")


def _cross_field(c: Mapping[str, Any]) -> list[str]:
    problems = []
    warmup, steps = _get(c, "optim.warmup_steps"), _get(c, "steps")
    ints = all(isinstance(v, int) and not isinstance(v, bool) for v in (warmup, steps))
    if ints and 0 < steps <= warmup:
        problems.append(
            f"optim.warmup_steps={warmup} must be smaller than steps={steps} (the rate would "
            "never leave the warm-up)"
        )
    if _get(c, "method") == "l_lora_model" and _get(c, "attention_impl") == "cudnn":
        problems.append(
            "attention_impl='cudnn' cannot be used with method='l_lora_model' (the cuDNN "
            "kernel has no forward-mode derivative); use attention_impl='xla' or 'auto'"
        )
    return problems


def config_problems(config: Any) -> list[str]:
    """Every problem of ``config`` (a ConfigDict or nested dict), one string each."""
    c = _as_dict(config)
    problems = [f"{name} is missing" for name in _REQUIRED if _get(c, name) is _ABSENT]
    for name, check in RULES_BY_FIELD.items():
        value = _get(c, name)
        if value is not _ABSENT and (msg := check(value)) is not None:
            problems.append(f"{name} {msg}")
    return problems + _cross_field(c)


def validate_run_config(config: Any) -> None:
    """Raise one ``ConfigError`` listing every problem of ``config``; None when it is valid."""
    problems = config_problems(config)
    if problems:
        raise ConfigError(
            f"{len(problems)} problem(s) in the config: {'; '.join(problems)}. Fix them in the "
            "config file or with --config.<field>=<value>"
        )


def validate_fusion_names(names: Iterable[str], known: Iterable[str]) -> None:
    """Refuse unknown or repeated ``--fusion`` names (``known``: fusion.FUSION_METHODS)."""
    names, known = list(names), sorted(known)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(f"unknown fusion method(s) {unknown}; valid: {', '.join(known)}")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"fusion method(s) {repeated} given more than once")
