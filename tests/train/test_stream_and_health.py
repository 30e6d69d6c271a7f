"""A streaming batch source in the loop (exact resume, weights, skip count) and the health
guard (checkpoints only at healthy steps, divergence names the last healthy one)."""

import json

import jax
import numpy as np
import pytest

from llora_jax import task_vectors
from llora_jax.adapters import LoraConfig
from llora_jax.data import streaming
from llora_jax.train import health, optim, run_dir
from llora_jax.train import loop as train_loop
from llora_jax.types import AdapterSpec
from tests.fixtures import toy

SPEC = AdapterSpec("lora", LoraConfig(rank=4, alpha=8.0, targets=("query", "value")))


def _lc(steps, **kw):
    base = dict(
        total_steps=steps,
        batch_size=32,
        seed=0,
        log_every=2,
        ckpt_every=4,
        progress=False,
        tensorboard=False,
    )
    return train_loop.LoopConfig(**(base | kw))


def _fit(wd, source, steps, lr=3e-2, **kw):
    oc = optim.OptimConfig(optimizer="adam", learning_rate=lr, schedule="constant")
    return train_loop.finetune(
        toy.toy_task_model(),
        SPEC,
        oc,
        _lc(steps, **kw),
        None,
        wd,
        meta={"task": "toy"},
        batches=source,
        data_fingerprint="toy-data",
    )


def _tau(wd):
    return [np.asarray(x) for x in jax.tree.leaves(task_vectors.load(wd / "task_vector").tau)]


class Recorded:
    """A streaming source that records every batch it hands out (passes the state through)."""

    def __init__(self, it):
        self.it, self.seen = it, []

    def __next__(self):
        batch = next(self.it)
        self.seen.append(batch["x"].copy())
        return batch

    def get_state(self):
        return self.it.get_state()

    def set_state(self, state):
        self.it.set_state(state)


class Scripted:
    """Batch k of the toy data (rows 32k..32k+31, cycling) through ``edit(k, batch)``; its
    state is the position and a 'skipped' count of k // 3."""

    def __init__(self, edit=None):
        self.data, self.k, self.edit = toy.toy_task(), 0, edit or (lambda k, b: b)

    def __next__(self):
        lo = (self.k * 32) % 256
        batch = {k: v[lo : lo + 32].copy() for k, v in self.data.items()}
        batch["weight"] = np.ones(32, np.float32)
        batch = self.edit(self.k, batch)
        self.k += 1
        return batch

    def get_state(self):
        return {"k": self.k, "skipped": self.k // 3}

    def set_state(self, state):
        self.k = state["k"]


def _grain():
    return Recorded(streaming.make_batch_iterator(toy.toy_task(), 32, seed=0))


def test_a_resumed_streaming_run_sees_the_batches_of_an_uninterrupted_one(tmp_path):
    full = _grain()
    _fit(tmp_path / "full", full, steps=12)
    first, second = _grain(), _grain()
    _fit(tmp_path / "run", first, steps=8)
    _fit(tmp_path / "run", second, steps=12)  # resumes at the step-8 checkpoint
    for a, b in zip(full.seen[8:12], second.seen[:4]):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first.seen[0], second.seen[0])  # it did not start over
    for a, b in zip(_tau(tmp_path / "full"), _tau(tmp_path / "run")):
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7)


def test_skip_count_of_the_consumed_batches_goes_into_metrics_json(tmp_path):
    _fit(tmp_path / "run", Scripted(), steps=10)  # prefetching reads ahead of step 10
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["data/skipped_corrupt"] == 10 // 3
    assert task_vectors.load(tmp_path / "run" / "task_vector").meta["metrics"] == metrics


def test_rows_of_weight_zero_do_not_train(tmp_path):
    def padded(k, b):  # 16 real rows + 16 rows of garbage with weight 0
        junk = {"x": np.full_like(b["x"][:16], 50.0), "label": (b["label"][:16] + 1) % 3}
        out = {n: np.concatenate([b[n][:16], junk[n]]) for n in ("x", "label")}
        out["weight"] = np.r_[np.ones(16), np.zeros(16)].astype(np.float32)
        return out

    def real(k, b):
        return {n: v[:16] for n, v in b.items()}

    _fit(tmp_path / "padded", Scripted(padded), steps=6)
    _fit(tmp_path / "real", Scripted(real), steps=6)
    for a, b in zip(_tau(tmp_path / "real"), _tau(tmp_path / "padded")):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


def _blow_up_after(step):
    def edit(k, b):  # batch k trains step k + 1
        if k + 1 > step:
            b["x"] = b["x"] * 1e4
        return b

    return edit


def test_divergence_keeps_only_healthy_checkpoints_and_names_the_last(tmp_path):
    wd = tmp_path / "run"
    rule = health.HealthRule(factor=10.0, warmup=3, patience=3)
    with pytest.raises(train_loop.TrainingDiverged) as exc:
        _fit(wd, Scripted(_blow_up_after(9)), steps=40, health=rule)
    msg = str(exc.value)
    # Reads at 2, 4, ..., healthy up to 8; the blow-up starts at step 10: unhealthy at the
    # reads of 10 and 12 (so the step-12 checkpoint is not saved), diverged at 14.
    assert "last healthy step 8" in msg and "the last healthy checkpoint is step 8" in msg
    assert "--restart" in msg and "learning_rate=0.003" in msg
    assert run_dir.checkpoint_steps(wd / "checkpoints") == [4, 8]
    assert not (wd / "task_vector").exists()


def test_a_spike_between_two_reads_is_seen(tmp_path):
    def spike(k, b):  # step 7 only: never a logged step (log_every=2 reads even steps)
        if k + 1 == 7:
            b["x"] = b["x"] * 1e4
        return b

    rule = health.HealthRule(factor=10.0, warmup=2, patience=1)
    with pytest.raises(train_loop.TrainingDiverged, match="at step 8 is above"):
        _fit(tmp_path / "run", Scripted(spike), steps=20, health=rule)


def test_nan_diverges_at_once_naming_no_healthy_checkpoint(tmp_path):
    def nan(k, b):
        b["x"] = b["x"] * np.nan
        return b

    with pytest.raises(train_loop.TrainingDiverged, match="non-finite values at step 2"):
        _fit(tmp_path / "run", Scripted(nan), steps=8)
    assert run_dir.checkpoint_steps(tmp_path / "run" / "checkpoints") == []
