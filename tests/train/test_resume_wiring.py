"""The loop's run records, locks, checkpoint fallback and metrics rows (issue 18, wired).

Each test drives ``train.loop.finetune`` on the toy model and checks what a user sees:
a refused resume names the differing field, ``restart`` starts over, a damaged newest
checkpoint falls back, a resumed run writes each step's metrics row once, and the
result equals an uninterrupted run's.
"""

import json
import shutil

import jax
import numpy as np
import pytest

from llora_jax import task_vectors
from llora_jax.adapters import LoraConfig
from llora_jax.train import loop as train_loop
from llora_jax.train import optim, run_dir
from llora_jax.types import AdapterSpec
from tests.fixtures import toy

SPEC = AdapterSpec("lora", LoraConfig(rank=4, alpha=8.0, targets=("query", "value")))


def _run(wd, *, steps=16, lr=3e-2, seed=0, data=None, restart=False, ckpt_every=8):
    oc = optim.OptimConfig(optimizer="adam", learning_rate=lr, schedule="constant")
    lc = train_loop.LoopConfig(
        total_steps=steps,
        batch_size=32,
        seed=seed,
        log_every=4,
        ckpt_every=ckpt_every,
        progress=False,
        tensorboard=False,
    )
    data = toy.toy_task() if data is None else data
    train_loop.finetune(
        toy.toy_task_model(), SPEC, oc, lc, data, wd, meta={"task": "toy"}, restart=restart
    )
    return wd


def _tau(wd):
    return [np.asarray(x) for x in jax.tree.leaves(task_vectors.load(wd / "task_vector").tau)]


def _steps(wd):
    return [json.loads(line)["step"] for line in (wd / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    "change, field",
    [
        ({"seed": 1}, "seed: 0 -> 1"),
        ({"lr": 1e-2}, "optim.learning_rate: 0.03 -> 0.01"),
        ({"data": "other"}, "data_fingerprint"),
    ],
)
def test_resume_with_a_result_changing_field_is_refused(tmp_path, change, field):
    wd = _run(tmp_path / "run")
    before = _tau(wd)
    if change.get("data") == "other":
        change = {"data": toy.toy_task(seed=1)}
    with pytest.raises(run_dir.RunMismatch, match=field.replace(".", r"\.")) as exc:
        _run(wd, **change)
    assert "--restart" in str(exc.value)
    for a, b in zip(before, _tau(wd)):  # nothing was overwritten
        np.testing.assert_array_equal(a, b)


def test_restart_moves_the_old_run_aside_and_equals_a_fresh_run(tmp_path):
    wd = _run(tmp_path / "run")
    _run(wd, seed=1, restart=True)
    fresh = _run(tmp_path / "fresh", seed=1)
    for a, b in zip(_tau(fresh), _tau(wd)):
        np.testing.assert_array_equal(a, b)
    old = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert len(old) == 1 and (old[0] / "task_vector").is_dir()
    assert run_dir.read_run_record(wd)["fields"]["seed"] == 1


def test_killed_run_resumes_once_per_step_and_equals_an_uninterrupted_one(tmp_path):
    ref = _run(tmp_path / "ref")
    wd = _run(tmp_path / "run")
    # As if killed after the step-8 checkpoint: no newer checkpoint, no task vector, but
    # metrics rows up to step 16 already written.
    shutil.rmtree(wd / "checkpoints" / "16")
    shutil.rmtree(wd / "task_vector")
    assert _steps(wd) == [4, 8, 12, 16]
    _run(wd)
    assert _steps(wd) == [4, 8, 12, 16]  # rows 12 and 16 written once, by the resumed run
    for a, b in zip(_tau(ref), _tau(wd)):
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7)


def test_damaged_newest_checkpoint_falls_back_with_a_warning(tmp_path):
    ref = _run(tmp_path / "ref")
    wd = _run(tmp_path / "run")
    shutil.rmtree(wd / "task_vector")
    (wd / "checkpoints" / "16" / "_CHECKPOINT_METADATA").unlink()
    (wd / "checkpoints" / "16" / "commit_success.txt").unlink(missing_ok=True)
    stale = wd / "checkpoints" / "24.orbax-checkpoint-tmp-123"
    stale.mkdir()
    with pytest.warns(UserWarning, match="checkpoint step 16 .* is damaged"):
        _run(wd)
    assert not stale.exists()
    assert list((wd / "checkpoints.damaged").iterdir())
    for a, b in zip(_tau(ref), _tau(wd)):
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7)


def test_extending_steps_resumes_and_shortening_past_a_checkpoint_is_refused(tmp_path):
    wd = _run(tmp_path / "run", steps=8)
    _run(wd, steps=16)  # steps is a safe field
    assert _steps(wd) == [4, 8, 12, 16]
    for a, b in zip(_tau(_run(tmp_path / "ref", steps=16)), _tau(wd)):
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7)
    with pytest.raises(train_loop.UserError, match="checkpoint at step 16, past steps=8"):
        _run(wd, steps=8)


def test_a_second_writer_is_refused_before_anything_is_written(tmp_path):
    wd = tmp_path / "run"
    with run_dir.workdir_lock(wd):
        with pytest.raises(run_dir.WorkdirLocked, match="in use by pid"):
            _run(wd)
    assert not wd.exists()


def test_a_workdir_of_an_older_run_without_a_record_is_refused(tmp_path):
    wd = _run(tmp_path / "run")
    (wd / "run.json").unlink()
    with pytest.raises(run_dir.RunMismatch, match="no run.json"):
        _run(wd)


def test_after_a_divergence_the_advised_lower_rate_needs_restart_and_then_works(tmp_path):
    wd = tmp_path / "run"
    with pytest.raises(train_loop.TrainingDiverged) as exc:
        _run(wd, lr=1e30)
    assert "--config.optim.learning_rate=1e+29" in str(exc.value) and "--restart" in str(exc.value)
    assert not (wd / "task_vector").exists()
    with pytest.raises(run_dir.RunMismatch, match=r"optim\.learning_rate: 1e\+30 -> 0\.03"):
        _run(wd, lr=3e-2)
    _run(wd, lr=3e-2, restart=True)
    for a, b in zip(_tau(_run(tmp_path / "fresh", lr=3e-2)), _tau(wd)):
        np.testing.assert_array_equal(a, b)
