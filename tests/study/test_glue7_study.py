"""The seven-task cosine test: its blocks, the paired comparison over seeds, the tiny form."""

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from llora_jax.report.cosine_test import paired_seeds
from llora_jax.study.finetune import load_module
from tests.conftest import data_dir
from tests.study.test_capacity_study import bert  # noqa: F401 - the tiny BERT fixture

ROOT = Path(__file__).resolve().parents[2]


def _mod():
    return load_module(ROOT / "experiments/glue7/study.py", "glue7_study")


def test_paired_seeds_is_a_t_interval_over_seed_differences():
    a = {"0": 0.042, "1": 0.040, "2": 0.044}
    b = {"0": 0.033, "1": 0.032, "2": 0.034, "9": 0.5}  # seed 9 unpaired: left out
    got = paired_seeds(a, b)
    d = np.array([0.009, 0.008, 0.010])
    lo, hi = stats.t.interval(0.95, 2, loc=d.mean(), scale=d.std(ddof=1) / np.sqrt(3))
    assert got["seeds"] == 3 and got["mean"] == pytest.approx(d.mean())
    assert (got["low"], got["high"]) == pytest.approx((lo, hi))
    assert got["verdict"] == "refuted"  # L-LoRA's cosine is higher on every seed
    assert paired_seeds(b, a)["verdict"] == "supported"
    assert paired_seeds({"0": 1.0}, {"0": 0.0})["verdict"].startswith("inconclusive")
    assert paired_seeds({"0": 0.1, "1": 0.0}, {"0": 0.0, "1": 0.1})["verdict"] == "inconclusive"
    # A wide spread over 3 seeds: the same sign every time is not enough.
    wide = paired_seeds({"0": 0.042, "1": 0.040, "2": 0.045}, {"0": 0.033, "1": 0.036, "2": 0.030})
    assert wide["low"] < 0 < wide["high"] and wide["verdict"] == "inconclusive"


def test_full_form_blocks_match_the_design():
    blocks = {b.name: b.spec for b in _mod().blocks("full")}
    assert list(blocks) == ["main", "a0", "b0", "long"]
    for s in blocks.values():
        assert s.tasks == ["cola", "mnli", "mrpc", "qqp", "rte", "sst2", "stsb"]
        assert s.methods == ["lora", "l_lora"] and s.seeds == [0, 1, 2, 3, 4]
        over = dict(s.overrides)
        assert (over["lora.rank"], over["lora.alpha"]) == (16, 32.0)
    over = {k: dict(s.overrides) for k, s in blocks.items()}
    assert over["a0"]["lora.a0"] == "per_task" and blocks["a0"].merge_space == "delta_w"
    assert over["b0"]["lora.init_b"] == "normal"
    assert over["long"]["steps"] == 4 * over["main"]["steps"]
    assert over["long"]["optim.warmup_steps"] == 4 * over["main"]["optim.warmup_steps"]


def test_glue7_tiny_form(tmp_path, bert):  # noqa: F811
    out = tmp_path / "g7"
    sets = [f"config.backbone={bert}", f"config.data.data_dir={data_dir()}"]
    _mod().main(["tiny", "--out", str(out), *[f"--set={x}" for x in sets]])
    s = json.loads((out / "cosine_test_summary.json").read_text())
    assert set(s["blocks"]) == {"main", "a0"}
    main = s["blocks"]["main"]["cosine"]
    assert set(main) == {"adapter", "delta_w"} and main["adapter"]["difference"]["seeds"] == 2
    assert set(s["blocks"]["a0"]["cosine"]) == {"delta_w"}  # no adapter-space cosine
    res = json.loads((out / "results.json").read_text())
    for block in res["blocks"].values():
        r = block["results"]
        for m in ("lora", "l_lora"):
            d = [r["cosine"][m][sd]["delta_w_mean_off_diagonal"] for sd in ("0", "1")]
            assert all(-1 <= x <= 1 for x in d)
            assert set(r["fusion"][m]["task_arithmetic"]) == {"mrpc+sst2"}
    text = (out / "report.md").read_text()
    assert "Seven-task cosine test" in text and "| main | adapter |" in text
