"""The official GLUE metrics, computed exactly: accuracy, f1, mcc, pearson, spearman.

    compute_metrics("mrpc", predictions, labels)  # {"f1": 0.81, "accuracy": 0.72}

Which metrics a task reports, and which one model selection maximises (the first), is declared in
`glue.TASKS`. Predictions are class indices for classification and scores for regression (STS-B).
The formulas are those of scikit-learn (binary F1 of class 1, multi-class Matthews correlation)
and scipy (Pearson r, Spearman rho), written out with numpy so nothing else is needed.

Degenerate inputs follow scikit-learn's conventions instead of returning NaN, so a metric is
always a number JSON can hold: F1 with no positive prediction and no positive label is 0, the
Matthews correlation of a constant prediction or label vector is 0, and so is a correlation with
a constant vector.
"""

from __future__ import annotations

import numpy as np
from scipy import stats

from bertvision.glue import GlueTask, get_task, load_split


def accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(predictions == labels))


def f1(predictions: np.ndarray, labels: np.ndarray, positive: int = 1) -> float:
    """Binary F1 of the class `positive` (MRPC and QQP: "1", paraphrase / duplicate)."""
    predicted, actual = predictions == positive, labels == positive
    true_pos = int(np.sum(predicted & actual))
    denominator = int(np.sum(predicted)) + int(np.sum(actual))  # 2 tp + fp + fn
    return 2.0 * true_pos / denominator if denominator else 0.0


def mcc(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Matthews correlation coefficient, multi-class form (Gorodkin 2004), as scikit-learn."""
    classes, encoded = np.unique(np.concatenate([labels, predictions]), return_inverse=True)
    true, pred = encoded[: len(labels)], encoded[len(labels) :]
    confusion = np.zeros((len(classes), len(classes)), dtype=np.float64)
    np.add.at(confusion, (true, pred), 1.0)
    true_sum, pred_sum = confusion.sum(axis=1), confusion.sum(axis=0)
    samples, correct = confusion.sum(), np.trace(confusion)
    cov_true_pred = correct * samples - true_sum @ pred_sum
    cov_pred_pred = samples**2 - pred_sum @ pred_sum
    cov_true_true = samples**2 - true_sum @ true_sum
    if cov_pred_pred * cov_true_true == 0:
        return 0.0
    return float(cov_true_pred / np.sqrt(cov_true_true * cov_pred_pred))


def pearson(predictions: np.ndarray, labels: np.ndarray) -> float:
    if _constant(predictions) or _constant(labels):
        return 0.0
    return float(stats.pearsonr(predictions, labels).statistic)


def spearman(predictions: np.ndarray, labels: np.ndarray) -> float:
    if _constant(predictions) or _constant(labels):
        return 0.0
    return float(stats.spearmanr(predictions, labels).statistic)


def _constant(values: np.ndarray) -> bool:
    return bool(np.all(values == values[0]))


METRICS = {
    "accuracy": accuracy,
    "f1": f1,
    "mcc": mcc,
    "pearson": pearson,
    "spearman": spearman,
}


def compute_metrics(
    task: GlueTask | str, predictions: np.ndarray | list, labels: np.ndarray | list
) -> dict[str, float]:
    """The task's official metrics, in the task's order (the first is the primary one).

    Raises ValueError for predictions and labels of different lengths, none at all, or any that
    is NaN or infinite (a diverged model's): no metric is made up for them.
    """
    task = get_task(task) if isinstance(task, str) else task
    dtype = np.float64 if task.regression else np.int64
    predictions = np.asarray(predictions, dtype=np.float64).reshape(-1)
    labels = np.asarray(labels, dtype=np.float64).reshape(-1)
    for name, values in (("predictions", predictions), ("labels", labels)):
        bad = int(np.sum(~np.isfinite(values)))
        if bad:
            raise ValueError(
                f"{task.name}: {bad} of {values.size} {name} are NaN or infinite; "
                "no metric can be computed from them"
            )
    predictions, labels = predictions.astype(dtype), labels.astype(dtype)
    if predictions.shape != labels.shape:
        raise ValueError(
            f"{task.name}: {predictions.size} predictions for {labels.size} labels; "
            "they must be the same number"
        )
    if predictions.size == 0:
        raise ValueError(f"{task.name}: no predictions to score")
    scores = {name: METRICS[name](predictions, labels) for name in task.metrics}
    for name, value in scores.items():
        if not np.isfinite(value):  # e.g. a correlation of values too large to square
            raise ValueError(f"{task.name}: {name} of these predictions is {value}, not a number")
    return scores


def majority_baseline(task: GlueTask | str, data_dir: str | None = None) -> dict[str, float]:
    """Dev metrics (the first dev split's) of always predicting the most frequent TRAIN label
    (the smallest label on a tie); for regression (STS-B), the mean TRAIN score. What a model
    must beat to have learnt anything: RTE's train majority is entailment (0), right on
    146 of dev's 277 examples, accuracy 0.527.

    `data_dir`: a glue_data folder; None reads the Hugging Face hub (glue.load_split).
    """
    task = get_task(task) if isinstance(task, str) else task
    train = np.array([ex.label for ex in load_split(task, "train", data_dir)])
    dev = [ex.label for ex in load_split(task, task.dev_splits[0], data_dir)]
    if task.regression:
        constant = float(train.mean())
    else:
        constant = int(np.argmax(np.bincount(train.astype(np.int64), minlength=task.num_labels)))
    return compute_metrics(task, np.full(len(dev), constant), dev)
