"""Group training (train_group): R runs in one vmapped step equal R single runs.

Dropout is off wherever results are compared with single runs: under vmap an rbg key
does not draw its single run's dropout bits (see train_group.finetune_group).
"""

import dataclasses
import json
from pathlib import Path

import jax
import numpy as np
import pytest

from llora_jax import experiment, task_vectors
from llora_jax.adapters import LoraConfig
from llora_jax.study import finetune as study_finetune
from llora_jax.study import spec as study_spec
from llora_jax.train import group as train_group
from llora_jax.train import loop as train_loop
from llora_jax.train import optim
from llora_jax.types import AdapterSpec
from tests.conftest import data_dir
from tests.fixtures import tiny_models, toy
from tests.study.test_end_to_end import ROOT, words  # noqa: F401  (words: the vocabulary fixture)

# stsb: 5 padded bins and an extra float "score" field.
TASKS = ["stsb", "rte", "mrpc"]


def _assert_trees_close(a, b, tol=1e-5):
    """Equal up to float32 rounding. Adam divides by the gradient's own scale, so weights
    whose gradients are rounding noise (~1e-10: some biases under full fine-tuning) move by
    noise-driven steps of ~1e-5 in either direction; entries are compared to within 1e-3 of
    the tree's largest entry (a wrong member's data, rate or start moves far more)."""
    assert jax.tree.structure(a) == jax.tree.structure(b)
    scale = max(float(np.abs(np.asarray(y)).max()) for y in jax.tree.leaves(b))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=tol, atol=1e-3 * scale)


def _max_abs(tree):
    return max(float(np.abs(np.asarray(x)).max()) for x in jax.tree.leaves(tree))


# ----------------------------------------------------------------------------- toy model


def _toy_setup(dropout=0.0, rng_impl="rbg", steps=8):
    tm = toy.toy_task_model()
    spec = AdapterSpec(
        "lora", LoraConfig(rank=4, alpha=8.0, targets=("query", "value"), dropout=dropout)
    )
    oc = optim.OptimConfig(optimizer="adam", learning_rate=1.0, schedule="constant")
    lc = train_loop.LoopConfig(
        total_steps=steps,
        batch_size=16,
        log_every=3,
        ckpt_every=0,
        progress=False,
        rng_impl=rng_impl,
        tensorboard=False,
    )
    return tm, spec, oc, lc


