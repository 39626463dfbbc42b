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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from pipeline import calibration, ranking
from pipeline.config import class_metric_name, slug
from pipeline.errors import PipelineError
from pipeline.explain import FeatureMaps
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
    # How far to trust it (add_trust): ranking curves, reliability before and after temperature scaling.
    logits: np.ndarray | None = None  # (N, K) float32, the model's raw outputs
    ranking: ranking.Ranking | None = None
    reliability: calibration.Reliability | None = None
    calibrated: calibration.Reliability | None = None  # None when no temperature was fitted
    temperature: float | None = None  # fitted on the validation split; None without one
    validation_images: int = 0  # how many the temperature was fitted on
    explanations: Explanations | None = None  # explain_evaluation's, None with --no-explain
    notes: list[str] = field(default_factory=list)  # what was left out and why, for the log

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
    validation: tuple[np.ndarray, np.ndarray] | None = None,
    val_logits: torch.Tensor | None = None,
    temperature: tuple[float, int] | None = None,
) -> Evaluation:
    """Evaluate `model` on uint8 images (N, H, W) with int labels (N,); see `Evaluation`.

    `logits`: the model's outputs on `images` if they were already computed (by training's last
    evaluation, in `pipeline run`), so the test set is not run through the model again.
    `validation`: (images, labels) the model was not trained on, to fit a temperature on; None: no
    temperature (the Evaluation's notes say so). `val_logits`: the model's outputs on them if already
    computed (training's last validation, in `pipeline run`). `temperature`: (T, validation images it
    was fitted on) when the model already has one: used as it is, nothing is fitted again.
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
    result = summarize(labels, predictions, probabilities, class_names, test_loss)
    fit_logits = val_labels = None
    if temperature is not None:
        return add_trust(result, logits.float().cpu().numpy(), temperature=temperature)
    if validation is not None and len(validation[1]):
        val_images, val_labels = validation
        check_fits(model, val_images, np.asarray(val_labels, dtype=np.int64), class_names)
        if val_logits is None or len(val_logits) != len(val_labels):
            model = model.to(device)
            val_logits = compute_logits(model, images_to_tensor(val_images, device), batch_size)
        fit_logits = val_logits.float().cpu().numpy()
    return add_trust(result, logits.float().cpu().numpy(), fit_logits, val_labels)


def add_trust(
    evaluation: Evaluation,
    logits: np.ndarray,
    val_logits: np.ndarray | None = None,
    val_labels: np.ndarray | None = None,
    temperature: tuple[float, int] | None = None,
) -> Evaluation:
    """Ranking metrics (ROC, PR, top-2) and calibration (ECE, NLL, Brier; a temperature fitted on the
    validation logits, when given, or the model's own `temperature` (T, images it was fitted on), and
    the same after it) into `evaluation`, whose metrics gain them."""
    e = evaluation
    e.logits = np.asarray(logits, dtype=np.float32)
    e.ranking = ranking.rank(e.probabilities, e.labels, e.class_names)
    e.metrics |= e.ranking.metrics
    e.metrics |= {f"test_roc_auc_{slug(n)}": float(a) for n, a in zip(e.class_names, e.ranking.roc_auc, strict=True)}
    e.reliability = calibration.reliability_of(calibration.probabilities(logits), e.labels)
    if temperature is not None:
        e.temperature, e.validation_images = float(temperature[0]), int(temperature[1])
    elif val_logits is not None and val_labels is not None and len(val_labels):
        e.temperature = calibration.fit_temperature(val_logits, val_labels)
        e.validation_images = len(val_labels)
        low, high = calibration.TEMPERATURE_RANGE
        if not low * 1.001 < e.temperature < high / 1.001:
            e.notes.append(
                f"the temperature stopped at the end of its range ({e.temperature:.3g}; range {low:g} to {high:g}): "
                "the validation split is classified all right (the NLL keeps falling as T shrinks) or the model "
                "is no better than chance there"
            )
    if e.temperature is not None:
        e.calibrated = calibration.reliability_of(calibration.probabilities(logits, e.temperature), e.labels)
    else:
        e.notes.append("no validation split (val_size 0): no temperature fitted, probabilities left as they are")
    e.metrics |= calibration.calibration_metrics(logits, e.labels, e.temperature)
    return e


# --------------------------------------------------------------------------- explanations


@dataclass
class Explanations:
    """What `explain_evaluation` drew from the model, for write_report's figures."""

    method: str  # "Grad-CAM on layer2.0" or "gradient saliency"
    filters: np.ndarray | None  # first convolution's weights (out, in, kh, kw); None without one
    filters_layer: str | None
    examples: np.ndarray  # one test index per class (a correct one where there is), for the feature maps
    feature_maps: list[FeatureMaps]  # after each convolution and pooling, for `examples`
    mistakes: np.ndarray  # test indices, most confident mistakes first
    mistake_maps: np.ndarray  # (len(mistakes), H, W) in [0, 1]
    confident: np.ndarray  # per class, most and least confident correct image (test indices)
    confident_maps: np.ndarray  # (len(confident), H, W) in [0, 1]


