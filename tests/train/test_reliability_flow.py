"""The pieces together, as the training loop will use them: a too-high rate diverges, the
message's advice (lower rate + --restart) works, and a resume with the new rate alone is
refused. The "model" is gradient descent on f(w) = a/2 |w|^2 (closed form: each step
multiplies w by 1 - lr*a, so lr*a > 2 diverges geometrically)."""

import numpy as np
import pytest

from llora_jax.train import health, run_dir
from llora_jax.train.loop import TrainingDiverged

A = 1.0
RULE = health.HealthRule(factor=10.0, window=50, warmup=5, patience=2)


def _config(lr, steps=60):
    return {"seed": 0, "steps": steps, "optim": {"learning_rate": lr}, "ckpt_every": 5}


def _train(workdir, lr, *, start_over=False, steps=60):
    """A miniature of the loop's wiring: lock, record, health gate on checkpoints."""
    fields = run_dir.run_fields(
        _config(lr, steps), backbone_fingerprint="bb", data_fingerprint="data"
    )
    with run_dir.workdir_lock(workdir):
        run_dir.prepare_workdir(workdir, fields, start_over=start_over)
        ckpt = workdir / "checkpoints"
        ckpt.mkdir(exist_ok=True)
        saved = run_dir.checkpoint_steps(ckpt)
        w = np.load(ckpt / str(saved[-1]) / "w.npy") if saved else np.ones(4)
        state, last_ckpt = health.HealthState(), (saved[-1] if saved else None)
        for step in range(saved[-1] + 1 if saved else 1, steps + 1):
            grad = A * w
            w = w - lr * grad
            verdict, state = health.assess(
                RULE, state, step, loss=0.5 * A * float(w @ w), grad_norm=np.linalg.norm(grad)
            )
            if verdict == health.DIVERGED:
                raise TrainingDiverged(
                    health.divergence_message(
                        state,
                        learning_rate=lr,
                        last_healthy_checkpoint=last_ckpt,
                        checkpoint_dir=str(ckpt),
                    )
                )
            if verdict == health.HEALTHY and step % 5 == 0:  # checkpoint only healthy states
                (ckpt / str(step)).mkdir()
                np.save(ckpt / str(step) / "w.npy", w)
                last_ckpt = step
        return w


def test_too_high_rate_diverges_then_the_advice_works(tmp_path):
    wd = tmp_path / "run"
    with pytest.raises(TrainingDiverged) as exc:
        _train(wd, lr=2.5)  # |1 - 2.5| = 1.5: the norm grows 1.5x per step
    msg = str(exc.value)
    # 1.5^k first exceeds 10 x median (~1.5^(k/2)) at k = 6 after warm-up; patience 2.
    assert "last healthy step" in msg and "--restart" in msg and "clip" not in msg
    healthy = int(msg.split("last healthy step ")[1].split(";")[0])
    kept = run_dir.checkpoint_steps(wd / "checkpoints")
    assert kept and max(kept) <= healthy  # no checkpoint after the last healthy step
    # The advised rate alone, without --restart, is refused: it would mix two rates.
    with pytest.raises(run_dir.RunMismatch, match="optim.learning_rate: 2.5 -> 0.25"):
        _train(wd, lr=0.25)
    w = _train(wd, lr=0.25, start_over=True)
    np.testing.assert_allclose(w, 0.75**60 * np.ones(4))  # closed form of a fresh run
    assert any(p.name.startswith("run.old-") for p in tmp_path.iterdir())


def test_extending_steps_resumes_from_the_last_checkpoint(tmp_path):
    wd = tmp_path / "run"
    _train(wd, lr=0.25, steps=20)
    w = _train(wd, lr=0.25, steps=40)  # steps is a safe field: resumes at step 20
    np.testing.assert_allclose(w, 0.75**40 * np.ones(4))
    assert run_dir.read_run_record(wd)["fields"]["steps"] == 40
