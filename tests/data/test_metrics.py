"""Metrics against sklearn / scipy, and the handling of invalid generated strings."""

import numpy as np
import pytest
import scipy.stats
import sklearn.metrics as skm

from llora_jax import data
from llora_jax.data import metrics


@pytest.mark.parametrize("seed", range(5))
def test_classification_metrics_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    k = 2 if seed < 3 else 3
    labels = rng.integers(0, k, 200)
    preds = np.where(rng.random(200) < 0.6, labels, rng.integers(0, k, 200))
    assert metrics.accuracy(preds, labels) == pytest.approx(skm.accuracy_score(labels, preds))
    assert metrics.matthews_corrcoef(preds, labels) == pytest.approx(
        skm.matthews_corrcoef(labels, preds), abs=1e-12
    )
    if k == 2:
        assert metrics.f1_binary(preds, labels) == pytest.approx(skm.f1_score(labels, preds))


def test_degenerate_cases_match_sklearn():
    labels = np.array([0, 0, 1, 1])
    const = np.zeros(4, int)
    assert metrics.matthews_corrcoef(const, labels) == skm.matthews_corrcoef(labels, const) == 0.0
    assert metrics.f1_binary(const, labels) == skm.f1_score(labels, const, zero_division=0.0)


@pytest.mark.parametrize("seed", range(3))
def test_correlations_match_scipy(seed):
    rng = np.random.default_rng(seed)
    y = np.round(rng.uniform(0, 5, 300) * 5) / 5  # on a grid: many ties
    x = y + rng.normal(0, 1.0, 300)
    x[:50] = np.round(x[:50])  # ties in predictions too
    assert metrics.pearson(x, y) == pytest.approx(scipy.stats.pearsonr(x, y)[0], abs=1e-12)
    assert metrics.spearman(x, y) == pytest.approx(scipy.stats.spearmanr(x, y)[0], abs=1e-12)
    np.testing.assert_allclose(metrics.rankdata(y), scipy.stats.rankdata(y))


def test_compute_metrics_per_task_keys():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 64)
    preds = rng.integers(0, 2, 64)
    cola = data.compute_metrics("cola", preds, labels)
    assert set(cola) == {"accuracy", "matthews", "num_examples", "num_invalid"}
    assert cola["matthews"] == pytest.approx(skm.matthews_corrcoef(labels, preds))
    mrpc = data.compute_metrics("mrpc", preds, labels)
    assert mrpc["f1"] == pytest.approx(skm.f1_score(labels, preds))
    scores = rng.uniform(0, 5, 64)
    stsb = data.compute_metrics("stsb", scores + rng.normal(0, 1, 64), scores)
    assert set(stsb) >= {"pearson", "spearman", "accuracy"}


def test_generated_strings_invalid_counts_as_wrong():
    labels = np.array([0, 1, 1, 0, 1])
    strings = ["unacceptable", " acceptable ", "yes", "acceptable", "Acceptable"]
    out = data.compute_metrics("cola", strings, labels)
    assert out["num_invalid"] == 2  # "yes" and the wrongly-cased word
    # invalid predictions become the other class: [0, 1, 0, 1, 0]
    forced = np.array([0, 1, 0, 1, 0])
    assert out["accuracy"] == pytest.approx(skm.accuracy_score(labels, forced))
    assert out["matthews"] == pytest.approx(skm.matthews_corrcoef(labels, forced))
    out = data.compute_metrics("qqp", ["duplicate", "??", "not_duplicate"], [0, 1, 0])
    assert out["f1"] == pytest.approx(skm.f1_score([0, 1, 0], [1, 0, 0]))
    mnli = data.compute_metrics("mnli", ["neutral", "contradiction", "x"], [1, 2, 2])
    assert mnli["accuracy"] == pytest.approx(2 / 3) and mnli["num_invalid"] == 1


def test_stsb_strings_unparsable_reported_not_zero():
    labels = np.array([0.0, 1.0, 2.0, 3.8, 5.0, 2.6])
    strings = ["0.0", "1.2", "oops", "3.8", "5.0", "nan"]
    out = data.compute_metrics("stsb", strings, labels)
    assert out["num_invalid"] == 2
    valid = [0, 1, 3, 4]
    vals = np.array([0.0, 1.2, 3.8, 5.0])
    assert out["pearson"] == pytest.approx(scipy.stats.pearsonr(vals, labels[valid])[0])
    assert out["spearman"] == pytest.approx(scipy.stats.spearmanr(vals, labels[valid])[0])
    assert out["accuracy"] == pytest.approx(3 / 6)  # exact-match "{:.1f}", invalid = wrong
    # treating "oops" as 0.0 would give a different (wrong) answer
    as_zero = np.array([0.0, 1.2, 0.0, 3.8, 5.0, 0.0])
    assert out["pearson"] != pytest.approx(scipy.stats.pearsonr(as_zero, labels)[0])


def test_mask_drops_padding():
    labels = np.array([1, 0, 1, 1])
    preds = np.array([1, 0, 0, 0])
    out = data.compute_metrics("sst2", preds, labels, mask=np.array([1.0, 1.0, 0.0, 0.0]))
    assert out["accuracy"] == 1.0 and out["num_examples"] == 2


def test_vision_accuracy_and_out_of_range_ids():
    out = data.compute_metrics("mnist", np.array([1, 2, 10]), np.array([1, 3, 9]))
    assert out["accuracy"] == pytest.approx(1 / 3) and out["num_invalid"] == 1


def test_correlation_of_a_constant_prediction_is_zero():
    """Undefined (scipy: NaN) for a constant side; scored 0 so means and selection stay defined."""
    y = np.linspace(0.0, 5.0, 9)
    assert metrics.pearson(np.full(9, 2.5), y) == 0.0
    assert metrics.spearman(np.full(9, 2.5), y) == 0.0
    assert np.isnan(metrics.pearson(np.array([1.0]), np.array([2.0])))
