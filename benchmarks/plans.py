"""What a run measures: the presets (tiny, quick, default, full) and their overrides.

``default`` is about 9 minutes on one H100, compilation included (a T5-base train step
alone compiles for ~100 s): run it as two commands of ~5 minutes (``--only
torch_train,peak,train,pipeline`` and ``--only grid,disentangle,torch_grid``), or as one
with ``--budget-s`` (what is left when time runs out is skipped and recorded as such).
``full`` is the whole matrix of the issue (3 batch sizes × 4 methods × 2 precisions per
model, K sweeps on both models) and is meant to be run in parts (``--only``, ``--models``).
"""

from __future__ import annotations

import dataclasses
import itertools

from benchmarks.grid_bench import GridSettings
from benchmarks.train_bench import TrainCase

AREAS = ("peak", "train", "pipeline", "scaling", "grid", "disentangle", "torch_train", "torch_grid")
JAX_AREAS = ("peak", "train", "pipeline", "scaling", "grid", "disentangle")
TORCH_AREAS = ("torch_train", "torch_grid")
ALIASES = {"torch": TORCH_AREAS, "all": AREAS, "jax": JAX_AREAS}
METHODS = ("lora", "l_lora", "l_lora_model", "full")
PRECISIONS = ("bf16", "fp32")


@dataclasses.dataclass
class Plan:
    preset: str
    tiny: bool
    train: list[TrainCase]
    torch_train: list[TrainCase]
    grid: GridSettings
    warmup: int = 3
    repeats: int = 20
    torch_repeats: int = 10
    peak_n: int = 8192
    peak_repeats: int = 20
    pipeline_batch: dict = dataclasses.field(default_factory=lambda: {"clip": 128, "t5": 64})
    pipeline_batches: int = 20
    scaling_model: str = "clip"
    scaling_batch: int = 128  # per device
    compile_workers: int = 6
    lora_dropout: float = 0.1
    models: tuple[str, ...] = ("clip", "t5")
    grid_models: tuple[str, ...] = ("clip", "t5")  # the disentanglement grid is always T5

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["train"] = [c.name for c in self.train]
        d["torch_train"] = [c.name for c in self.torch_train]
        return d


def _cross(model, methods, precisions, batches) -> list[TrainCase]:
    return [
        TrainCase(model, m, p, b) for b, m, p in itertools.product(batches, methods, precisions)
    ]


def _main_matrix(clip_b: int, t5_b: int, extra: dict) -> list[TrainCase]:
    cases = _cross("clip", METHODS, PRECISIONS, [clip_b]) + _cross(
        "t5", METHODS, PRECISIONS, [t5_b]
    )
    for model, batches in extra.items():
        cases += _cross(model, ("lora", "l_lora"), ("bf16",), batches)
    return cases


def make_plan(preset: str) -> Plan:
    if preset == "tiny":
        train = _cross("clip", METHODS, ("fp32",), [2]) + _cross("t5", ("lora",), ("bf16",), [2])
        torch_train = _cross("clip", ("lora", "l_lora"), ("fp32",), [2]) + _cross(
            "t5", ("lora",), ("bf16",), [2]
        )
        grid = GridSettings(
            ks=(1, 9),
            n_examples=6,
            eval_batch=4,
            chunk=2,
            one_at_a_time=3,
            methods=("lora", "l_lora_model"),
            precision="fp32",
            grid_size=3,
            dis_examples=5,
            dis_batch=4,
            dis_chunk=3,
            dis_methods=("l_lora",),
            tau_scale=20.0,
            compile_workers=1,
        )
        return Plan(
            "tiny",
            True,
            train,
            torch_train,
            grid,
            warmup=1,
            repeats=3,
            torch_repeats=2,
            peak_n=256,
            peak_repeats=3,
            pipeline_batch={"clip": 2, "t5": 2},
            pipeline_batches=3,
            scaling_batch=2,
            compile_workers=1,
            grid_models=("clip",),
        )
    if preset == "quick":
        train = (
            _cross("clip", ("lora", "l_lora"), ("bf16",), [128])
            + _cross("clip", ("lora",), ("bf16",), [256])
            + _cross("t5", ("lora", "l_lora"), ("bf16",), [64])
        )
        grid = GridSettings(
            ks=(1, 21),
            n_examples=256,
            methods=("lora", "l_lora_model"),
            dis_examples=128,
            dis_methods=("l_lora_model",),
        )
        return Plan(
            "quick",
            False,
            train,
            list(train),
            grid,
            repeats=10,
            torch_repeats=5,
            pipeline_batches=10,
            grid_models=("clip",),
        )
    if preset == "default":
        train = (
            _cross("clip", METHODS, ("bf16",), [128])
            + _cross("clip", ("lora", "l_lora"), ("fp32",), [128])
            + _cross("clip", ("lora", "l_lora"), ("bf16",), [256])
            + _cross("t5", ("lora", "l_lora"), ("bf16",), [64])
        )
        # The T5 merge grid is measured through the 21×21 disentanglement grid (the same
        # evaluator at 2×(441+21) models); the K sweep runs on CLIP.
        return Plan(
            "default",
            False,
            train,
            list(train),
            GridSettings(),
            repeats=15,
            torch_repeats=8,
            grid_models=("clip",),
        )
    if preset == "full":
        train = _cross("clip", METHODS, PRECISIONS, [64, 128, 256]) + _cross(
            "t5", METHODS, PRECISIONS, [16, 64, 256]
        )
        grid = GridSettings(
            methods=("lora", "l_lora", "l_lora_model"),
            dis_methods=("lora", "l_lora", "l_lora_model"),
        )
        return Plan("full", False, train, list(train), grid, compile_workers=6)
    raise ValueError(f"unknown preset {preset!r}; valid: tiny, quick, default, full")


def resolve_areas(only: str | None) -> list[str]:
    if not only:
        return list(AREAS)
    out: list[str] = []
    for part in only.split(","):
        part = part.strip()
        names = ALIASES.get(part, (part,))
        for n in names:
            if n not in AREAS:
                raise ValueError(
                    f"unknown benchmark area {n!r}; valid: {', '.join(AREAS + tuple(ALIASES))}"
                )
            if n not in out:
                out.append(n)
    return out


def filter_models(plan: Plan, models: list[str] | None) -> Plan:
    if not models:
        return plan
    keep = lambda cases: [c for c in cases if c.model in models]  # noqa: E731
    return dataclasses.replace(
        plan,
        train=keep(plan.train),
        torch_train=keep(plan.torch_train),
        models=tuple(m for m in plan.models if m in models),
        grid_models=tuple(m for m in plan.grid_models if m in models),
    )
