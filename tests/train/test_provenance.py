"""Provenance, wired end to end on a tiny BERT and real local data: ``finetune`` records
the data it was trained and scored on (run.json, the task vector's meta); scoring the
vector against other rows (``fuse``'s ``load_member``) and resuming on other data are
refused, naming the split; the same rows elsewhere are accepted."""

import json
import shutil

import numpy as np
import pytest

from llora_jax import data, experiment, task_vectors
from llora_jax.cli import analysis as cli_analysis
from llora_jax.data.fingerprint import DataMismatch
from llora_jax.study.finetune import load_config
from llora_jax.train import run_dir
from tests.conftest import data_dir
from tests.fixtures import tiny_models

LABEL_WORDS = ["entailment", "not_entailment", "sentence1", "sentence2", ":"]


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    rows = data.load_task("rte", "train", data_dir=data_dir()).take(np.arange(200))
    words = LABEL_WORDS + tiny_models.words_of([*rows["sentence1"], *rows["sentence2"]])
    return tiny_models.tiny_bert(tmp_path_factory.mktemp("bert") / "bert", words)


def _copy_data(root):
    (root / "text").mkdir(parents=True)
    shutil.copytree(data_dir() / "text" / "rte", root / "text" / "rte")
    return root


def _config(bert, data_root):
    c = load_config("configs/minilm.py", "tiny")
    c.task, c.backbone, c.data.data_dir, c.tensorboard = "rte", str(bert), str(data_root), False
    return c


def _flip_one_test_label(root):
    path = root / "text" / "rte" / "test.jsonl"
    lines = path.read_text().splitlines()
    row = json.loads(lines[0])
    row["label"] = 1 - int(row["label"])
    path.write_text("\n".join([json.dumps(row), *lines[1:]]) + "\n")


def test_task_vectors_are_scored_only_on_the_data_they_were_made_with(tmp_path, bert):
    root = _copy_data(tmp_path / "data")
    wd = tmp_path / "run"
    experiment.run_finetune(_config(bert, root), wd, progress=False)
    meta = task_vectors.load(wd / "task_vector").meta
    record = run_dir.read_run_record(wd)["fields"]
    assert record["data_fingerprint"] == meta["data"]["digest"]
    assert "data.data_dir" not in record  # the content fingerprint stands for the path
    assert set(meta["data"]["splits"]) == {"train", "validation", "test"}

    # The same rows at another path: accepted (fuse rebuilds from config.json).
    moved = shutil.copytree(root, tmp_path / "moved")
    cfg = json.loads((wd / "config.json").read_text())
    cfg["data"]["data_dir"] = str(moved)
    (wd / "config.json").write_text(json.dumps(cfg))
    cli_analysis.load_member(wd, experiment.BackboneCache())

    # One test label changed: refused, naming the split and both origins.
    _flip_one_test_label(moved)
    with pytest.raises(DataMismatch, match=r"test: .*rte/test\.jsonl .* vs now .*moved"):
        cli_analysis.load_member(wd, experiment.BackboneCache())
    # Resuming (or re-running) the workdir on the changed data: refused too.
    with pytest.raises(run_dir.RunMismatch, match="data_fingerprint"):
        experiment.run_finetune(_config(bert, moved), wd, progress=False)
