"""End to end on tiny random checkpoints (with tokenizers) and real local data.

Covers the three readouts (sentence encoder + label heads, T5 text-to-text, CLIP
zero-shot), the finetune -> fuse -> disentangle -> report path of the CLI, and the
study runner on a data directory whose tasks have names the project has never seen.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from llora_jax import experiment, task_vectors
from llora_jax import tree as tree_lib
from llora_jax.study import runner as study
from llora_jax.study.spec import StudySpecError
from tests.conftest import data_dir
from tests.fixtures import tiny_models

ROOT = Path(__file__).resolve().parents[2]
LABEL_WORDS = [
    "entailment",
    "not_entailment",
    "negative",
    "positive",
    "not_equivalent",
    "equivalent",
    "acceptable",
    "unacceptable",
    "rte",
    "sst2",
    "mrpc",
    "cola",
    "sentence",
    "sentence1",
    "sentence2",
    ":",
]


@pytest.fixture(scope="module")
def words():
    from llora_jax import data

    d = data_dir()
    texts = []
    for task, fields in (
        ("rte", ("sentence1", "sentence2")),
        ("sst2", ("sentence",)),
        ("mrpc", ("sentence1", "sentence2")),
    ):
        ex = data.load_task(task, "train", data_dir=d).take(np.arange(300))
        for f in fields:
            texts += list(ex[f])
    return LABEL_WORDS + tiny_models.words_of(texts)


def _config(path, kind_config, arg, **fields):
    c = study.load_config(str(ROOT / "configs" / kind_config), arg)
    c.data.data_dir = str(data_dir())
    for k, v in fields.items():
        node = c
        *parents, leaf = k.split("__")
        for p in parents:
            node = node[p]
        node[leaf] = v
    c.backbone = str(path)
    return c


def _check_run(wd, method):
    got = task_vectors.load(Path(wd) / "task_vector")
    metrics = json.loads((Path(wd) / "metrics.json").read_text())
    assert {"val/accuracy", "test/accuracy"} <= set(metrics)
    assert got.meta["mode"] == method
    flat = tree_lib.flatten(got.tau)
    if method == "l_lora":
        assert all(np.all(np.asarray(v) == 0) for n, v in flat.items() if n.endswith("/A"))
    assert max(float(np.abs(np.asarray(v)).max()) for v in flat.values()) > 0
    return got, metrics


def test_t5_text_to_text_finetune(tmp_path, words):
    path = tiny_models.tiny_t5(tmp_path / "t5", words)
    c = _config(path, "t5.py", "base,tiny", task="rte", method="l_lora")
    experiment.run_finetune(c, tmp_path / "run", progress=False)
    _, metrics = _check_run(tmp_path / "run", "l_lora")
    # Both readouts are reported: label-word scoring and greedy generation + exact match.
    assert {"test/gen_accuracy", "test/gen_num_invalid"} <= set(metrics)
    assert 0.0 <= metrics["test/gen_accuracy"] <= 1.0
    # Label-word scoring makes a valid class prediction for every example.
    exp = experiment.build(c)
    assert exp.arrays["test"]["labels"].shape[1] == c.data.target_len
    assert exp.tm.head["ids"].shape[0] == 2


def test_config_attention_impl_reaches_the_backbone_and_cudnn_refuses_l_lora_model(tmp_path, words):
    path = tiny_models.tiny_bert(tmp_path / "bert", words)
    c = _config(path, "minilm.py", "tiny", task="rte", attention_impl="reference")
    assert experiment.build(c).tm.module.cfg.attention_impl == "reference"
    c.method, c.attention_impl = "l_lora_model", "cudnn"
    with pytest.raises(
        ValueError, match="attention_impl='cudnn' cannot be used with method='l_lora_model'"
    ):
        experiment.build(c)


def test_clip_zeroshot_finetune(tmp_path):
    from llora_jax.data import vision

    path = tiny_models.tiny_clip(tmp_path / "clip", list(vision.class_names("gtsrb")))
    c = _config(path, "clip.py", "b16,tiny", task="gtsrb", method="lora")
    experiment.run_finetune(c, tmp_path / "run", progress=False)
    got, _ = _check_run(tmp_path / "run", "lora")
    # Only the vision tower's q/v projections carry adapters.
    assert all(n.startswith("vision_model/") for n in tree_lib.flatten(got.tau))


def test_cli_finetune_fuse_disentangle_report(tmp_path, words):
    path = tiny_models.tiny_bert(tmp_path / "bert", words)
    runs = []
    for task in ("rte", "sst2"):
        wd = tmp_path / "runs" / task / "lora"
        cmd = [
            sys.executable,
            "-m",
            "llora_jax.cli",
            "finetune",
            "--config=configs/minilm.py:tiny",
            f"--config.task={task}",
            f"--config.backbone={path}",
            f"--config.data.data_dir={data_dir()}",
            f"--workdir={wd}",
        ]
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stdout + out.stderr
        assert f"task vector: {wd}/task_vector" in out.stdout
        runs.append(str(wd))
    from llora_jax.cli import analysis as cli_analysis

    res = json.loads(
        cli_analysis.fuse_runs(runs, ["task_arithmetic"], tmp_path / "fuse").read_text()
    )
    entry = res["fusion"]["lora"]["task_arithmetic"]["rte+sst2"]["0"]
    assert set(entry["test"]) == {"rte", "sst2"} and "lam" in entry["hparams"]
    assert (tmp_path / "fuse" / "report.md").is_file()
    # A misspelled config key is refused with a suggestion.
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "llora_jax.cli",
            "finetune",
            "--config=configs/minilm.py:tiny",
            "--config.tsk=rte",
            f"--workdir={tmp_path / 'bad'}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode != 0 and "task" in bad.stderr


def test_study_runs_on_tasks_it_has_never_seen(tmp_path, words):
    """A data directory in the local layout with new task names runs unchanged."""
    src = data_dir() / "text"
    new = tmp_path / "data" / "text"
    for old, name in (("sst2", "reviews"), ("mrpc", "paraphrase_pairs")):
        (new / name).mkdir(parents=True)
        for split in ("train", "test"):
            lines = (src / old / f"{split}.jsonl").read_text().splitlines()[:120]
            (new / name / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    path = tiny_models.tiny_bert(tmp_path / "bert", words)
    s = study.load_module(ROOT / "experiments/text_minilm/study.py", "s").get_study("tiny")
    s.tasks = ["paraphrase_pairs", "reviews"]  # named explicitly (unregistered local tasks)
    s.methods = ["lora", "l_lora_model"]
    s.fusion = ["task_arithmetic", "lorahub", "isolation"]
    s.pairs = [("reviews", "paraphrase_pairs"), ("cola", "reviews")]
    s.overrides = (("backbone", str(path)), ("data.data_dir", str(tmp_path / "data")))
    res = json.loads(study.run_study(s, tmp_path / "out").read_text())
    assert res["tasks"] == ["paraphrase_pairs", "reviews"]
    for method in s.methods:
        assert set(res["fusion"][method]) == set(s.fusion)
        xi = res["disentanglement"][method]["reviews+paraphrase_pairs"]["0"]["xi"]
        assert xi[1][1] == 0.0  # λ = (0, 0)
        assert len(res["cosine"][method]["0"]["matrix"]) == 2
    assert "cola+reviews" not in res["disentanglement"]["lora"]
    assert (tmp_path / "out" / "report.md").is_file()
    # Re-running finds every fine-tuning run and every fusion result done.
    again = json.loads(study.run_study(s, tmp_path / "out").read_text())
    assert again["fusion"] == res["fusion"]
    # A cached result of other task vectors (runs fine-tuned again, e.g. on another machine)
    # is computed again, never reported.
    cache = tmp_path / "out" / "fusion_cache.json"
    entries = json.loads(cache.read_text())
    key = next(k for k in entries if k.startswith("fusion|lora|0|task_arithmetic|"))
    entries[key] = dict(entries[key], vectors="of other runs", avg_test=-1.0)
    xi_key = next(k for k in entries if k.startswith("xi|lora|0|"))
    entries[xi_key] = {k: v for k, v in entries[xi_key].items() if k != "vectors"}  # old format
    cache.write_text(json.dumps(entries))
    third = json.loads(study.run_study(s, tmp_path / "out").read_text())
    assert third["fusion"] == res["fusion"]
    assert third["disentanglement"] == res["disentanglement"]
    assert (
        json.loads(cache.read_text())[key]["vectors"]
        == res["fusion"]["lora"]["task_arithmetic"]["paraphrase_pairs+reviews"]["0"]["vectors"]
    )
    shutil.rmtree(tmp_path / "data")


def test_study_records_learning_rates_and_reuses_a_given_choice(tmp_path, words):
    """The sweep seed picks a rate per (method, task), other seeds reuse it, results.json
    records it; a study given that choice (--set) fine-tunes no sweep at all."""
    path = tiny_models.tiny_bert(tmp_path / "bert", words)
    file = ROOT / "experiments/text_minilm/study.py"
    sets = [
        'tasks=["sst2", "rte"]',
        'methods=["lora"]',
        "seeds=[0, 1]",
        "lr_sweep_seeds=[0]",
        "learning_rates=[0.01, 1e-6]",
        'fusion=["task_arithmetic"]',
        "pairs=[]",
    ]
    over = [f"config.backbone={path}", "config.steps=6"]
    res = json.loads(
        study.run_study_file(str(file), "tiny", str(tmp_path / "a"), over + sets).read_text()
    )
    chosen = res["learning_rate"]["lora"]
    assert set(chosen) == {"sst2", "rte"} and set(chosen.values()) <= {0.01, 1e-6}
    for task, lr in chosen.items():
        assert res["runs"]["lora"][task]["1"] == f"runs/seed1/{task}/lora-lr{lr:g}"
        assert len(list((tmp_path / "a/runs/seed0" / task).iterdir())) == 2  # swept
        assert len(list((tmp_path / "a/runs/seed1" / task).iterdir())) == 1
    given = {"lora": {"sst2": 1e-6, "rte": 1e-6}}
    sets_b = [*sets, "seeds=[1]", f"learning_rate_choice={json.dumps(given)}"]
    res_b = json.loads(
        study.run_study_file(str(file), "tiny", str(tmp_path / "b"), over + sets_b).read_text()
    )
    assert res_b["learning_rate"] == given
    assert sorted(p.name for p in (tmp_path / "b/runs").iterdir()) == ["seed1"]
    for task in ("sst2", "rte"):
        assert [p.name for p in (tmp_path / "b/runs/seed1" / task).iterdir()] == ["lora-lr1e-06"]
    with pytest.raises(StudySpecError, match="no field 'seed' \\(did you mean seeds"):
        study.run_study_file(str(file), "tiny", str(tmp_path / "c"), [*over, "seed=[1]"])
    with pytest.raises(StudySpecError, match="names no tasks"):
        study.run_study_file(str(file), "tiny", str(tmp_path / "c"), [*over, "tasks=[]"])


def _tiny_study(name, overrides, tmp_path):
    s = study.load_module(ROOT / f"experiments/{name}/study.py", name).get_study("tiny")
    s.overrides = tuple(overrides)
    res = json.loads(study.run_study(s, tmp_path / "out").read_text())
    assert set(res["single"][s.methods[0]]) == set(s.tasks)
    assert res["fusion"][s.methods[0]]
    assert res["disentanglement"][s.methods[0]]
    assert (tmp_path / "out" / "report.md").is_file()


def test_reproduce_t5_tiny_mode(tmp_path, words):
    path = tiny_models.tiny_t5(tmp_path / "t5", words)
    _tiny_study(
        "flan_t5_base", [("backbone", str(path)), ("data.data_dir", str(data_dir()))], tmp_path
    )


def test_reproduce_clip_tiny_mode_on_mock_and_local_data(tmp_path):
    import tensorflow_datasets as tfds

    from llora_jax.data import vision

    names = list(vision.class_names("gtsrb")) + list(vision.class_names("svhn"))
    path = tiny_models.tiny_clip(tmp_path / "clip", names)
    # gtsrb comes from the local npz, svhn from tfds (mocked: no network here).
    with tfds.testing.mock_data(num_examples=40):
        _tiny_study(
            "clip_vit_b16", [("backbone", str(path)), ("data.data_dir", str(data_dir()))], tmp_path
        )
