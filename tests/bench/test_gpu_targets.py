"""Issue 22's GPU targets: presets, commands, the floors table and the target report."""

from __future__ import annotations

import json

import pytest

from benchmarks import gpu_target_floors, gpu_target_report, gpu_targets, plans
from benchmarks.gpu_target_plans import TARGETS


def test_every_target_is_a_preset_with_unique_names_and_torch_twins():
    for preset, areas, budget in TARGETS.values():
        assert preset in plans.PRESETS and budget <= 480  # one call, well inside 10 minutes
        plan = plans.make_plan(preset)
        names = [c.name for c in plan.train]
        assert len(set(names)) == len(names)
        assert {c.name for c in plan.torch_train} <= set(names)
        assert not any(c.method == "l_lora_model" for c in plan.train)
        assert all(a in plans.AREAS for a in plans.resolve_areas(areas))
        tiny = plans.shrink(plan)
        assert [c.method for c in tiny.train] == [c.method for c in plan.train]
    vit = {c.name for c in plans.make_plan("target_vit").train}
    assert {
        "train/clip/lora/bf16/b128",
        "train/clip/l_lora/bf16/b256",
        "train/clip/lora/bf16/b128/attn-xla",  # the default of before, same run
    } <= vit
    assert plans.make_plan("target_dis").grid.dis_methods == ("l_lora",)
    assert gpu_targets.command("dis", "/o", tiny=False) == [
        "--preset", "target_dis", "--only", "peak,disentangle", "--budget-s", "420", "--out", "/o",
    ]  # fmt: skip


def test_floors_agree_with_the_counts_of_before():
    rows = {r["what"]: r for r in gpu_target_floors.rows()}
    # benchmarks/NOTES.md: 9.14 TFLOP a ViT-B/16 LoRA step at b128, 20.1 PFLOP the T5 grid.
    assert rows["ViT-B/16 lora bf16 b128 (step)"]["flops"] == pytest.approx(9.14e12, rel=0.01)
    assert rows[gpu_target_report.DIS_NAME]["flops"] == pytest.approx(20.1e15, rel=0.01)
    k21 = rows["CLIP merge grid, batched K = 21"]["flops"]
    assert k21 == pytest.approx(21 * rows["CLIP merge grid, 1 model x 1024 images"]["flops"])


def _m(name, median, derived=None, ratios=None):
    return {"name": name, "median": median, "error": None, "derived": derived or {},
            "ratios": ratios or {}}  # fmt: skip


def test_report_reads_the_targets_and_judges_them(tmp_path, capsys):
    peak = _m("peak/matmul/bf16", 1.0, {"flop_per_s": 600e12})
    vit = [
        _m("torch_train/clip/lora/bf16/b128", 0.064),
        _m("train/clip/lora/bf16/b128", 0.030, {"peak_bytes": 100}),
        _m("train/clip/l_lora/bf16/b128", 0.0318, {"peak_bytes": 100}),  # 1.06: a miss
        _m("train/clip/lora/bf16/b256", 0.06, {"mfu_analytic": 0.51}),
        _m("disentangle/t5/l_lora/G21", 50.0),
    ]
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "x.json").write_text(json.dumps({"measurements": [peak, *vit]}))
    check = {"all_pass": True, "auto_resolves_to": "cudnn", "cases": []}
    (tmp_path / "attention_check.json").write_text(json.dumps(check))
    ms, special = gpu_target_report.load([str(tmp_path)])
    got = {name: value for name, value, _, _ in gpu_target_report.targets(ms, special)}
    assert got["ViT-B/16 lora b128: PEFT step / ours"] == pytest.approx(0.064 / 0.030)
    assert got["ViT-B/16 b128: l_lora / lora time"] == pytest.approx(1.06)
    assert got["T5 disentanglement: MFU (reported)"] == pytest.approx(
        20.086e15 / 50 / 600e12, rel=0.01
    )
    assert got["Flan-T5-base lora b64: PEFT step / ours"] is None
    gpu_target_report.main([str(tmp_path)])
    table = capsys.readouterr().out
    assert "| ViT-B/16 lora b128: PEFT step / ours | 2.13 | >= 2 | pass |" in table
    assert "| ViT-B/16 b128: l_lora / lora time | 1.06 | <= 1.05 | miss |" in table
    assert "| attention check: auto is cudnn and equals XLA | 1 | >= 1 | pass |" in table
    assert "| stream pipeline: step / device-resident step | - | <= 1.02 | not measured |" in table
