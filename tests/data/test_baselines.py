"""Majority-class baselines (against hand counts) and the learns flag."""

import numpy as np
import pytest

from llora_jax.data.baselines import learning_table, learns, majority_baseline, majority_prediction


def test_majority_class_accuracy_and_matthews_on_cola_counts():
    # The shared CoLA files: train 2528 / 6023, test 162 / 354 (0 = unacceptable).
    train = np.array([0] * 2528 + [1] * 6023)
    test = np.array([0] * 162 + [1] * 354)
    base = majority_baseline("cola", train, test)
    assert base["accuracy"] == pytest.approx(354 / 516)  # 0.686, the figure the issue quotes
    assert base["matthews"] == 0.0


def test_f1_of_the_majority_class():
    train = np.array([1, 1, 0])
    test = np.array([1, 0, 0, 1, 1])
    base = majority_baseline("mrpc", train, test)  # always "equivalent" (1)
    # precision 3/5, recall 1: F1 = 2·0.6/(1.6)
    assert base["f1"] == pytest.approx(0.75)
    assert base["accuracy"] == pytest.approx(0.6)
    # the minority as majority: F1 of a predictor that never says 1 is 0
    assert majority_baseline("mrpc", [0, 0, 1], test)["f1"] == 0.0


def test_regression_baseline_is_the_mean_with_zero_correlation():
    assert majority_prediction([1.0, 2.0, 4.5], regression=True) == pytest.approx(2.5)
    base = majority_baseline("stsb", np.array([1.0, 2.0, 4.5]), np.array([0.5, 2.5, 3.0]))
    assert base["spearman"] == 0.0 and base["pearson"] == 0.0
    assert base["accuracy"] == pytest.approx(1 / 3)  # 2.5 matches 2.5 on the 0.2 grid


def test_tie_takes_the_lowest_label_and_bad_input():
    assert majority_prediction([2, 1, 2, 1]) == 1
    with pytest.raises(ValueError, match="integers"):
        majority_prediction([0.5, 1.0])
    with pytest.raises(ValueError, match="no training labels"):
        majority_prediction([])


def test_learns_flag():
    assert learns(0.72, 0.70)  # exactly 2 points (despite 0.72 - 0.70 < 0.02 in floats)
    assert not learns(0.676, 0.686)  # CoLA today
    # RTE today: 0.551 against its majority class (train 697 / 686, test 698 / 686): +4.7 points.
    rte = majority_baseline("rte", [0] * 697 + [1] * 686, [0] * 698 + [1] * 686)["accuracy"]
    assert rte == pytest.approx(698 / 1384)
    assert learns(0.551, rte)
    assert not learns(float("nan"), 0.5)
    assert learns(0.55, 0.5, margin=0.05)
    table = learning_table({"cola": 0.676, "sst2": 0.85}, {"cola": 0.686, "sst2": 0.501})
    assert [table[t]["learns"] for t in ("cola", "sst2")] == [False, True]
    assert table["cola"]["margin_over_baseline"] == pytest.approx(-0.01)
    with pytest.raises(ValueError, match="rte"):
        learning_table({"rte": 0.6}, {})
