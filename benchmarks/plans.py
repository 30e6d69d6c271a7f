"""What a run measures: the presets and their overrides.

Presets: ``tiny``, ``quick``, ``default``, ``full``, and three GPU plans named by what they
measure: ``gpu_t5_and_scaling`` (T5 train steps and their PEFT twins, merge and
disentanglement grids, multi-GPU scaling), ``gpu_vit_attention`` (ViT-B/16 with XLA vs cuDNN
attention, CLIP grids, the input pipeline) and ``gpu_train_matrix`` (the rest of the
train-step matrix). Committed results before 2026-12-05 name them issue8 / issue8b / issue8c.

``default`` is about 9 minutes on one H100, compilation included (a T5-base train step
alone compiles for ~100 s): run it as two commands of ~5 minutes (``--only
torch_train,peak,train,pipeline`` and ``--only grid,disentangle,torch_grid``), or as one
with ``--budget-s`` (what is left when time runs out is skipped and recorded as such).
``full`` is the whole matrix of the issue (3 batch sizes × 4 methods × 2 precisions per
model, K sweeps on both models) and is meant to be run in parts (``--only``, ``--models``).
``gpu_t5_and_scaling`` is what issue #8 still lacks, in priority order (the first cases of each area
matter most; a time budget cuts the tail): ``--only torch_grid,disentangle,grid``,
``--only peak,torch_train,train,pipeline`` (one H100 call each) and ``--only scaling``
(2 GPUs). ``shrink`` turns any preset into its tiny CPU twin (``--preset X --tiny``).
"""

from __future__ import annotations

import dataclasses
import itertools

from benchmarks.grid_bench import GridSettings
from benchmarks.scaling_bench import ScalingSpec
from benchmarks.train_bench import TrainCase

AREAS = ("peak", "train", "pipeline", "scaling", "disentangle", "grid", "torch_train", "torch_grid")
JAX_AREAS = ("peak", "train", "pipeline", "scaling", "disentangle", "grid")
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
    scaling: list[ScalingSpec] = dataclasses.field(
        default_factory=lambda: [ScalingSpec("clip", "lora", "bf16", 128, "dp")]
    )
    compile_workers: int = 6
    train_waves: tuple[int, ...] = ()  # compile-wave sizes (last repeated); () = all at once
    rng_impl: str = "rbg"  # dropout PRNG of the train steps (as llora_jax.train's loop)
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
            dis_one_at_a_time=3,
            tau_scale=20.0,
            compile_workers=1,
            big_k=9,
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
            scaling=[
                ScalingSpec("clip", "lora", "fp32", 2, "dp"),
                ScalingSpec("t5l", "lora", "fp32", 2, "fsdp", (2,)),
            ],
            compile_workers=1,
            train_waves=(2, 3),
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
    if preset == "gpu_t5_and_scaling":
        return _gpu_t5_and_scaling()
    if preset == "gpu_vit_attention":
        return _gpu_vit_attention()
    if preset == "gpu_train_matrix":
        return _gpu_train_matrix()
    if preset.startswith("target_"):
        from benchmarks import gpu_target_plans  # imports Plan from here: not at module level

        return gpu_target_plans.make(preset)
    raise ValueError(f"unknown preset {preset!r}; valid: {', '.join(PRESETS)}")


PRESETS = (
    "tiny",
    "quick",
    "default",
    "full",
    "gpu_t5_and_scaling",
    "gpu_vit_attention",
    "gpu_train_matrix",
    "target_vit",
    "target_t5",
    "target_dis",
    "target_clip_grid",
)


def _gpu_t5_and_scaling() -> Plan:
    """What issue #8 still lacks (after the CLIP train steps of the first H100 run)."""
    t5 = lambda precisions, batches: _cross("t5", METHODS, precisions, batches)  # noqa: E731
    train = (
        # wave 1 (5 compiles): the T5 methods at the main config, and the CLIP step that the
        # input-pipeline benchmark feeds (its end-to-end rate)
        t5(("bf16",), [64])
        + [TrainCase("clip", "lora", "bf16", 128)]
        # wave 2: fp32 at the main batch, bf16 at the largest; wave 3: batch 16; wave 4: rest
        + t5(("fp32",), [64])
        + t5(("bf16",), [256])
        + t5(("bf16", "fp32"), [16])
        + t5(("fp32",), [256])
    )
    # The PEFT twins: the four methods at the main config, then lora/l_lora elsewhere.
    torch_train = (
        t5(("bf16",), [64])
        + _cross("t5", ("lora", "l_lora"), ("fp32",), [64])
        + _cross("t5", ("lora",), ("bf16",), [16, 256])
    )
    grid = GridSettings(
        ks=(1, 21, 441),
        n_examples=1024,
        methods=("lora", "l_lora_model"),
        dis_methods=("l_lora_model", "l_lora"),  # the linear shortcut first: seconds
        dis_one_at_a_time=21,
        compile_workers=8,
    )
    # T5-large without dropout: the FSDP numbers are about sharded weights and their
    # all-gathers, and dropout bits were about half a T5 step's compile time.
    scaling = [
        ScalingSpec("clip", "lora", "bf16", 128, "dp", (1, 2)),
        ScalingSpec("t5l", "lora", "bf16", 64, "fsdp", (2,), dropout=0.0),
        ScalingSpec("t5l", "lora", "bf16", 64, "dp", (1, 2), dropout=0.0),
    ]
    return Plan(
        "gpu_t5_and_scaling",
        False,
        train,
        torch_train,
        grid,
        repeats=15,
        torch_repeats=8,
        scaling=scaling,
        compile_workers=8,
        train_waves=(5, 8),
        grid_models=("t5", "clip"),
    )