def class_examples(e: Evaluation) -> np.ndarray:
    """One test image per class that has one: the first one predicted right, else the first one."""
    found = []
    for k in range(len(e.class_names)):
        right = np.flatnonzero((e.labels == k) & (e.predictions == k))
        anyone = np.flatnonzero(e.labels == k)
        if len(right) or len(anyone):
            found.append(int(right[0] if len(right) else anyone[0]))
    return np.asarray(found, dtype=np.int64)


def confident_extremes(e: Evaluation) -> np.ndarray:
    """For each class, the correct test image with the highest and the one with the lowest confidence."""
    found = []
    for k in range(len(e.class_names)):
        right = np.flatnonzero((e.labels == k) & (e.predictions == k))
        if len(right):
            confidence = e.probabilities[right, k]
            found += [int(right[np.argmax(confidence)]), int(right[np.argmin(confidence)])]
    return np.asarray(found, dtype=np.int64)


def explain_evaluation(
    model: nn.Module, images: np.ndarray, evaluation: Evaluation, mistakes: int = 24
) -> Explanations:
    """Filters, feature maps and explanations of `model` for `evaluation`'s test images; notes in evaluation."""
    from pipeline import explain

    e = evaluation
    model = model.cpu()
    examples = class_examples(e)
    wrong = e.most_confident_mistakes(mistakes)
    confident = confident_extremes(e)

    def maps(indices: np.ndarray) -> np.ndarray:
        if not len(indices):
            return np.zeros((0, *images.shape[1:]), dtype=np.float32)
        return explain.normalised(explain.explain(model, images_to_tensor(images[indices]), e.predictions[indices]))

    convs = explain.conv_layers(model)
    if not convs:
        e.notes.append(
            f"{type(model).__name__} has no convolutions: gradient saliency maps instead of Grad-CAM, "
            "no filter or feature-map figures"
        )
    return Explanations(
        method=explain.method_name(model),
        filters=explain.first_filters(model),
        filters_layer=convs[0][0] if convs else None,
        examples=examples,
        feature_maps=explain.feature_maps(model, images_to_tensor(images[examples])) if convs else [],
        mistakes=wrong,
        mistake_maps=maps(wrong),
        confident=confident,
        confident_maps=maps(confident),
    )


# --------------------------------------------------------------------------- report

# Training series the curves figure reads back from the run's metric history.
CURVE_METRICS = ("train_loss_step", "train_loss", "test_loss", "test_accuracy")
PER_CLASS_CSV = "per_class.csv"
CONFUSION_CSV = "confusion_matrix.csv"  # the numbers behind confusion_matrix.png
PER_CLASS_TABLE = "per_class.json"  # the same table through mlflow.log_table (a .json artifact)
# The model's outputs on the test set, as numpy arrays (logits, probabilities, labels; temperature
# when fitted), so any figure or metric of the evaluation can be recounted from the run.
TEST_OUTPUTS = "test_outputs.npz"
FIGURES = ("confusion_matrix.png", "misclassified.png", "samples.png", "training_curves.png")
# How far to trust it: drawn on every evaluation.
TRUST_FIGURES = ("reliability_diagram.png", "roc_curves.png", "precision_recall_curves.png")
# What the model learned (not with --no-explain): the filters and feature maps under layers/,
# named after the layer and its output shape; the explanations under explain/.
LAYERS_FOLDER = "layers"
EXPLAIN_FOLDER = "explain"
EXPLAINED_MISTAKES = "explained_mistakes.png"
EXPLAINED_CORRECT = "explained_correct.png"


@dataclass
class ReportConfig:
    samples: int = 20  # random test images in samples.png, as in the chapter's listing 5-5
    sample_seed: int = 0  # the same images every time, so two runs' figures compare
    mistakes: int = 24  # most confident mistakes in misclassified.png (and explained_mistakes.png)


