"""Classification metrics on host arrays: accuracy, balanced accuracy, macro F1 and ROC AUC.

``labels`` are integer classes [N]; ``predicted`` integer classes [N]; ``scores`` per-class
probabilities [N, C] (or [N] positive-class scores for two classes). Definitions follow
scikit-learn's (the tests compare against it).
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata


def accuracy(labels: np.ndarray, predicted: np.ndarray) -> float:
    return float(np.mean(np.asarray(labels) == np.asarray(predicted)))


def _confusion(labels: np.ndarray, predicted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(classes seen in labels or predictions, confusion matrix [true, predicted] over them)."""
    classes = np.union1d(labels, predicted)
    t, p = np.searchsorted(classes, labels), np.searchsorted(classes, predicted)
    matrix = np.zeros((len(classes), len(classes)), np.int64)
    np.add.at(matrix, (t, p), 1)
    return classes, matrix


def balanced_accuracy(labels: np.ndarray, predicted: np.ndarray) -> float:
    """Mean recall over the classes present in ``labels``."""
    _, matrix = _confusion(labels, predicted)
    support = matrix.sum(1)
    present = support > 0
    return float(np.mean(np.diag(matrix)[present] / support[present]))


def macro_f1(labels: np.ndarray, predicted: np.ndarray) -> float:
    """Unweighted mean of per-class F1 over the classes in labels or predictions (an F1 with
    no true and no predicted positives counts 0, as scikit-learn's zero_division=0)."""
    _, matrix = _confusion(labels, predicted)
    tp = np.diag(matrix).astype(np.float64)
    denom = matrix.sum(0) + matrix.sum(1)  # 2 TP + FP + FN
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    return float(f1.mean())


def binary_auc(positive: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC of ``scores`` for the boolean ``positive``: the Mann-Whitney U statistic with
    average ranks for ties; NaN when a class is absent."""
    positive = np.asarray(positive, bool)
    n_pos, n_neg = positive.sum(), (~positive).sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Binary AUC (``scores`` [N] or [N, 2]) or the macro one-vs-rest AUC over the classes of
    ``scores`` [N, C]."""
    labels, scores = np.asarray(labels), np.asarray(scores, np.float64)
    if scores.ndim == 1 or scores.shape[1] == 2:
        return binary_auc(labels == 1, scores if scores.ndim == 1 else scores[:, 1])
    return float(np.mean([binary_auc(labels == c, scores[:, c]) for c in range(scores.shape[1])]))