def _gpu_vit_attention() -> Plan:
    """What the ``gpu_t5_and_scaling`` runs left (session 3): the JAX T5-base train steps of every method
    (issue #5), the fused cuDNN attention against XLA's on ViT-B/16 (MFU, the PEFT ratio), the
    CLIP merge grids and the input pipeline; one H100 call:
    ``--only torch_train,train,pipeline,grid``. Scaling as in ``gpu_t5_and_scaling``."""
    plan = _gpu_t5_and_scaling()
    clip256 = lambda m, a="auto": TrainCase("clip", m, "bf16", 256, a)  # noqa: E731
    train = (
        # wave 1 (5): T5-base's four methods + the CLIP step the pipeline benchmark feeds
        _cross("t5", METHODS, ("bf16",), [64])
        + [TrainCase("clip", "lora", "bf16", 128)]
        # wave 2 (4): ViT-B/16 b256, XLA attention (same-run reference) vs cuDNN flash
        # (l_lora_model's jvp cannot go through the cuDNN kernel)
        + [clip256("lora"), clip256("lora", "cudnn"), clip256("l_lora", "cudnn")]
        + [clip256("full", "cudnn")]
        # then what the budget allows
        + _cross("t5", METHODS, ("bf16",), [256])
        + _cross("t5", METHODS, ("fp32",), [64])
    )
    torch_train = _cross("clip", ("lora", "l_lora"), ("bf16",), [256])
    return dataclasses.replace(
        plan,
        preset="gpu_vit_attention",
        train=train,
        torch_train=torch_train,
        train_waves=(5, 4),
        grid_models=("clip",),
    )


def _gpu_train_matrix() -> Plan:
    """The train-step matrix that ``gpu_t5_and_scaling``/``gpu_vit_attention`` left (``--only train``, one H100
    call): T5-base at batch 256 and fp32, CLIP fp32, then batch 16 / 64."""
    t5_rest = ("l_lora", "l_lora_model", "full")
    train = (
        # wave 1 (8)
        _cross("t5", METHODS, ("bf16",), [256])
        + _cross("t5", t5_rest, ("fp32",), [64])
        + [TrainCase("clip", "lora", "fp32", 128)]
        # wave 2 (8)
        + _cross("clip", ("l_lora", "l_lora_model", "full"), ("fp32",), [128])
        + _cross("t5", METHODS, ("bf16",), [16])
        + [TrainCase("clip", "lora", "bf16", 64)]
    )
    return dataclasses.replace(
        _gpu_t5_and_scaling(),
        preset="gpu_train_matrix",
        train=train,
        torch_train=[],
        train_waves=(8,),
    )


def _tiny_batch(b: int) -> int:
    return max(1, b // 32)


def shrink(plan: Plan) -> Plan:
    """The same plan (cases, methods, orders, waves) at tiny sizes, for a CPU dry run."""
    tb = lambda cases: [dataclasses.replace(c, batch=_tiny_batch(c.batch)) for c in cases]  # noqa: E731
    g = plan.grid
    tiny_g = 3

    def k_tiny(k: int) -> int:
        return 1 if k == 1 else (tiny_g * tiny_g if k >= g.grid_size**2 else tiny_g)

    grid = dataclasses.replace(
        g,
        ks=tuple(dict.fromkeys(k_tiny(k) for k in g.ks)),
        n_examples=6,
        eval_batch=4,
        chunk=2,
        one_at_a_time=3,
        precision="fp32",
        grid_size=tiny_g,
        dis_examples=5,
        dis_batch=4,
        dis_chunk=3,
        dis_one_at_a_time=3,
        tau_scale=20.0,
        compile_workers=min(g.compile_workers, 2),
        big_k=tiny_g * tiny_g,
    )
    return dataclasses.replace(
        plan,
        preset=f"{plan.preset}-tiny",
        tiny=True,
        train=tb(plan.train),
        torch_train=tb(plan.torch_train),
        grid=grid,
        warmup=1,
        repeats=3,
        torch_repeats=2,
        peak_n=256,
        peak_repeats=3,
        pipeline_batch={m: _tiny_batch(b) for m, b in plan.pipeline_batch.items()},
        pipeline_batches=3,
        scaling=[
            dataclasses.replace(s, per_device_batch=_tiny_batch(s.per_device_batch))
            for s in plan.scaling
        ],
        compile_workers=min(plan.compile_workers, 2),
    )


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
        scaling=[s for s in plan.scaling if s.model in models],
    )
