"""Presets of issue 22 (fused attention by default): one GPU call per target.

Each preset is one target of the issue, measured with its same-run references (PEFT's step,
the bf16 matmul peak, and where it helps the XLA attention of before). Run them with
``python -m benchmarks.gpu_targets TARGET`` (which calls ``benchmarks.run`` with the areas and
budget below); ``benchmarks/NOTES.md`` ("Issue 22") gives the order and the predictions.
"""

from __future__ import annotations

from benchmarks.grid_bench import GridSettings
from benchmarks.plans import Plan
from benchmarks.train_bench import TrainCase

# target -> (preset, areas for --only, --budget-s): every call ends well inside 10 minutes.
TARGETS: dict[str, tuple[str, str, int]] = {
    "vit": ("target_vit", "peak,torch_train,train", 420),
    "dis": ("target_dis", "peak,disentangle", 420),
    "clip_grid": ("target_clip_grid", "peak,torch_grid,grid", 420),
    "t5": ("target_t5", "peak,torch_train,train", 420),
}


def _clip(method: str, batch: int, attention: str = "auto") -> TrainCase:
    return TrainCase("clip", method, "bf16", batch, attention)


def vit() -> Plan:
    """ViT-B/16 LoRA bf16: b128 against PEFT (target ≥ 2×), b256 MFU (≥ 50%), l_lora / lora
    time and memory (≤ 1.05×) at both; the XLA attention of before at b128, same run."""
    train = [
        _clip("lora", 128),
        _clip("l_lora", 128),
        _clip("lora", 256),
        _clip("l_lora", 256),
        _clip("lora", 128, "xla"),
    ]
    torch_train = [_clip("lora", 128), _clip("lora", 256)]
    return Plan(
        "target_vit",
        False,
        train,
        torch_train,
        GridSettings(),
        repeats=20,
        torch_repeats=10,
        compile_workers=5,
        train_waves=(5,),
        models=("clip",),
        grid_models=("clip",),
    )


def t5() -> Plan:
    """Flan-T5-base LoRA bf16 b64 against PEFT (keep ≥ 6×), l_lora / lora (≤ 1.05×)."""
    train = [TrainCase("t5", m, "bf16", 64) for m in ("lora", "l_lora")]
    return Plan(
        "target_t5",
        False,
        train,
        [TrainCase("t5", "lora", "bf16", 64)],
        GridSettings(),
        repeats=20,
        torch_repeats=8,
        compile_workers=2,
        train_waves=(2,),
        models=("t5",),
        grid_models=("t5",),
    )


def dis() -> Plan:
    """Flan-T5-base 21×21 ``l_lora`` disentanglement grid on 2 × 640 examples (≤ 60 s)."""
    grid = GridSettings(dis_methods=("l_lora",), dis_one_at_a_time=21, compile_workers=4)
    return Plan("target_dis", False, [], [], grid, models=("t5",), grid_models=("t5",))


def clip_grid() -> Plan:
    """CLIP merge grid, ``lora``: one model at a time against PEFT's (no slower), batched
    K = 21 / 441 (their MFU)."""
    grid = GridSettings(ks=(1, 21, 441), methods=("lora",), one_at_a_time=21, compile_workers=4)
    return Plan(
        "target_clip_grid",
        False,
        [],
        [],
        grid,
        torch_repeats=5,
        models=("clip",),
        grid_models=("clip",),
    )


PRESETS = {"target_vit": vit, "target_t5": t5, "target_dis": dis, "target_clip_grid": clip_grid}


def make(preset: str) -> Plan:
    return PRESETS[preset]()
