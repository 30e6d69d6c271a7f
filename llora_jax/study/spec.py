"""A study's typed spec: every field and its default, in one place, and one way to set fields.

A study file (``experiments/<study>/study.py``) defines ``get_study(arg)`` returning a
``StudySpec`` (``base_study`` gives the paper's defaults; the file changes what differs).
From the command line every field is set with one flag syntax, ``--set field=value``
(the value a Python / JSON literal, else a string), and a fine-tuning config field with
``--set config.<dotted.key>=value`` (appended to ``overrides``). A misspelled field is
refused with the nearest valid names, and so is an attribute assigned in a study file
(the spec has ``__slots__``).
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
from typing import Any

from llora_jax.errors import UserError

DEFAULT_FUSION = ("average", "task_arithmetic", "ties", "dare", "lorahub", "isolation")
MERGE_SPACES = ("adapter", "delta_w")
DEFAULT_GRID = tuple(round(-2.0 + 0.2 * i, 1) for i in range(21))


class StudySpecError(UserError, ValueError):
    """A study field that does not exist or has a value of the wrong kind."""


@dataclasses.dataclass(slots=True)
class StudySpec:
    """Everything a study runs. Sequences may be given as lists; they are compared as values.

    name, config (a configs/*.py file), config_arg (its get_config argument), overrides
    ((dotted config key, value) pairs); tasks (named explicitly: a data directory may hold
    many more); methods, seeds, learning_rates (one sweep for every method; the best per
    run on validation), lr_sweep_seeds (sweep on these seeds only and reuse the choice per
    (method, task); () = every seed), learning_rate_choice (method -> task -> rate: no
    sweep), analysis_seeds (fuse and disentangle these; () = all); fusion, fusion_subsets
    (name -> "all" | "pairs+full" | "full"), fusion_grids (name -> list of hparam dicts;
    absent = the method's default grid), max_subset (0 = every size), lorahub_budget,
    isolation_p; pairs, disentangle_grid, disentangle_examples; eval_batch_size, eval_chunk
    (merged models per vmapped call), group_size (runs of one method trained at once by
    one vmapped step; 1 = one at a time, the only path with Orbax mid-run checkpoints),
    progress, out (default output folder; "" = runs/<name>).
    """

    name: str
    config: str
    config_arg: str = ""
    overrides: tuple = ()
    tasks: list = dataclasses.field(default_factory=list)
    methods: list = dataclasses.field(
        default_factory=lambda: ["full", "lora", "l_lora", "l_lora_model"]
    )
    seeds: list = dataclasses.field(default_factory=lambda: [0, 1, 2])
    learning_rates: list = dataclasses.field(default_factory=lambda: [1e-4])
    lr_sweep_seeds: list = dataclasses.field(default_factory=list)
    learning_rate_choice: dict = dataclasses.field(default_factory=dict)
    analysis_seeds: list = dataclasses.field(default_factory=list)
    fusion: list = dataclasses.field(default_factory=lambda: list(DEFAULT_FUSION))
    fusion_subsets: dict = dataclasses.field(default_factory=dict)
    fusion_grids: dict = dataclasses.field(default_factory=dict)
    max_subset: int = 0
    subset_sizes: list = dataclasses.field(default_factory=list)
    exhaustive_up_to: int | None = None
    subsets_per_size: int = 10
    subset_seed: int | None = None
    merge_space: str = "adapter"
    multitask: dict = dataclasses.field(default_factory=dict)
    frozen_tuning: dict = dataclasses.field(default_factory=dict)
    lorahub_budget: int = 40
    isolation_p: float = 0.1
    pairs: list = dataclasses.field(default_factory=list)
    disentangle_grid: list = dataclasses.field(default_factory=lambda: list(DEFAULT_GRID))
    disentangle_examples: int = 640
    eval_batch_size: int = 128
    eval_chunk: int = 8
    group_size: int = 12
    progress: bool = True
    out: str = ""


FIELDS = tuple(f.name for f in dataclasses.fields(StudySpec))


def base_study(name: str, config: str, config_arg: str = "") -> StudySpec:
    """A study with the paper's defaults; a study file changes what differs."""
    return StudySpec(name=name, config=config, config_arg=config_arg)


def tiny_study(
    s: StudySpec, tasks: list[str], method: str, fusion: str, grid: list[dict]
) -> StudySpec:
    """Shrink a study to a seconds-long smoke test (used by the tests)."""
    s.name = f"{s.name}_tiny"
    s.config_arg = ",".join(a for a in (s.config_arg, "tiny") if a)
    s.overrides = ()
    s.tasks = tasks
    s.methods = [method]
    s.seeds = [0]
    s.learning_rates = [1e-3]
    s.fusion = [fusion]
    s.fusion_grids = {fusion: grid}
    s.pairs = [tuple(tasks[:2])]
    s.disentangle_grid = [0.0, 1.0]
    s.disentangle_examples = 8
    s.eval_batch_size = 8
    s.progress = False
    return s


def parse_value(raw: str) -> Any:
    """A Python / JSON literal ("10", "[0, 1]", "{'a': 1}", "true"), else the string itself."""
    text = {"true": "True", "false": "False", "null": "None"}.get(raw.strip(), raw)
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return raw


def _suggest(name: str, valid: tuple[str, ...]) -> str:
    near = difflib.get_close_matches(name, valid, n=3)
    return f" (did you mean {', '.join(near)}?)" if near else f"; valid fields: {', '.join(valid)}"


def set_fields(s: StudySpec, items: list[str]) -> StudySpec:
    """Apply ``--set`` items ("field=value" or "config.dotted.key=value") to ``s``, in order."""
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise StudySpecError(f"--set {item!r}: expected field=value, e.g. --set seeds=[0,1]")
        value = parse_value(raw)
        if key.startswith("config."):
            s.overrides = (*tuple(s.overrides), (key[len("config.") :], value))
            continue
        if key not in FIELDS:
            raise StudySpecError(
                f"--set {item!r}: the study has no field {key!r}" + _suggest(key, FIELDS)
            )
        setattr(s, key, value)
    check(s)
    return s


def check(s: StudySpec) -> None:
    """Refuse a spec that cannot run, before anything loads."""
    if not isinstance(s, StudySpec):
        raise StudySpecError(
            f"get_study() must return a StudySpec (base_study(...)), got {type(s).__name__}"
        )
    if not s.tasks:
        raise StudySpecError(
            f"study {s.name!r} names no tasks: list them (tasks=[...] in the study file, or "
            "--set tasks=['sst2','cola']); a data directory may hold many more tasks than a "
            "study should enumerate subsets of"
        )
    for name in ("methods", "seeds", "learning_rates", "fusion"):
        if not isinstance(getattr(s, name), (list, tuple)):
            raise StudySpecError(f"study field {name!r} must be a list, got {getattr(s, name)!r}")
    if s.merge_space not in MERGE_SPACES:
        raise StudySpecError(
            f"study field 'merge_space' must be one of {MERGE_SPACES}, got {s.merge_space!r}"
        )
    for name in ("exhaustive_up_to", "subset_seed"):
        value = getattr(s, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise StudySpecError(f"study field {name!r} must be an integer or None, got {value!r}")
    for name in (
        "eval_batch_size",
        "eval_chunk",
        "group_size",
        "disentangle_examples",
        "subsets_per_size",
    ):
        value = getattr(s, name)
        if not isinstance(value, int) or value < 1:
            raise StudySpecError(f"study field {name!r} must be a positive integer, got {value!r}")
