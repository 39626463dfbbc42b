"""How far to trust a model: calibration and ranking metrics against brute-force recounts, the
explanations' sanity check (Adebayo et al.) with its negative control, layers found by walking the
module, and the comparison's new rows."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from pipeline import calibration, explain, ranking
from pipeline.compare import compare, format_comparison
from pipeline.config import CLASS_NAMES, slug
from pipeline.evaluate import images_to_tensor
from pipeline.models import build_model

# --------------------------------------------------------------------------- ranking


def brute_force_auc(positive: np.ndarray, scores: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties counting one half: every pair compared."""
    pos, neg = scores[positive], scores[~positive]
    pairs = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return pairs / (len(pos) * len(neg))


def brute_force_average_precision(positive: np.ndarray, scores: np.ndarray) -> float:
    """Mean over positives of the precision among all images scored at least as high as it."""
    precisions = [positive[scores >= s].mean() for s in scores[positive]]
    return float(np.mean(precisions))


def brute_force_top_k(probs: np.ndarray, labels: np.ndarray, k: int) -> float:
    hits = 0
    for row, label in zip(probs, labels, strict=True):
        hits += sum(value > row[label] for value in row) < k
    return hits / len(labels)


@pytest.mark.parametrize("seed", [0, 1])
def test_roc_auc_and_average_precision_match_a_brute_force_recount(seed):
    rng = np.random.default_rng(seed)
    positive = rng.random(400) < 0.2
    scores = np.round(rng.random(400) + 0.4 * positive, 2)  # rounded: many ties
    assert ranking.roc_auc(positive, scores) == pytest.approx(brute_force_auc(positive, scores), abs=1e-12)
    assert ranking.average_precision(positive, scores) == pytest.approx(
        brute_force_average_precision(positive, scores), abs=1e-12
    )
    fpr, tpr = ranking.roc_curve(positive, scores)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1) and np.all(np.diff(fpr) >= 0)


def test_a_perfect_ranking_has_auc_and_ap_one_and_a_reversed_one_auc_zero():
    positive = np.array([True, True, False, False, False])
    scores = np.array([0.9, 0.8, 0.3, 0.2, 0.1])
    assert ranking.roc_auc(positive, scores) == 1.0 and ranking.average_precision(positive, scores) == 1.0
    assert ranking.roc_auc(positive, -scores) == 0.0


def test_top_k_accuracy_and_the_ranking_summary_match_a_recount():
    rng = np.random.default_rng(3)
    probs = calibration.probabilities(rng.normal(size=(300, 10)) * 2)
    labels = rng.integers(0, 10, 300)
    for k in (1, 2, 3):
        assert ranking.top_k_accuracy(probs, labels, k) == pytest.approx(brute_force_top_k(probs, labels, k))
    assert ranking.top_k_accuracy(probs, labels, 1) == pytest.approx((probs.argmax(1) == labels).mean())
    summary = ranking.rank(probs, labels, list(CLASS_NAMES))
    aucs = [brute_force_auc(labels == k, probs[:, k]) for k in range(10)]
    assert summary.metrics["test_macro_roc_auc"] == pytest.approx(np.mean(aucs))
    assert summary.metrics["test_top2_accuracy"] == pytest.approx(brute_force_top_k(probs, labels, 2))


# --------------------------------------------------------------------------- calibration