def layer_figure_name(index: int, fm: FeatureMaps) -> str:
    """'02_maxpool2d_layer1.3_32x14x14.png': order in the model, kind, layer, output shape."""
    shape = "x".join(str(d) for d in fm.shape)
    return f"{index:02d}_{fm.kind.lower()}_{fm.layer}_{shape}.png"


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
    """per_class.csv, confusion_matrix.csv and the figures into `folder`; returns their paths.

    A figure that cannot be drawn raises a one-line PipelineError naming it (and nothing is logged:
    the job logs the folder only after every figure is written).
    """
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
    if e.logits is not None:
        arrays = {"logits": e.logits, "probabilities": e.probabilities, "labels": e.labels}
        if e.temperature is not None:
            arrays["temperature"] = np.float64(e.temperature)
        with atomic_write(folder / TEST_OUTPUTS, "wb") as handle:
            np.savez_compressed(handle, **arrays)
        tables.append(folder / TEST_OUTPUTS)

    rng = np.random.default_rng(config.sample_seed)
    sample = rng.choice(len(e.labels), size=min(config.samples, len(e.labels)), replace=False)
    drawn = {
        "confusion_matrix.png": lambda: figures.confusion_matrix_figure(e.confusion, names, subtitle),
        "misclassified.png": lambda: figures.misclassified_figure(
            images,
            e.labels,
            e.predictions,
            e.probabilities,
            e.most_confident_mistakes(config.mistakes),
            names,
            subtitle=subtitle,
        ),
        "samples.png": lambda: figures.samples_figure(
            images, e.labels, e.predictions, sample, names, subtitle=subtitle
        ),
        "training_curves.png": lambda: figures.training_curves_figure(history, subtitle),
    }
    if e.reliability is not None:
        panels = [("as trained", e.reliability)]
        if e.calibrated is not None:
            panels.append((f"after temperature scaling (T = {e.temperature:.3f})", e.calibrated))
        drawn["reliability_diagram.png"] = lambda: figures.reliability_figure(panels, subtitle)
    if e.ranking is not None:
        drawn["roc_curves.png"] = lambda: figures.roc_figure(e.ranking, subtitle)
        drawn["precision_recall_curves.png"] = lambda: figures.pr_figure(e.ranking, subtitle)
    if e.explanations is not None:
        drawn |= explanation_figures(e, images, subtitle)
    written = []
    for name, draw in drawn.items():
        try:
            written.append(figures.save_figure(draw(), folder / name))
        except PipelineError:
            raise
        except Exception as exc:  # matplotlib raises anything; the stage fails with one line naming the figure
            detail = " ".join(str(exc).split())[:200]
            raise PipelineError(f"could not draw {name}: {type(exc).__name__}: {detail}") from None
    return tables + written


def explanation_figures(e: Evaluation, images: np.ndarray, subtitle: str) -> dict:
    """The filters, the feature maps and the two explanation grids, as name -> drawing function."""
    from pipeline import figures

    x, names = e.explanations, e.class_names
    drawn = {}
    if x.filters is not None:
        shape = "x".join(str(d) for d in x.filters.shape)
        drawn[f"{LAYERS_FOLDER}/00_filters_{x.filters_layer}_{shape}.png"] = lambda: figures.filters_figure(
            x.filters, x.filters_layer, subtitle
        )
    examples = [f"#{i} {names[e.labels[i]]}" for i in x.examples]
    for index, fm in enumerate(x.feature_maps, start=1):
        drawn[f"{LAYERS_FOLDER}/{layer_figure_name(index, fm)}"] = lambda fm=fm: figures.feature_maps_figure(
            fm.maps, images[x.examples], examples, fm.layer, fm.kind, subtitle
        )
    drawn[f"{EXPLAIN_FOLDER}/{EXPLAINED_MISTAKES}"] = lambda: figures.misclassified_figure(
        images,
        e.labels,
        e.predictions,
        e.probabilities,
        x.mistakes,
        names,
        subtitle=subtitle,
        overlays=x.mistake_maps,
        method=x.method,
    )
    captions = [
        f"{'most' if k % 2 == 0 else 'least'} sure: {names[e.labels[i]]}\n"
        f"#{i} ({figures.confidence(e.probabilities[i, e.predictions[i]])})"
        + (", map empty" if not x.confident_maps[k].any() else "")
        for k, i in enumerate(x.confident)
    ]
    drawn[f"{EXPLAIN_FOLDER}/{EXPLAINED_CORRECT}"] = lambda: figures.explanations_figure(
        images[x.confident],
        x.confident_maps,
        captions,
        [figures.CORRECT_COLOR] * len(x.confident),
        f"Right answers, the most and the least confident of each class{subtitle}",
        f"overlay: {x.method} for the predicted class (red: most weight); model's probability in brackets",
    )
    return drawn


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
    lines.extend(format_trust(m, e.temperature, e.validation_images))
    return "\n".join(lines)


def format_trust(m: dict[str, float], temperature: float | None, validation_images: int) -> list[str]:
    """Ranking and calibration in two lines (nothing for metrics it lacks)."""
    lines = []
    if "test_macro_roc_auc" in m:
        lines.append(
            f"Ranking: macro ROC-AUC {m['test_macro_roc_auc']:.4f}, mean average precision "
            f"{m['test_macro_average_precision']:.4f}, top-2 accuracy {m['test_top2_accuracy']:.2%}"
        )
    if "test_ece" in m:
        line = f"Calibration: ECE {m['test_ece']:.2%}, NLL {m['test_nll']:.4f}, Brier {m['test_brier']:.4f}"
        if temperature is not None:
            line += (
                f"; after temperature scaling (T = {temperature:.3f}, fitted on {validation_images:,} validation "
                f"images): ECE {m['test_ece_calibrated']:.2%}, NLL {m['test_nll_calibrated']:.4f}, "
                f"Brier {m['test_brier_calibrated']:.4f}"
            )
        lines.append(line)
    return lines
