"""How far to trust a model's confidence: ECE, NLL, Brier score, the reliability diagram's bins,
and temperature scaling (Guo et al., ICML 2017). numpy only, so the predictor could use it too.

A model is calibrated when, of the images it gives 80 % confidence, 80 % are right. ECE is the
gap between confidence and accuracy averaged over equal-width confidence bins (weighted by how
many images fall in each). Temperature scaling divides every logit by one number T, fitted on
the validation split by minimising the NLL: the predicted class (the argmax) never changes, so
accuracy is untouched, only the confidences move.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.errors import PipelineError

ECE_BINS = 15  # equal-width confidence bins, as in Guo et al.
# The temperature's search range: far beyond any trained classifier's (about 0.5 to 5).
TEMPERATURE_RANGE = (0.05, 20.0)


def log_softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """float64 log-probabilities of logits / temperature, row by row."""
    scaled = np.asarray(logits, dtype=np.float64) / float(temperature)
    scaled = scaled - scaled.max(axis=1, keepdims=True)
    return scaled - np.log(np.exp(scaled).sum(axis=1, keepdims=True))


def probabilities(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    return np.exp(log_softmax(logits, temperature))


def nll(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood of the true class (the cross-entropy)."""
    picked = np.asarray(probs, dtype=np.float64)[np.arange(len(labels)), labels]
    return float(-np.log(np.clip(picked, 1e-12, None)).mean())


def brier(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean over images of the squared distance between the probabilities and the one-hot label (0..2)."""
    probs = np.asarray(probs, dtype=np.float64)
    onehot = np.zeros_like(probs)
    onehot[np.arange(len(labels)), labels] = 1.0
    return float(((probs - onehot) ** 2).sum(axis=1).mean())


@dataclass
class Reliability:
    """The reliability diagram's bins: equal-width over [0, 1] of the top confidence."""

    edges: np.ndarray  # (bins + 1,)
    counts: np.ndarray  # (bins,) images per bin
    confidence: np.ndarray  # (bins,) mean top confidence in the bin (NaN where empty)
    accuracy: np.ndarray  # (bins,) fraction right in the bin (NaN where empty)

    @property
    def ece(self) -> float:
        used = self.counts > 0
        gaps = np.abs(self.accuracy[used] - self.confidence[used])
        return float((gaps * self.counts[used]).sum() / max(self.counts.sum(), 1))


def reliability(confidences: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> Reliability:
    """Bin images by their confidence; bin b holds (edges[b], edges[b+1]], the first also 0."""
    confidences = np.asarray(confidences, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, confidences, side="left") - 1, 0, bins - 1)
    counts = np.bincount(which, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence = np.bincount(which, confidences, minlength=bins) / counts
        accuracy = np.bincount(which, correct, minlength=bins) / counts
    return Reliability(edges, counts, mean_confidence, accuracy)


def reliability_of(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> Reliability:
    probs = np.asarray(probs)
    return reliability(probs.max(axis=1), probs.argmax(axis=1) == np.asarray(labels), bins)


def ece(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error of the top-class confidence, `bins` equal-width bins."""
    return reliability_of(probs, labels, bins).ece


def fit_temperature(logits: np.ndarray, labels: np.ndarray, iterations: int = 80) -> float:
    """The T > 0 that minimises the NLL of softmax(logits / T): golden-section search on log T.

    The NLL is convex in 1/T, so it has one minimum; 80 golden-section steps narrow the range
    (a factor of 400) to well under 1e-12 in log T.
    """
    logits, labels = np.asarray(logits, dtype=np.float64), np.asarray(labels, dtype=np.int64)
    if len(labels) == 0:
        raise PipelineError("no validation images to fit a temperature on")

    def loss(log_t: float) -> float:
        return float(-log_softmax(logits, np.exp(log_t))[np.arange(len(labels)), labels].mean())

    low, high = np.log(TEMPERATURE_RANGE[0]), np.log(TEMPERATURE_RANGE[1])
    ratio = (np.sqrt(5) - 1) / 2
    a, b = high - ratio * (high - low), low + ratio * (high - low)
    fa, fb = loss(a), loss(b)
    for _ in range(iterations):
        if fa < fb:
            high, b, fb = b, a, fa
            a = high - ratio * (high - low)
            fa = loss(a)
        else:
            low, a, fa = a, b, fb
            b = low + ratio * (high - low)
            fb = loss(b)
    return float(np.exp((low + high) / 2))


def calibration_metrics(logits: np.ndarray, labels: np.ndarray, temperature: float | None) -> dict[str, float]:
    """test_ece, test_nll, test_brier of the raw model, and the same after temperature scaling
    (test_ece_calibrated, ...) when a temperature was fitted."""
    labels = np.asarray(labels, dtype=np.int64)
    raw = probabilities(logits)
    metrics = {"test_ece": ece(raw, labels), "test_nll": nll(raw, labels), "test_brier": brier(raw, labels)}
    if temperature is not None:
        scaled = probabilities(logits, temperature)
        metrics |= {
            "test_ece_calibrated": ece(scaled, labels),
            "test_nll_calibrated": nll(scaled, labels),
            "test_brier_calibrated": brier(scaled, labels),
        }
    return metrics
