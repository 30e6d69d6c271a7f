"""health.assess on synthetic loss / gradient-norm sequences."""

import math

import numpy as np
import pytest

from llora_jax.train import health

RULE = health.HealthRule(factor=10.0, window=4, warmup=3, patience=2)


def _run(norms, rule=RULE, losses=None):
    state, verdicts = health.HealthState(), []
    for i, g in enumerate(norms):
        loss = 1.0 if losses is None else losses[i]
        v, state = health.assess(rule, state, step=(i + 1) * 10, loss=loss, grad_norm=g)
        verdicts.append(v)
        if v == health.DIVERGED:
            break
    return verdicts, state


def test_steady_and_decreasing_norms_are_healthy():
    rng = np.random.default_rng(0)
    norms = np.exp(-np.linspace(0, 3, 200)) * (1 + 0.3 * rng.random(200))
    verdicts, state = _run(norms, health.HealthRule())
    assert set(verdicts) == {health.HEALTHY} and state.last_healthy_step == 2000


def test_bound_is_factor_times_median_and_inclusive():
    # History 1, 2, 3 -> median 2 -> bound 20: 20 passes, 20.001 does not.
    _, state = _run([1.0, 2.0, 3.0])
    assert health.bound(RULE, state) == 20.0
    v, _ = health.assess(RULE, state, 40, 1.0, 20.0)
    assert v == health.HEALTHY
    v, s = health.assess(RULE, state, 40, 1.0, 20.001)
    assert v == health.UNHEALTHY and "above 20" in s.reason


def test_median_uses_only_the_last_window_norms():
    _, state = _run([100.0, 100.0, 1.0, 1.0, 1.0, 1.0])  # window 4 -> median 1
    assert health.bound(RULE, state) == 10.0


def test_no_bound_during_warmup():
    verdicts, state = _run([1.0, 1000.0])
    assert verdicts == [health.HEALTHY, health.HEALTHY] and math.isinf(health.bound(RULE, state))


def test_a_single_spike_is_unhealthy_and_kept_out_of_the_history():
    verdicts, state = _run([1.0, 1.0, 1.0, 50.0, 1.0])
    assert verdicts == [health.HEALTHY] * 3 + [health.UNHEALTHY, health.HEALTHY]
    assert state.norms == (1.0, 1.0, 1.0, 1.0) and state.last_healthy_step == 50
    assert state.unhealthy_run == 0


def test_a_sustained_blow_up_diverges_after_patience_checks():
    # The norm of the run: 184 after a history near 1.
    verdicts, state = _run([1.2, 0.9, 1.1, 184.0, 400.0, 1.0])
    assert verdicts == [health.HEALTHY] * 3 + [health.UNHEALTHY, health.DIVERGED]
    assert state.last_healthy_step == 30 and "for 2 checks in a row" in state.reason


def test_gradual_drift_is_tolerated():
    # x1.05 per check: the window median lags ~2 checks behind, far below the 10x bound.
    verdicts, _ = _run(1.05 ** np.arange(100))
    assert set(verdicts) == {health.HEALTHY}


@pytest.mark.parametrize("loss, norm", [(float("nan"), 1.0), (1.0, float("inf")), (1.0, -math.inf)])
def test_non_finite_diverges_at_once(loss, norm):
    verdicts, state = _run([1.0, 1.0, norm], losses=[1.0, 1.0, loss])
    assert verdicts == [health.HEALTHY, health.HEALTHY, health.DIVERGED]
    assert "non-finite" in state.reason and state.last_healthy_step == 20


def test_non_finite_parameters_diverge():
    v, s = health.assess(RULE, health.HealthState(), 10, 1.0, 1.0, params_finite=False)
    assert v == health.DIVERGED and "parameters" in s.reason


def test_message_names_last_healthy_step_and_gives_working_advice():
    _, state = _run([1.0, 1.0, 1.0, 184.0, 300.0])
    msg = health.divergence_message(
        state, learning_rate=1e-3, last_healthy_checkpoint=30, checkpoint_dir="/w/checkpoints"
    )
    assert "last healthy step 30" in msg and "step 30 in /w/checkpoints" in msg
    assert "learning_rate=0.0001" in msg and "--restart" in msg
    assert "clip" not in msg and "\n" not in msg
    none = health.divergence_message(
        health.HealthState(reason="x"),
        learning_rate=1.0,
        last_healthy_checkpoint=None,
        checkpoint_dir=None,
    )
    assert "no healthy checkpoint" in none and "no step was healthy" in none


@pytest.mark.parametrize(
    "kwargs", [{"factor": 1.0}, {"factor": math.nan}, {"window": 0}, {"patience": 0}]
)
def test_bad_rules_are_refused(kwargs):
    with pytest.raises(ValueError):
        health.HealthRule(**kwargs)
