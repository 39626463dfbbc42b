"""Evaluation: logits, loss and accuracy of a model over a decoded split, and per class.

Always in eval() mode under inference_mode(): the chapter evaluated with dropout on and
gradients tracked, which both lowers the measured accuracy and wastes time.

An overall accuracy hides how each class fares, so `evaluate` also returns the confusion
matrix and a per-class table. Everything is counted with numpy from ONE vector of
predictions, so the overall accuracy, the per-class accuracies and the matrix agree by
construction (overall = support-weighted mean of per-class).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import class_metric_name
from pipeline.errors import PipelineError
from pipeline.files import atomic_write

PER_CLASS_COLUMNS = ("class_id", "class_name", "support", "correct", "accuracy", "precision", "recall", "f1")


def images_to_tensor(images: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 (N, H, W) -> float32 (N, 1, H, W) in [0, 1], the scaling ToTensor() applies."""
    tensor = torch.from_numpy(np.ascontiguousarray(images))
    return tensor.to(device).unsqueeze(1).float().div_(255.0)


def compute_logits(model: nn.Module, inputs: torch.Tensor, batch_size: int = 200) -> torch.Tensor:
    """Run `model` over `inputs` in eval mode, batch by batch; restores the model's mode."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            return torch.cat([model(inputs[i : i + batch_size]) for i in range(0, len(inputs), batch_size)])
    finally:
        model.train(was_training)


def loss_and_accuracy(logits: torch.Tensor, labels: torch.Tensor, split: str = "test") -> dict[str, float]:
    """`<split>_loss` and `<split>_accuracy`: test_..., or val_... for the validation split."""
    labels = labels.to(logits.device)
    return {
        f"{split}_loss": F.cross_entropy(logits, labels).item(),
        f"{split}_accuracy": (logits.argmax(1) == labels).float().mean().item(),
    }


# --------------------------------------------------------------------------- per class


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """(K, K) int64 counts: rows are true classes, columns predicted classes."""
    labels, predictions = np.asarray(labels, dtype=np.int64), np.asarray(predictions, dtype=np.int64)
    if labels.shape != predictions.shape:
        raise ValueError(f"labels {labels.shape} and predictions {predictions.shape} differ in shape")
    for name, values in (("labels", labels), ("predictions", predictions)):
        if values.size and (values.min() < 0 or values.max() >= num_classes):
            raise ValueError(f"{name} outside 0..{num_classes - 1}")
    flat = np.bincount(labels * num_classes + predictions, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes)


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    # 0/0 -> 0, sklearn's zero_division=0: a class never predicted has precision 0, not NaN,
    # so macro averages stay defined.
    numerator, denominator = np.asarray(numerator, float), np.asarray(denominator, float)
    return np.divide(numerator, denominator, out=np.zeros_like(numerator), where=denominator > 0)


def per_class_table(confusion: np.ndarray, class_names: Sequence[str]) -> pd.DataFrame:
    """One row per class: support, correct, accuracy (= correct/support = recall), precision, F1."""
    confusion = np.asarray(confusion)
    if confusion.shape != (len(class_names), len(class_names)):
        raise ValueError(f"confusion matrix {confusion.shape} does not match {len(class_names)} class names")
    correct = np.diag(confusion)
    support = confusion.sum(axis=1)
    predicted = confusion.sum(axis=0)
    recall = _ratio(correct, support)
    precision = _ratio(correct, predicted)
    f1 = _ratio(2 * precision * recall, precision + recall)
    return pd.DataFrame(
        {
            "class_id": np.arange(len(class_names)),
            "class_name": list(class_names),
            "support": support,
            "correct": correct,
            "accuracy": recall,
            "precision": precision,
            "recall": recall,
            "f1": f1,
        },
        columns=list(PER_CLASS_COLUMNS),
    )


@dataclass
class Evaluation:
    """What `evaluate` measured; arrays are aligned with the split's images."""

    class_names: list[str]
    metrics: dict[str, float]  # test_accuracy, test_loss, test_macro_*, test_accuracy_<class>
    per_class: pd.DataFrame  # PER_CLASS_COLUMNS, one row per class id
    confusion: np.ndarray  # (K, K) counts, rows true, columns predicted
    labels: np.ndarray  # (N,) int64
    predictions: np.ndarray  # (N,) int64
    probabilities: np.ndarray  # (N, K) float32 softmax

    def weakest(self, n: int = 3) -> pd.DataFrame:
        """The n classes with the lowest accuracy, worst first (ties: lower class id first)."""
        return self.per_class.sort_values(["accuracy", "class_id"], kind="stable").head(n)

    def most_confident_mistakes(self, n: int) -> np.ndarray:
        """Indices of wrong predictions, highest confidence in the wrong class first."""
        wrong = np.flatnonzero(self.predictions != self.labels)
        confidence = self.probabilities[wrong, self.predictions[wrong]]
        return wrong[np.argsort(-confidence, kind="stable")[:n]]


