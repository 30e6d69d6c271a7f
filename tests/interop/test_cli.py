"""``llora import-peft / export-peft / export-hf``: round trips of tiny PEFT adapters."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import transformers
from peft import PeftModel

from llora_jax import experiment, task_vectors
from llora_jax import tree as tree_lib
from llora_jax.cli import analysis as cli_analysis
from llora_jax.cli import interop as cli
from llora_jax.evaluation import grid as grid_eval
from llora_jax.interop.delta_w import merged_params
from llora_jax.types import AdapterSpec
from tests.conftest import data_dir
from tests.fixtures import interop_models, tiny_models

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model, ckpt = interop_models.bert(root / "base")
    for name, seed, r in (("alpha", 1, 2), ("beta", 2, 3)):
        interop_models.peft_adapter(
            copy.deepcopy(model),
            root / "src" / name,
            seed=seed,
            r=r,
            lora_alpha=2 * r + 1,
            target_modules=["query", "value"],
        )
    return model, ckpt, root


def _run(*argv) -> int:
    return cli.main([str(a) for a in argv])


def test_import_then_export_round_trips(adapters, tmp_path):
    model, ckpt, root = adapters
    src = root / "src" / "alpha"
    assert _run("import-peft", src, "--backbone", ckpt, "--out", tmp_path / "tv") == 0
    tv = tmp_path / "tv" / "alpha"
    assert task_vectors.load(tv).meta["adapter_kind"] == "delta_w"
    # export-peft: the adapter exactly as it came in
    assert _run("export-peft", tv, "--out", tmp_path / "peft") == 0
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / "peft" / name).read_bytes() == (src / name).read_bytes()
    # export-hf: transformers loads the merged checkpoint; outputs equal PEFT's adapter
    assert _run("export-hf", tv, "--out", tmp_path / "hf") == 0
    want = interop_models.torch_outputs(
        "bert", PeftModel.from_pretrained(copy.deepcopy(model), src).eval()
    )
    got = interop_models.torch_outputs(
        "bert", transformers.BertModel.from_pretrained(tmp_path / "hf").eval()
    )
    np.testing.assert_allclose(got, want, atol=1e-4)
    # an existing output is refused in one line, not overwritten
    assert _run("export-hf", tv, "--out", tmp_path / "hf") == 2


def test_export_of_a_merge_loads_in_peft(adapters, tmp_path):
    model, ckpt, root = adapters
    srcs = [root / "src" / n for n in ("alpha", "beta")]
    assert _run("import-peft", *srcs, "--backbone", ckpt, "--out", tmp_path / "tv") == 0
    tvs = [tmp_path / "tv" / n for n in ("alpha", "beta")]
    argv = ["--fusion", "task_arithmetic", "--hparam", "lam=0.5"]
    assert _run("export-peft", *tvs, "--out", tmp_path / "merged", *argv) == 0
    cfg = json.loads((tmp_path / "merged" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA"
    got = interop_models.torch_outputs(
        "bert", PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "merged").eval()
    )
    bb = interop_models.load(ckpt)
    taus = [task_vectors.load(p).tau for p in tvs]
    merged = tree_lib.scale(tree_lib.add(taus[0], taus[1]), 0.5)
    want = np.asarray(
        bb.module.apply({"params": merged_params(bb.params, merged)}, interop_models.token_batch())
    )
    np.testing.assert_allclose(got, want, atol=1e-4)
    side = json.loads((tmp_path / "merged" / "llora_meta.json").read_text())
    assert side["recipe"]["method"] == "task_arithmetic" and side["recipe"]["hparams"] == {
        "lam": 0.5
    }
    # several vectors without --fusion: refused, nothing written
    assert _run("export-hf", *tvs, "--out", tmp_path / "nope") == 2
    assert not (tmp_path / "nope").exists()


def test_import_with_config_writes_run_directories(adapters, tmp_path):
    _, ckpt, root = adapters
    argv = ["--config", REPO / "configs" / "minilm.py", "--tasks", "sst2,rte"]
    argv += ["--set", "data.eval_limit=8"]
    srcs = [root / "src" / n for n in ("alpha", "beta")]
    assert _run("import-peft", *srcs, "--backbone", ckpt, "--out", tmp_path, *argv) == 0
    for task in ("sst2", "rte"):
        run = tmp_path / task
        c = json.loads((run / "config.json").read_text())
        assert (c["task"], c["backbone"], c["method"]) == (task, str(ckpt), "lora")
        assert c["data"]["eval_limit"] == 8
        assert task_vectors.load(run / "task_vector").meta["task"] == task
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left
    bad = ["--config", REPO / "configs" / "minilm.py", "--set", "data.no_such=1"]
    assert _run("import-peft", srcs[0], "--backbone", ckpt, "--out", tmp_path / "b", *bad) == 2
    assert not (tmp_path / "b").exists()  # refused before anything was imported


def test_the_llora_command_dispatches_and_reports_errors_in_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "llora_jax.cli",
            "export-hf",
            tmp_path / "missing",
            "--out",
            tmp_path / "x",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
    )
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith("error:") and "missing" in out.stderr
    assert "Traceback" not in out.stderr


def test_fuse_of_imported_adapters_end_to_end(tmp_path):
    """PEFT adapters on a tiny BERT with a tokenizer -> import-peft --config -> fuse, on the
    local rte / sst2 data; the single-task scores are the vectors' own (λ = 1) scores."""
    data = data_dir()
    ckpt = tiny_models.tiny_bert(tmp_path / "bert", ["good", "bad", "movie"], dropout=0.0)
    model = transformers.BertModel.from_pretrained(ckpt).eval()
    for i, task in enumerate(("rte", "sst2")):
        interop_models.peft_adapter(
            copy.deepcopy(model),
            tmp_path / "src" / task,
            seed=i + 1,
            r=2,
            lora_alpha=4,
            target_modules=["query", "value"],
        )
    srcs = [tmp_path / "src" / t for t in ("rte", "sst2")]
    argv = ["--config", REPO / "configs" / "minilm.py:tiny", "--set", f"data.data_dir={data}"]
    assert _run("import-peft", *srcs, "--backbone", ckpt, "--out", tmp_path / "runs", *argv) == 0
    runs = [str(tmp_path / "runs" / t) for t in ("rte", "sst2")]
    res = json.loads(
        cli_analysis.fuse_runs(runs, ["task_arithmetic"], tmp_path / "fuse").read_text()
    )
    entry = res["fusion"]["delta_w"]["task_arithmetic"]["rte+sst2"]["-1"]
    assert set(entry["test"]) == {"rte", "sst2"} and "lam" in entry["hparams"]
    # rte's single-task score: its ΔW added onto the weights by hand, the plain model run
    member = cli_analysis.load_member(runs[0], experiment.BackboneCache())
    exp = member.exp
    tm = dataclasses.replace(exp.tm, params=merged_params(exp.tm.params, member.tv.tau))
    arrays = exp.arrays["test"]
    preds = grid_eval.predict(tm, AdapterSpec("full"), {}, None, arrays, 8)
    want = exp.metric_fn(preds, arrays)["accuracy"]
    assert res["single"]["delta_w"]["rte"]["-1"]["test"]["accuracy"] == pytest.approx(want)
    assert (tmp_path / "fuse" / "report.md").is_file()