def test_threefry_keys_reproduce_single_runs_even_with_dropout(tmp_path):
    tm, spec, oc, lc = _toy_setup(dropout=0.3, rng_impl="threefry2x32")
    runs = [(0, 3e-2), (1, 1e-2)]
    members = [
        train_loop.Run(tmp_path / f"g{s}", s, lr, None, toy.toy_task(seed=s), meta={"task": "toy"})
        for s, lr in runs
    ]
    train_loop.fit(tm, spec, oc, lc, members)
    for s, lr in runs:
        one = dataclasses.replace(lc, seed=s)
        train_loop.finetune(
            tm,
            spec,
            dataclasses.replace(oc, learning_rate=lr),
            one,
            toy.toy_task(seed=s),
            tmp_path / f"s{s}",
            meta={"task": "toy"},
        )
        got, want = (
            task_vectors.load(tmp_path / f"g{s}/task_vector"),
            task_vectors.load(tmp_path / f"s{s}/task_vector"),
        )
        _assert_trees_close(got.tau, want.tau)
        assert got.meta["seed"] == s and got.meta["task"] == "toy"
        rows = [json.loads(x) for x in (tmp_path / f"g{s}/metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [3, 6, 8]
        assert set(rows[0]) == {
            "step",
            "loss",
            "accuracy",
            "grad_norm",
            "grad_norm_max",
            "nonfinite",
            "examples_per_s",
        }


def test_group_refuses_bad_members(tmp_path):
    tm, spec, oc, lc = _toy_setup()
    data = toy.toy_task()
    with pytest.raises(ValueError, match="no runs"):
        train_loop.fit(tm, spec, oc, lc, [])
    heads = [{"w": np.zeros((2, 3))}, {"w": np.zeros((3, 3))}]
    members = [train_loop.Run(tmp_path / str(i), i, 1e-2, h, data) for i, h in enumerate(heads)]
    with pytest.raises(ValueError, match="differs in shape"):
        train_loop.fit(tm, spec, oc, lc, members)
    same = [train_loop.Run(tmp_path / "a", i, 1e-2, None, data) for i in range(2)]
    with pytest.raises(ValueError, match="same workdir"):
        train_loop.fit(tm, spec, oc, lc, same)
    with pytest.raises(ValueError, match="LoopConfig.batch_size"):
        train_group.shared_configs([oc, oc], [lc, dataclasses.replace(lc, batch_size=8, seed=3)])
    assert train_group.shared_configs(
        [oc, dataclasses.replace(oc, learning_rate=2.0)], [lc, lc]
    ) == (oc, lc)
    assert not list(tmp_path.iterdir())  # refused before anything was written


def test_a_diverging_member_is_named(tmp_path):
    tm, spec, oc, lc = _toy_setup(steps=3)
    data = toy.toy_task()
    bad = dict(data, x=np.full_like(data["x"], np.nan))
    members = [
        train_loop.Run(tmp_path / "ok", 0, 1e-2, None, data, meta={"task": "toy"}),
        train_loop.Run(tmp_path / "bad", 1, 1e-2, None, bad, meta={"task": "toy"}),
    ]
    with pytest.raises(train_loop.TrainingDiverged, match="bad: training diverged: non-finite"):
        train_loop.fit(tm, spec, oc, lc, members)
    assert not (tmp_path / "ok" / "task_vector").exists()


# ----------------------------------------------------------------------------- tiny BERT


@pytest.fixture(scope="module")
def off(tmp_path_factory, words):  # noqa: F811
    """A tiny BERT without dropout and its study's experiments (heads padded to one shape)."""
    path = tiny_models.tiny_bert(tmp_path_factory.mktemp("bert") / "off", words, dropout=0.0)
    cache = experiment.BackboneCache()
    return path, cache, study_finetune.experiments(_study(path, dropout=False), TASKS, cache)


def _study(path: Path, dropout: bool, **fields):
    """A tiny text study (study_finetune.load_config/_experiments are how a study builds runs)."""
    s = study_spec.base_study("group", str(ROOT / "configs/minilm.py"), "tiny")
    s.overrides = (
        ("backbone", str(path)),
        ("data.data_dir", str(data_dir())),
        ("lora.dropout", 0.1 if dropout else 0.0),
        ("tensorboard", False),
    )
    s.progress = False
    for k, v in fields.items():
        setattr(s, k, v)
    return s


def _configs(s, method, runs):
    out = []
    for task, seed, lr in runs:
        c = study_finetune.load_config(s.config, s.config_arg, dict(s.overrides))
        c.task, c.method, c.seed = task, method, seed
        c.optim.learning_rate = lr
        out.append(c)
    return out


RUNS = [("stsb", 0, 1e-2), ("rte", 1, 3e-3), ("mrpc", 2, 1e-3)]


@pytest.mark.parametrize("method", ["lora", "full"])
def test_group_equals_single_runs_without_dropout(tmp_path, off, method):
    path, cache, exps = off
    s = _study(path, dropout=False)
    configs = _configs(s, method, RUNS)
    group = experiment.run_finetune_group(
        configs,
        [tmp_path / "group" / t for t, _, _ in RUNS],
        cache,
        progress=False,
        exps=[exps[t] for t, _, _ in RUNS],
    )
    for c, got_metrics in zip(configs, group):
        want_metrics = experiment.run_finetune(
            c, tmp_path / "single" / c.task, cache, progress=False, exp=exps[c.task]
        )
        assert got_metrics.keys() == want_metrics.keys()
        for k, v in want_metrics.items():
            assert got_metrics[k] == pytest.approx(v, abs=1e-5), k
        got = task_vectors.load(tmp_path / "group" / c.task / "task_vector")
        want = task_vectors.load(tmp_path / "single" / c.task / "task_vector")
        _assert_trees_close(got.tau, want.tau)
        assert _max_abs(got.tau) > 1e-4  # it trained: equal, not trivially zero
        for k in ("task", "seed", "mode", "steps", "base_fingerprint", "targets"):
            assert got.meta[k] == want.meta[k], k
        assert (
            json.loads((tmp_path / "group" / c.task / "config.json").read_text())["seed"] == c.seed
        )


def test_group_with_dropout_trains_and_exports(tmp_path, words):  # noqa: F811
    s = _study(tiny_models.tiny_bert(tmp_path / "bert", words), dropout=True)  # HF's 0.1 dropout
    cache = experiment.BackboneCache()
    exps = study_finetune.experiments(s, ["rte", "mrpc"], cache)
    runs = [("rte", 0, 1e-2), ("mrpc", 1, 1e-2)]
    wds = [tmp_path / "runs" / t for t, _, _ in runs]
    experiment.run_finetune_group(
        _configs(s, "lora", runs), wds, cache, progress=False, exps=list(exps.values())
    )
    for (task, seed, _), wd in zip(runs, wds):
        rows = [json.loads(x) for x in (wd / "metrics.jsonl").read_text().splitlines()]
        assert rows and all(np.isfinite(r["loss"]) and r["nonfinite"] == 0 for r in rows)
        got = task_vectors.load(wd / "task_vector")
        assert (got.meta["task"], got.meta["seed"], got.meta["mode"]) == (task, seed, "lora")
        assert _max_abs(got.tau) > 0
        assert {"val/accuracy", "test/accuracy"} <= set(
            json.loads((wd / "metrics.json").read_text())
        )


def test_group_refuses_configs_that_differ_in_more_than_task_seed_and_rate(tmp_path, off):
    s = _study(off[0], dropout=False)
    a, b = _configs(s, "lora", RUNS[:2])
    for field, value in (("steps", 7), ("method", "l_lora")):
        bad = b.copy_and_resolve_references()
        bad[field] = value
        with pytest.raises(ValueError, match=f"field '{field}' differs"):
            experiment.run_finetune_group(
                [a, bad], [tmp_path / "a", tmp_path / "b"], progress=False
            )
    with pytest.raises(ValueError, match="empty group"):
        experiment.run_finetune_group([], [], progress=False)
    assert not list(tmp_path.iterdir())


def test_study_group_size_changes_nothing_but_speed(tmp_path, off, capsys):
    path, cache, exps = off
    fields = dict(seeds=[0, 1], lr_sweep_seeds=[0], learning_rates=[1e-2, 1e-5], methods=["lora"])
    tasks = ["stsb", "rte"]
    got = {}
    # Size 3: wave 1 (seed 0, 2 tasks x 2 rates) = a group of 3 and a single run; wave 2
    # (seed 1 at the chosen rates) = a group of 2.
    for size in (1, 3):
        s = _study(path, dropout=False, group_size=size, **fields)
        out = tmp_path / f"size{size}"
        runs, lrs = study_finetune.finetune_all(s, out, tasks, cache, exps, ["lora"])
        dirs = sorted(str(p.parent.relative_to(out)) for p in out.glob("runs/*/*/*/task_vector"))
        metrics = {d: json.loads((out / d / "metrics.json").read_text()) for d in dirs}
        got[size] = ({k: str(v.relative_to(out)) for k, v in runs.items()}, lrs, dirs, metrics)
        log = capsys.readouterr().out
        assert ("runs at once" in log) == (size > 1)
        # Re-running finds every run finished.
        again = study_finetune.finetune_all(s, out, tasks, cache, exps, ["lora"])
        assert again == (runs, lrs)
        log = capsys.readouterr().out
        assert log.count("done, skipping") == len(dirs) == 6 and "fine-tuning" not in log
    one, three = got[1], got[3]
    assert one[:3] == three[:3]
    assert set(one[1]) == {("lora", "stsb"), ("lora", "rte")}
    for d, m in one[3].items():
        for k, v in m.items():
            assert three[3][d][k] == pytest.approx(v, abs=1e-5), (d, k)


def test_background_finetuning_hands_over_results_errors_and_stops(monkeypatch):
    """Methods are fine-tuned in order in the thread; a method's error reaches whoever waits
    for it (and for every later method), earlier methods' results stay; close() sets the stop
    event that finetune_all checks before each group."""
    import threading

    seen, stops = [], []

    def fake(s, out, tasks, cache, exps, methods, stop=None):
        (m,) = methods
        seen.append(m)
        stops.append(stop)
        if m == "bad":
            raise ValueError("no data for bad")
        return {(m, 0, "t"): f"dir-{m}"}, {(m, "t"): 0.1}

    monkeypatch.setattr(study_finetune, "finetune_all", fake)
    bg = study_finetune.BackgroundFinetuning(None, None, ["t"], None, {}, ["lora", "bad", "never"])
    runs, lrs, secs = bg.result("lora")
    assert runs == {("lora", 0, "t"): "dir-lora"} and lrs == {("lora", "t"): 0.1} and secs >= 0
    for m in ("bad", "never"):
        with pytest.raises(ValueError, match="no data for bad") as err:
            bg.result(m)
        assert "fine-tuning thread, fine-tuning bad" in str(err.value.__notes__)
    bg.close()
    assert seen == ["lora", "bad"]  # nothing after the failure
    assert all(isinstance(x, threading.Event) and x.is_set() for x in stops)


def test_finetune_all_stops_before_its_next_group(tmp_path, off):
    import threading

    path, cache, exps = off
    s = _study(path, dropout=False, group_size=2, seeds=[0], learning_rates=[1e-2])
    stop = threading.Event()
    stop.set()
    with pytest.raises(study_finetune.Stopped):
        study_finetune.finetune_all(s, tmp_path, ["stsb", "rte"], cache, exps, ["lora"], stop=stop)
    assert not list(tmp_path.glob("runs/*/*/*/task_vector"))