def summarize(
    labels: np.ndarray,
    predictions: np.ndarray,
    probabilities: np.ndarray,
    class_names: Sequence[str],
    test_loss: float,
) -> Evaluation:
    """Count everything from one vector of predictions: the torch-free half of `evaluate`."""
    predictions = np.asarray(predictions, dtype=np.int64)
    confusion = confusion_matrix(labels, predictions, len(class_names))
    table = per_class_table(confusion, class_names)
    metrics = {
        "test_accuracy": float(np.trace(confusion) / max(confusion.sum(), 1)),
        "test_loss": float(test_loss),
        "test_macro_precision": float(table["precision"].mean()),
        "test_macro_recall": float(table["recall"].mean()),
        "test_macro_f1": float(table["f1"].mean()),
        **{class_metric_name(row.class_name): float(row.accuracy) for row in table.itertuples()},
    }
    return Evaluation(
        class_names=list(class_names),
        metrics=metrics,
        per_class=table,
        confusion=confusion,
        labels=np.asarray(labels, dtype=np.int64),
        predictions=predictions,
        probabilities=np.asarray(probabilities, dtype=np.float32),
    )


def check_fits(model: nn.Module, images: np.ndarray, labels: np.ndarray, class_names: Sequence[str]) -> None:
    """A model that doesn't fit the data fails here, with what to do, not deep in a layer."""
    input_shape = tuple(getattr(model, "input_shape", ()))
    if images.ndim != 3:
        raise PipelineError(f"expected images shaped (N, height, width), got {images.shape}")
    if input_shape and tuple(images.shape[1:]) != tuple(input_shape[1:]):
        raise PipelineError(
            f"the model takes {input_shape[1]}x{input_shape[2]} images but the data has "
            f"{images.shape[1]}x{images.shape[2]}; evaluate it on the data it was trained for (--data-dir)"
        )
    if len(labels) == 0:
        raise PipelineError("the test split is empty; nothing to evaluate")
    if labels.min() < 0 or labels.max() >= len(class_names):
        raise PipelineError(
            f"the data has labels up to {labels.max()} but the model knows {len(class_names)} classes "
            f"(0..{len(class_names) - 1}); evaluate it on the data it was trained for (--data-dir)"
        )


def evaluate(
    model: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    batch_size: int = 200,
    device: torch.device | str = "cpu",
    logits: torch.Tensor | None = None,
) -> Evaluation:
    """Evaluate `model` on uint8 images (N, H, W) with int labels (N,); see `Evaluation`.

    `logits`: the model's outputs on `images` if they were already computed (by training's last
    evaluation, in `pipeline run`), so the test set is not run through the model again.
    """
    if batch_size < 1:
        raise PipelineError(f"batch_size must be at least 1, got {batch_size}")
    labels = np.asarray(labels, dtype=np.int64)
    check_fits(model, images, labels, class_names)
    if logits is None:
        model = model.to(device)
        logits = compute_logits(model, images_to_tensor(images, device), batch_size)
    elif len(logits) != len(labels):
        raise PipelineError(f"{len(logits)} precomputed logits for {len(labels)} images")
    if logits.ndim != 2 or logits.shape[1] != len(class_names):
        raise PipelineError(
            f"the model outputs {tuple(logits.shape[1:])} scores per image but has {len(class_names)} class names"
        )
    test_loss = F.cross_entropy(logits, torch.from_numpy(labels).to(logits.device)).item()
    # Predictions from the logits, as loss_and_accuracy takes them during training.
    predictions = logits.argmax(1).cpu().numpy()
    probabilities = torch.softmax(logits.float(), dim=1).cpu().numpy()
    return summarize(labels, predictions, probabilities, class_names, test_loss)


# --------------------------------------------------------------------------- report

