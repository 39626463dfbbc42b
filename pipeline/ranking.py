"""Ranking metrics: one-vs-rest ROC and precision-recall curves per class, their areas, top-k accuracy.

numpy only, written out (they are short) rather than taken from scikit-learn, which is not one of
the project's dependencies. Ties in the scores are handled as scikit-learn does: images with the
same score enter the curve together, at one threshold.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def _counts(positive: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """True and false positives at each distinct threshold, highest score first, and the thresholds."""
    positive = np.asarray(positive, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-scores, kind="stable")
    scores, positive = scores[order], positive[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]
    tps = np.cumsum(positive)[last_of_tie]
    fps = (last_of_tie + 1) - tps
    return tps.astype(np.float64), fps.astype(np.float64), scores[last_of_tie]


def roc_curve(positive: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate), from (0, 0) to (1, 1)."""
    tps, fps, _ = _counts(positive, scores)
    tpr = np.r_[0.0, tps] / max(tps[-1], 1.0)
    fpr = np.r_[0.0, fps] / max(fps[-1], 1.0)
    return fpr, tpr


def roc_auc(positive: np.ndarray, scores: np.ndarray) -> float:
    fpr, tpr = roc_curve(positive, scores)
    return float(np.trapezoid(tpr, fpr))


def precision_recall_curve(positive: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(recall, precision) at each threshold, highest threshold first, starting at recall 0, precision 1."""
    tps, fps, _ = _counts(positive, scores)
    precision = tps / (tps + fps)
    recall = tps / max(tps[-1], 1.0)
    return np.r_[0.0, recall], np.r_[1.0, precision]


def average_precision(positive: np.ndarray, scores: np.ndarray) -> float:
    """Sum over thresholds of (recall step) x precision: the step-wise area under the PR curve."""
    recall, precision = precision_recall_curve(positive, scores)
    return float((np.diff(recall) * precision[1:]).sum())


def top_k_accuracy(probs: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Fraction of images whose true class is among the k highest scores."""
    probs = np.asarray(probs)
    labels = np.asarray(labels, dtype=np.int64)
    true_score = probs[np.arange(len(labels)), labels]
    # Strictly higher scores than the true class's: fewer than k of them means it is in the top k.
    higher = (probs > true_score[:, None]).sum(axis=1)
    return float((higher < k).mean())


@dataclass
class Ranking:
    """Per-class one-vs-rest curves and areas, and the summary metrics."""

    class_names: list[str]
    roc: list[tuple[np.ndarray, np.ndarray]]  # per class (fpr, tpr)
    pr: list[tuple[np.ndarray, np.ndarray]]  # per class (recall, precision)
    roc_auc: np.ndarray  # (K,)
    average_precision: np.ndarray  # (K,)
    top2_accuracy: float

    @property
    def metrics(self) -> dict[str, float]:
        return {
            "test_macro_roc_auc": float(self.roc_auc.mean()),
            "test_macro_average_precision": float(self.average_precision.mean()),
            "test_top2_accuracy": self.top2_accuracy,
        }


def rank(probs: np.ndarray, labels: np.ndarray, class_names: list[str]) -> Ranking:
    labels = np.asarray(labels, dtype=np.int64)
    roc, pr, aucs, aps = [], [], [], []
    for k in range(len(class_names)):
        positive = labels == k
        roc.append(roc_curve(positive, probs[:, k]))
        pr.append(precision_recall_curve(positive, probs[:, k]))
        aucs.append(roc_auc(positive, probs[:, k]))
        aps.append(average_precision(positive, probs[:, k]))
    return Ranking(list(class_names), roc, pr, np.array(aucs), np.array(aps), top_k_accuracy(probs, labels, 2))
