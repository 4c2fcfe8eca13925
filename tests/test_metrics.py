"""The GLUE metrics against values worked out by hand (the scikit-learn / scipy definitions)."""

from __future__ import annotations

import numpy as np
import pytest

from bertvision.metrics import compute_metrics, f1, majority_baseline, mcc, pearson, spearman


def test_each_task_reports_its_official_metrics_primary_first():
    assert list(compute_metrics("mrpc", [1, 0], [1, 0])) == ["f1", "accuracy"]
    assert list(compute_metrics("qqp", [1, 0], [1, 0])) == ["f1", "accuracy"]
    assert list(compute_metrics("cola", [1, 0], [1, 0])) == ["mcc", "accuracy"]
    assert list(compute_metrics("stsb", [1.0, 2.0], [1.0, 2.0])) == ["pearson", "spearman"]
    for task in ("rte", "sst2", "mnli", "qnli", "wnli"):
        assert list(compute_metrics(task, [1, 0], [1, 0])) == ["accuracy"]


def test_binary_f1_accuracy_and_mcc_by_hand():
    predictions, labels = [1, 1, 0, 0, 1], [1, 0, 0, 1, 1]  # tp 2, fp 1, fn 1, tn 1
    assert compute_metrics("mrpc", predictions, labels) == pytest.approx(
        {"f1": 2 * 2 / (2 * 2 + 1 + 1), "accuracy": 3 / 5}
    )
    # (tp*tn - fp*fn) / sqrt((tp+fp)(tp+fn)(tn+fp)(tn+fn)) = (2 - 1) / sqrt(3*3*2*2)
    assert compute_metrics("cola", predictions, labels)["mcc"] == pytest.approx(1 / 6)


def test_mcc_matches_the_scikit_learn_documentation_example():
    # sklearn.metrics.matthews_corrcoef([+1, +1, +1, -1], [+1, -1, +1, +1]) == -0.33...
    assert mcc(np.array([1, -1, 1, 1]), np.array([1, 1, 1, -1])) == pytest.approx(-1 / 3)


def test_multiclass_mcc_by_hand():
    labels = np.array([0, 1, 2, 0, 1, 2])
    predictions = np.array([0, 1, 1, 0, 2, 2])
    # confusion rows/cols sum to (2, 2, 2), trace 4: (4*6 - 12) / sqrt((36 - 12)(36 - 12))
    assert mcc(predictions, labels) == pytest.approx(0.5)


def test_correlations_by_hand():
    labels = np.array([1.0, 2.0, 3.0, 4.0])
    predictions = np.array([1.0, 2.0, 3.0, 10.0])
    assert pearson(predictions, labels) == pytest.approx(14 / np.sqrt(50 * 5))
    assert spearman(predictions, labels) == pytest.approx(1.0)
    swapped = np.array([1.0, 3.0, 2.0, 4.0])  # one swap of ranks: rho = 1 - 6*2 / (4*15)
    assert spearman(swapped, labels) == pytest.approx(0.8)


def test_degenerate_inputs_give_numbers_not_nan():
    assert f1(np.array([0, 0]), np.array([0, 0])) == 0.0
    assert mcc(np.array([1, 1, 1]), np.array([0, 1, 0])) == 0.0
    assert pearson(np.array([2.0, 2.0, 2.0]), np.array([1.0, 2.0, 3.0])) == 0.0
    assert spearman(np.array([2.0, 2.0, 2.0]), np.array([1.0, 2.0, 3.0])) == 0.0


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="3 predictions for 2 labels"):
        compute_metrics("rte", [0, 1, 1], [0, 1])
    with pytest.raises(ValueError, match="no predictions"):
        compute_metrics("rte", [], [])
    with pytest.raises(ValueError, match="unknown task"):
        compute_metrics("squad9", [0], [0])


def test_the_majority_baseline_predicts_trains_most_frequent_label_on_dev(glue_dir):
    # WNLI train: 323 of class 0, 312 of class 1; dev: 40 of 71 are class 0.
    assert majority_baseline("wnli", glue_dir) == pytest.approx({"accuracy": 40 / 71})
    # MRPC train leans to paraphrase (1); dev: 279 of 408 are paraphrases.
    assert majority_baseline("mrpc", glue_dir) == pytest.approx(
        {"f1": 2 * 279 / (279 + 408), "accuracy": 279 / 408}
    )
    assert majority_baseline("stsb", glue_dir) == {"pearson": 0.0, "spearman": 0.0}  # a constant
    # RTE train: 1249 entailment (0), 1241 not; dev: 146 of 277 are entailment.
    assert majority_baseline("rte", glue_dir) == {"accuracy": 146 / 277}
    # SST-2 train: 37569 positive (1) of 67349; dev: 444 of 872 positive.
    assert majority_baseline("sst2", glue_dir) == {"accuracy": 444 / 872}
    # CoLA: a constant prediction has Matthews correlation 0.
    assert majority_baseline("cola", glue_dir)["mcc"] == 0.0
