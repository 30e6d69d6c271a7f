"""The many-adapter benchmark runs in tiny form, and its routed forms agree."""

import json

import numpy as np

from benchmarks import multi_bench


def test_compositions():
    rng = np.random.default_rng(0)
    assert len(set(multi_bench.compose("distinct", 100, 16, rng))) == 16
    assert len(set(multi_bench.compose("uniform", 100, 16, rng))) == 4  # √16 groups
    assert set(multi_bench.compose("identical", 100, 16, rng)) == {0}
    skewed = multi_bench.compose("skewed", 1000, 4000, rng)
    assert np.mean(skewed == 0) > 0.3  # Zipf 1.5: adapter 0 takes 1/ζ(1.5) ≈ 38 %


def test_tiny_multi_bench_runs_every_case(tmp_path):
    out = tmp_path / "multi.json"
    argv = ["--adapters", "4", "--batch", "4", "--seq", "8", "--repeats", "1", "--out", str(out)]
    multi_bench.main(argv)
    body = json.loads(out.read_text())
    assert {"command", "date", "device", "versions"} <= set(body)
    items = body["measurements"]
    assert not [m["name"] for m in items if m["error"]]
    names = {m["name"] for m in items}
    assert {"base model", "one merged adapter (folded)"} <= names
    for n in (4,):
        for comp in multi_bench.COMPOSITIONS:
            for impl in multi_bench.IMPLS:
                assert f"N={n} {comp} {impl}" in names
    diffs = [
        m["config"]["max_abs_diff_vs_gather"]
        for m in items
        if "max_abs_diff_vs_gather" in m["config"]
    ]
    assert diffs and max(diffs) <= 1e-5


def test_tiny_t5_encoder_and_clip_vision_run_and_agree(tmp_path):
    """The T5 encoder and CLIP vision-tower forms (issue 23's backbones) in tiny form."""
    for model in ("tiny-t5", "tiny-clip"):
        out = tmp_path / f"{model}.json"
        argv = ["--model", model, "--adapters", "3", "--batch", "4", "--seq", "8"]
        argv += ["--repeats", "1", "--impls", "gather,onehot,shared_a", "--out", str(out)]
        argv += ["--compositions", "distinct"]
        multi_bench.main(argv)
        items = json.loads(out.read_text())["measurements"]
        assert not [m["name"] for m in items if m["error"]], model
        assert {"N=3 distinct gather", "N=3 distinct shared_a"} <= {m["name"] for m in items}
        diffs = [m["config"]["max_abs_diff_vs_gather"] for m in items if "max_abs_diff_vs_gather" in m["config"]]  # fmt: skip
        assert len(diffs) == 2 and max(diffs) <= 1e-5, model
