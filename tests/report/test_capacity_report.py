"""The capacity report's statistics on hand-made blocks, against hand computations."""

import json

import numpy as np
import pytest

from llora_jax.report import capacity, capacity_stats

TASKS = ["a", "b", "c"]
SINGLE = {"a": 0.8, "b": 0.6, "c": 0.9}
BASE = {"a": 0.5, "b": 0.59, "c": 0.5}  # b does not learn (+1 point)


def _results(method, scores, space="adapter"):
    """scores: {subset key: {seed: {task: test}}} for task_arithmetic."""
    eye = np.eye(3)
    cos = [[1, 0.1, 0.2], [0.1, 1, 0.3], [0.2, 0.3, 1]]
    return {
        "merge_space": space,
        "primary_metric": {t: "accuracy" for t in TASKS},
        "baseline": {t: {"accuracy": v} for t, v in BASE.items()},
        "single": {
            method: {
                t: {s: {"test": {"accuracy": v}} for s in ("0", "1")} for t, v in SINGLE.items()
            }
        },
        "fusion": {
            method: {
                "task_arithmetic": {
                    k: {s: {"test": e} for s, e in by_seed.items()} for k, by_seed in scores.items()
                }
            }
        },
        "multitask": {},
        "cosine": {
            method: {s: {"tasks": TASKS, "matrix": cos, "delta_w_matrix": cos} for s in ("0", "1")}
        },
        "isolation_overlap": {
            method: {s: {"tasks": TASKS, "matrix": eye.tolist()} for s in ("0", "1")}
        },
    }


def _scores(shift):
    return {
        "a+b": {"0": {"a": 0.8 - shift, "b": 0.6}, "1": {"a": 0.7 - shift, "b": 0.6}},
        "a+c": {"0": {"a": 0.6 - shift, "c": 0.9}, "1": {"a": 0.8 - shift, "c": 0.9}},
        "a+b+c": {
            "0": {"a": 0.4 - shift, "b": 0.3, "c": 0.9},
            "1": {"a": 0.4 - shift, "b": 0.3, "c": 0.9},
        },
    }


def test_block_rows_by_hand():
    rows = capacity_stats.block_rows(_results("l_lora", _scores(0.0)), "l_lora")
    assert rows["not_learning"] == ["b"]
    n2 = rows["lines"]["task_arithmetic"][2]["0"]
    # seed 0, n = 2: subsets a+b (0.8/0.8, 0.6/0.6) and a+c (0.6/0.8, 0.9/0.9).
    assert n2["normalized"] == pytest.approx(np.mean([np.mean([1, 1]), np.mean([0.75, 1])]))
    assert n2["normalized_learning"] == pytest.approx(np.mean([1.0, np.mean([0.75, 1])]))
    above = np.mean([np.mean([1.0, 1.0]), np.mean([(0.6 - 0.5) / 0.3, 1.0])])
    assert n2["baseline_normalized"] == pytest.approx(above)
    # Cosine of the subsets of size 2 (a+b: 0.1, a+c: 0.2) and 3 (mean 0.2).
    assert rows["cosine"][2]["0"] == pytest.approx(0.15)
    assert rows["cosine"][3]["1"] == pytest.approx(0.2)
    assert rows["cosine_adapter"][2]["0"] == pytest.approx(0.15)
    dw = capacity_stats.block_rows(_results("l_lora", _scores(0.0), "delta_w"), "l_lora")
    assert dw["cosine_adapter"] == {}


def test_paired_gap_and_verdict():
    shared = capacity_stats.block_rows(_results("l_lora", _scores(0.1)), "l_lora")
    own = capacity_stats.block_rows(_results("l_lora", _scores(0.0)), "l_lora")
    gap = capacity_stats.paired_gap(
        shared["per_subset"]["task_arithmetic"], own["per_subset"]["task_arithmetic"]
    )
    # Only task a moves: −0.1/2 per pair at n = 2, −0.1/3 at n = 3; 4 and 2 pairs.
    assert gap[2]["mean"] == pytest.approx(-0.05) and gap[2]["pairs"] == 4
    assert gap[3]["mean"] == pytest.approx(-0.1 / 3) and gap[3]["pairs"] == 2
    assert gap[3]["low"] == pytest.approx(gap[3]["high"])  # identical pairs
    larger = {3: {"mean": -0.01, "low": -0.02, "high": 0.0, "pairs": 2}}
    assert capacity_stats.verdict(gap, larger) == "inconclusive"  # G rises with n here
    falling = {
        2: {"mean": -0.01, "low": -0.02, "high": -0.005, "pairs": 4},
        3: {"mean": -0.05, "low": -0.06, "high": -0.04, "pairs": 4},
    }
    assert capacity_stats.verdict(falling, larger) == "holds"
    assert capacity_stats.verdict(falling, {3: {"mean": -0.09}}) == "inconclusive"
    up = {3: {"mean": 0.05, "low": 0.01, "high": 0.09, "pairs": 4}}
    assert capacity_stats.verdict(up, None) == "refuted"
    one = {3: {"mean": -0.05, "low": None, "high": None, "pairs": 1}}
    assert capacity_stats.verdict(one, None).startswith("inconclusive")


def test_largest_n_above():
    by_n = {
        2: {"normalized": {"mean": 0.95}},
        3: {"normalized": {"mean": 0.91}},
        4: {"normalized": {"mean": 0.85}},
        5: {"normalized": {"mean": 0.95}},
    }
    assert capacity_stats.largest_n_above(by_n) == 3
    assert capacity_stats.largest_n_above({2: {"normalized": {"mean": 0.5}}}) is None


def test_report_files(tmp_path):
    collected = {"study": "t", "blocks": {}}
    for r in (4, 16):
        for arm, shift in (("l_lora", 0.1), ("l_lora_a0", 0.0)):
            collected["blocks"][f"{arm}_r{r}"] = {
                "labels": {"arm": arm, "rank": r, "method": "l_lora"},
                "results": _results(
                    "l_lora", _scores(shift), "delta_w" if "a0" in arm else "adapter"
                ),
            }
    path = capacity.write_capacity_report(collected, tmp_path)
    text = path.read_text()
    assert "Tasks that do not learn: b." in text and "## Shared-A0 prediction" in text
    s = json.loads((tmp_path / "capacity_summary.json").read_text())
    assert s["shared_a0_gap"]["task_arithmetic"]["4"]["2"]["mean"] == pytest.approx(-0.05)
    for f in (
        "capacity_score_r4.png",
        "capacity_cosine.png",
        "capacity_overlap.png",
        "capacity_gap.png",
    ):
        assert (tmp_path / f).stat().st_size > 1000