# Training series the curves figure reads back from the run's metric history.
CURVE_METRICS = ("train_loss_step", "train_loss", "test_loss", "test_accuracy")
PER_CLASS_CSV = "per_class.csv"
CONFUSION_CSV = "confusion_matrix.csv"  # the numbers behind confusion_matrix.png
PER_CLASS_TABLE = "per_class.json"  # the same table through mlflow.log_table (a .json artifact)
FIGURES = ("confusion_matrix.png", "misclassified.png", "samples.png", "training_curves.png")


@dataclass
class ReportConfig:
    samples: int = 20  # random test images in samples.png, as in the chapter's listing 5-5
    sample_seed: int = 0  # the same images every time, so two runs' figures compare
    mistakes: int = 24  # most confident mistakes in misclassified.png


def _write_csv(table: pd.DataFrame, path: Path, index: bool = True) -> Path:
    with atomic_write(path, "w", newline="") as handle:
        table.to_csv(handle, index=index)
    return path


def write_report(
    evaluation: Evaluation,
    images: np.ndarray,
    history: pd.DataFrame,
    folder: Path,
    subtitle: str = "",
    config: ReportConfig | None = None,
) -> list[Path]:
    """per_class.csv, confusion_matrix.csv and the four figures into `folder`; returns their paths."""
    from pipeline import figures

    config = config or ReportConfig()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    e, names = evaluation, evaluation.class_names
    confusion = pd.DataFrame(e.confusion, index=pd.Index(names, name="true"), columns=names)
    tables = [
        _write_csv(e.per_class, folder / PER_CLASS_CSV, index=False),
        _write_csv(confusion, folder / CONFUSION_CSV),
    ]

    rng = np.random.default_rng(config.sample_seed)
    sample = rng.choice(len(e.labels), size=min(config.samples, len(e.labels)), replace=False)
    drawn = {
        "confusion_matrix.png": figures.confusion_matrix_figure(e.confusion, names, subtitle),
        "misclassified.png": figures.misclassified_figure(
            images,
            e.labels,
            e.predictions,
            e.probabilities,
            e.most_confident_mistakes(config.mistakes),
            names,
            subtitle=subtitle,
        ),
        "samples.png": figures.samples_figure(images, e.labels, e.predictions, sample, names, subtitle=subtitle),
        "training_curves.png": figures.training_curves_figure(history, subtitle),
    }
    return tables + [figures.save_figure(fig, folder / name) for name, fig in drawn.items()]


def _pct(value: float) -> str:
    return f"{value:6.1%}"


def format_evaluation(evaluation: Evaluation, weakest: int = 3) -> str:
    """The per-class table, the weakest classes with what they are taken for, and the totals."""
    e = evaluation
    width = max(len("class"), *(len(name) for name in e.class_names))
    lines = [
        f"{'id':>2}  {'class':<{width}}  {'support':>7}  {'correct':>7}  {'accuracy':>8}  "
        f"{'precision':>9}  {'recall':>6}  {'F1':>6}"
    ]
    for row in e.per_class.itertuples():
        lines.append(
            f"{row.class_id:>2}  {row.class_name:<{width}}  {row.support:>7,}  {row.correct:>7,}  "
            f"{_pct(row.accuracy):>8}  {_pct(row.precision):>9}  {_pct(row.recall):>6}  {_pct(row.f1):>6}"
        )
    lines.append("")
    lines.append(f"Weakest {weakest} classes:")
    for row in e.weakest(weakest).itertuples():
        confused = e.confusion[row.class_id].copy()
        confused[row.class_id] = 0
        other = int(confused.argmax())
        taken = (
            f"most often taken for {e.class_names[other]} ({confused[other]:,} of {row.support:,})"
            if confused[other]
            else "never confused"
        )
        lines.append(f"  {row.class_name:<{width}}  {row.accuracy:6.1%}  {taken}")
    m = e.metrics
    correct, total = int(np.trace(e.confusion)), int(e.confusion.sum())
    lines.append("")
    lines.append(
        f"Overall: accuracy {m['test_accuracy']:.2%} ({correct:,} / {total:,}), loss {m['test_loss']:.4f}, "
        f"macro precision {m['test_macro_precision']:.2%}, recall {m['test_macro_recall']:.2%}, "
        f"F1 {m['test_macro_f1']:.2%}"
    )
    return "\n".join(lines)