def brute_force_ece(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """Image by image into (b/bins, (b+1)/bins], then |accuracy - confidence| weighted by bin size."""
    total = 0.0
    for b in range(bins):
        low, high = b / bins, (b + 1) / bins
        members = [i for i, p in enumerate(probs) if (low < p.max() <= high) or (b == 0 and p.max() == 0)]
        if members:
            accuracy = np.mean([probs[i].argmax() == labels[i] for i in members])
            confidence = np.mean([probs[i].max() for i in members])
            total += len(members) / len(probs) * abs(accuracy - confidence)
    return total


def test_ece_nll_and_brier_match_a_recount():
    rng = np.random.default_rng(0)
    probs = calibration.probabilities(rng.normal(size=(500, 10)) * 3)
    labels = rng.integers(0, 10, 500)
    assert calibration.ece(probs, labels) == pytest.approx(brute_force_ece(probs, labels), abs=1e-12)
    assert calibration.nll(probs, labels) == pytest.approx(
        -np.mean([np.log(p[y]) for p, y in zip(probs, labels, strict=True)])
    )
    brier = np.mean([((p - np.eye(10)[y]) ** 2).sum() for p, y in zip(probs, labels, strict=True)])
    assert calibration.brier(probs, labels) == pytest.approx(brier)


def sampled_from(logits: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Labels drawn from softmax(logits): a model that is calibrated by construction."""
    probs = calibration.probabilities(logits)
    return np.array([rng.choice(probs.shape[1], p=p) for p in probs])


def test_temperature_scaling_recovers_a_known_temperature_and_lowers_ece():
    rng = np.random.default_rng(0)
    true_logits = rng.normal(size=(6000, 10)) * 2.5
    labels = sampled_from(true_logits, rng)
    overconfident = 3.0 * true_logits  # what an over-confident network outputs: T = 3 undoes it
    temperature = calibration.fit_temperature(overconfident[:3000], labels[:3000])
    assert temperature == pytest.approx(3.0, rel=0.08)
    before = calibration.calibration_metrics(overconfident[3000:], labels[3000:], None)
    after = calibration.calibration_metrics(overconfident[3000:], labels[3000:], temperature)
    assert "test_ece_calibrated" not in before
    # The true probabilities' own ECE on 3,000 sampled labels is 2.2 % (sampling noise); over-confident, 24 %.
    truth = calibration.ece(calibration.probabilities(true_logits[3000:]), labels[3000:])
    assert after["test_ece_calibrated"] < truth + 0.01 < 0.05 < 0.2 < before["test_ece"]
    assert after["test_nll_calibrated"] < after["test_nll"]
    # Dividing by T never changes the argmax, so accuracy is untouched.
    scaled = calibration.probabilities(overconfident, temperature)
    assert np.array_equal(scaled.argmax(1), overconfident.argmax(1))


# --------------------------------------------------------------------------- explanations


@pytest.fixture(scope="module")
def trained_cnn(trained_run):
    """The session's tiny trained CNN and 40 of its test images with the predicted classes."""
    import mlflow

    from pipeline import tracking
    from pipeline.data import load_split

    mlflow.set_tracking_uri(trained_run["store"])
    model, _ = tracking.load_run_model(trained_run["run_id"])
    test = load_split(trained_run["data_dir"], "test")
    inputs = images_to_tensor(test.images[:40])
    with torch.inference_mode():
        targets = model(inputs).argmax(1).numpy()
    return model, inputs, targets


def edge_detector(model: nn.Module, inputs: torch.Tensor, targets: np.ndarray) -> np.ndarray:
    """A Sobel edge map with an explainer's signature: it never looks at the model."""
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]).reshape(1, 1, 3, 3)
    gx = nn.functional.conv2d(inputs, kx, padding=1)
    gy = nn.functional.conv2d(inputs, kx.transpose(2, 3), padding=1)
    return torch.sqrt(gx**2 + gy**2)[:, 0].numpy()


def test_gradcam_passes_the_model_randomisation_sanity_check(trained_cnn):
    model, inputs, targets = trained_cnn
    check = explain.model_randomisation_check(model, inputs, targets)
    assert check.passed, f"median Spearman {check.median:.3f} >= {check.threshold}"
    assert check.median < explain.SANITY_THRESHOLD and len(check.correlations) == 40
    # The maps of the trained model are maps of that model: the same call twice agrees exactly.
    again = explain.model_randomisation_check(
        model, inputs, targets, explainer=lambda m, x, t: explain.explain(model, x, t)
    )
    assert again.median == pytest.approx(1.0)


def test_the_sanity_check_fails_an_edge_detector(trained_cnn):
    """The negative control: a map that ignores the model stays the same when the weights are re-initialised."""
    model, inputs, targets = trained_cnn
    check = explain.model_randomisation_check(model, inputs, targets, explainer=edge_detector)
    assert not check.passed and check.median == pytest.approx(1.0)


def test_spearman_handles_ties_and_constant_maps():
    a = np.array([0.0, 0.0, 1.0, 2.0])
    assert explain.spearman(a, a) == pytest.approx(1.0) and explain.spearman(a, -a) == pytest.approx(-1.0)
    assert explain.spearman(a, np.zeros(4)) == 0.0
    assert explain.average_ranks(a).tolist() == [1.5, 1.5, 3.0, 4.0]


