"""The capacity study's tiny form end to end: blocks per (rank, arm), plan subsets, the
isolation pipeline, a per-task A0 merged in ΔW space, the multi-task baseline, resume."""

import json
from pathlib import Path

import numpy as np
import pytest

from llora_jax import data, task_vectors
from llora_jax import tree as tree_lib
from llora_jax.fusion.frozen_cores import frozen_union
from llora_jax.fusion.isolation_pipeline import isolation_pipeline
from llora_jax.study.finetune import load_module
from tests.conftest import data_dir
from tests.fixtures import tiny_models

ROOT = Path(__file__).resolve().parents[2]
WORDS = ["entailment", "not_entailment", "negative", "positive", "not_equivalent", "equivalent"]


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    d = data_dir()
    texts = []
    for task, fields in (
        ("rte", ("sentence1", "sentence2")),
        ("sst2", ("sentence",)),
        ("mrpc", ("sentence1", "sentence2")),
    ):
        ex = data.load_task(task, "train", data_dir=d).take(np.arange(200))
        for f in fields:
            texts += list(ex[f])
    words = WORDS + tiny_models.words_of(texts)
    return tiny_models.tiny_bert(tmp_path_factory.mktemp("bert"), words, dropout=0.0)


def _a_matrices(out: Path, block: str) -> dict:
    got = {}
    for task in ("sst2", "mrpc", "rte"):
        (run,) = (out / block / "runs" / "seed0" / task).iterdir()
        phi0 = task_vectors.load(run / "task_vector").phi0
        got[task] = next(v for k, v in tree_lib.flatten(phi0).items() if k.endswith("/A"))
    return got


def test_capacity_tiny_form(tmp_path, bert):
    mod = load_module(ROOT / "experiments/capacity/study.py", "capacity_study")
    out = tmp_path / "cap"
    sets = [f"config.backbone={bert}", f"config.data.data_dir={data_dir()}"]
    mod.main(["tiny", "--out", str(out), *[f"--set={x}" for x in sets]])
    res = json.loads((out / "results.json").read_text())
    assert list(res["blocks"]) == ["lora_r2", "l_lora_r2", "l_lora_a0_r2"]
    for block in res["blocks"].values():
        r = block["results"]
        method = block["labels"]["method"]
        # The plan: sizes 2 and 3, one sampled pair (exhaustive_up_to=0), the full set.
        subsets = set(r["fusion"][method]["task_arithmetic"])
        assert len(subsets) == 2 and "mrpc+rte+sst2" in subsets
        assert set(r["fusion"][method]) == {"task_arithmetic", "isolation_pipeline"}
        entry = r["fusion"][method]["isolation_pipeline"]["mrpc+rte+sst2"]["0"]
        assert set(entry["hparams"]) == {"p", "threshold", "lam"}
        assert set(r["baseline"]) == {"sst2", "mrpc", "rte"}
        assert r["cosine"][method]["0"]["delta_w_mean_off_diagonal"] is not None
    # Every block merges the same subsets (one plan per seed).
    plans = [
        set(b["results"]["fusion"][b["labels"]["method"]]["task_arithmetic"])
        for b in res["blocks"].values()
    ]
    assert plans[0] == plans[1] == plans[2]
    # The per-task-A0 arm: its own A0 per task, merged in ΔW space.
    assert res["blocks"]["l_lora_a0_r2"]["results"]["merge_space"] == "delta_w"
    own = _a_matrices(out, "l_lora_a0_r2")
    shared = _a_matrices(out, "l_lora_r2")
    assert not np.allclose(own["sst2"], own["mrpc"])
    assert np.array_equal(shared["sst2"], shared["mrpc"])
    # The multi-task baseline (shared-A0 arms only), on the 3-task subset, per_task budget.
    mt = res["blocks"]["lora_r2"]["results"]["multitask"]["lora"]["per_task"]
    assert set(mt) == {"mrpc+rte+sst2"}
    assert set(mt["mrpc+rte+sst2"]["0"]["test"]) == {"sst2", "mrpc", "rte"}
    assert (
        "multitask" not in res["blocks"]["l_lora_a0_r2"]["results"]
        or not res["blocks"]["l_lora_a0_r2"]["results"]["multitask"]
    )
    steps = [
        json.loads(x)
        for x in (out / "lora_r2" / mt["mrpc+rte+sst2"]["0"]["workdir"] / "metrics.jsonl")
        .read_text()
        .splitlines()
    ]
    assert max(s["step"] for s in steps) == 3 * 6  # n × the single runs' 6 steps
    assert (out / "report.md").is_file()
    _check_frozen_tuning(res, out)
    # A re-run resumes: nothing is trained or merged again, the results are the same.
    mod.main(["tiny", "--out", str(out), *[f"--set={x}" for x in sets]])
    again = json.loads((out / "results.json").read_text())
    for name in res["blocks"]:
        assert (
            again["blocks"][name]["results"]["fusion"] == res["blocks"][name]["results"]["fusion"]
        )
        assert (
            again["blocks"][name]["results"]["multitask"]
            == res["blocks"][name]["results"]["multitask"]
        )


def _check_frozen_tuning(res, out):
    """The pipeline's merge tuned with its cores frozen: core elements keep the merged values
    bit for bit; the sequential control (nothing frozen) moves them."""
    r = res["blocks"]["lora_r2"]["results"]
    ft = r["frozen_tuning"]["lora"]
    assert set(ft) == {"frozen", "sequential"}
    entry = ft["frozen"]["mrpc+rte+sst2"]["0"]
    hp = entry["hparams"]
    assert hp == r["fusion"]["lora"]["isolation_pipeline"]["mrpc+rte+sst2"]["0"]["hparams"]
    singles = {
        t: task_vectors.load(out / "lora_r2" / r["runs"]["lora"][t]["0"] / "task_vector")
        for t in ("mrpc", "rte", "sst2")
    }
    merged, info = isolation_pipeline([singles[t].tau for t in ("mrpc", "rte", "sst2")], **hp)
    phi0 = singles["mrpc"].phi0
    want = tree_lib.flatten(tree_lib.sub(tree_lib.add(phi0, merged), phi0))
    core = tree_lib.flatten(frozen_union(info["masks"]))
    moved = 0
    for variant in ("frozen", "sequential"):
        wd = out / "lora_r2" / "frozen_tuning" / "seed0" / "mrpc+rte+sst2" / f"lora-{variant}"
        got = tree_lib.flatten(task_vectors.load(wd / "task_vector").tau)
        for k, m in core.items():
            a = np.asarray(got[k], np.float32)[np.asarray(m)]
            b = np.asarray(want[k], np.float32)[np.asarray(m)]
            if variant == "frozen":
                assert np.array_equal(a.view(np.uint32), b.view(np.uint32)), k
            else:
                moved += int(np.sum(a != b))
    assert moved > 0