class Unnamed(nn.Module):
    """A model the pipeline has never seen: layers under names no code knows, average pooling."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 4, 5), nn.ReLU(), nn.AvgPool2d(2))
        self.body = nn.ModuleDict({"deep": nn.Conv2d(4, 6, 3), "squeeze": nn.AdaptiveMaxPool2d(3)})
        self.head = nn.Linear(54, 10)

    def forward(self, x):
        x = self.stem(x)
        x = self.body["squeeze"](torch.relu(self.body["deep"](x)))
        return self.head(x.flatten(1))


def test_layers_are_found_by_walking_the_module_whatever_their_names():
    model = Unnamed()
    inputs = torch.rand(3, 1, 28, 28)
    found = [(m.layer, m.kind, m.shape) for m in explain.feature_maps(model, inputs)]
    assert found == [
        ("stem.0", "Conv2d", (4, 24, 24)),
        ("stem.2", "AvgPool2d", (4, 12, 12)),
        ("body.deep", "Conv2d", (6, 10, 10)),
        ("body.squeeze", "AdaptiveMaxPool2d", (6, 3, 3)),
    ]
    assert explain.first_filters(model).shape == (4, 1, 5, 5)
    assert explain.method_name(model) == "Grad-CAM on body.deep"
    maps = explain.explain(model, inputs, np.array([0, 1, 2]))
    assert maps.shape == (3, 28, 28) and (maps >= 0).all()  # ReLU'd Grad-CAM, upsampled to the input


class SharedPool(nn.Module):
    """One pooling module used after both convolutions, a common way to write a CNN."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 8, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(8 * 7 * 7, 10)

    def forward(self, x):
        return self.fc(self.pool(self.c2(self.pool(self.c1(x)))).flatten(1))


def test_a_pooling_module_used_twice_gives_both_feature_maps_in_the_order_they_run():
    found = [(m.layer, m.shape) for m in explain.feature_maps(SharedPool(), torch.rand(2, 1, 28, 28))]
    assert found == [("c1", (4, 28, 28)), ("pool", (4, 14, 14)), ("c2", (8, 14, 14)), ("pool", (8, 7, 7))]


def test_a_model_without_convolutions_gets_a_saliency_map_and_no_filters():
    model = build_model("dnn")
    inputs = torch.rand(2, 1, 28, 28)
    assert explain.first_filters(model) is None and explain.feature_maps(model, inputs) == []
    assert explain.method_name(model) == "gradient saliency"
    maps = explain.explain(model, inputs, np.array([3, 4]))
    assert maps.shape == (2, 28, 28) and maps.max() > 0


# --------------------------------------------------------------------------- compare


def test_compare_shows_calibration_and_ranking_with_a_margin_for_top2():
    def row(run_id, model, ece, nll, auc, top2, start):
        base = {
            "run_id": run_id,
            "status": "FINISHED",
            "start_time": pd.Timestamp(start, tz="UTC"),
            "params.model": model,
            "params.test_size": "10000",
            "metrics.test_accuracy": 0.9,
            "metrics.test_ece": ece,
            "metrics.test_ece_calibrated": ece / 4,
            "metrics.test_nll": nll,
            "metrics.test_macro_roc_auc": auc,
            "metrics.test_top2_accuracy": top2,
        }
        return base | {f"metrics.test_accuracy_{slug(n)}": 0.9 for n in CLASS_NAMES}

    runs = pd.DataFrame(
        [row("a", "dnn", 0.04, 0.35, 0.990, 0.96, "2026-01-01"), row("b", "cnn", 0.02, 0.25, 0.995, 0.98, "2026-01-02")]
    )
    c = compare(runs)
    column = "cnn - dnn"
    assert c.table.at["test_ece", column] == pytest.approx(-0.02)
    assert c.table.at["test_macro_roc_auc", column] == pytest.approx(0.005)
    margin = 1.96 * np.sqrt(0.96 * 0.04 / 10000 + 0.98 * 0.02 / 10000)
    assert c.table.at["test_top2_accuracy", f"±95% {column}"] == pytest.approx(margin)
    assert np.isnan(c.table.at["test_nll", f"±95% {column}"])  # no closed-form margin: none shown
    text = format_comparison(c)
    assert "test_ece " in text and "4.00%" in text and "+0.0050" in text and "-0.1000" in text
