"""The evaluate stage: per-class math against hand counts, and the stage end to end on a tiny run."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from pipeline.cli import cli
from pipeline.config import CLASS_NAMES, slug
from pipeline.errors import PipelineError
from pipeline.evaluate import (
    FIGURES,
    PER_CLASS_COLUMNS,
    confusion_matrix,
    evaluate,
    format_evaluation,
    per_class_table,
    summarize,
)
from pipeline.idx import write_idx
from pipeline.models import build_model

# --------------------------------------------------------------------------- per-class math


def one_hot(predictions: np.ndarray, num_classes: int) -> np.ndarray:
    return np.eye(num_classes, dtype=np.float32)[predictions]


def test_per_class_math_matches_a_hand_count():
    # 3 classes. True 0: 4 images, 3 right, 1 taken for 2.  True 1: 2 images, both taken for 0.
    # True 2: 4 images, all right. Predicted 0: 3+2 = 5, predicted 1: 0, predicted 2: 1+4 = 5.
    labels = np.array([0, 0, 0, 0, 1, 1, 2, 2, 2, 2])
    predictions = np.array([0, 2, 0, 0, 0, 0, 2, 2, 2, 2])
    e = summarize(labels, predictions, one_hot(predictions, 3), ["a", "b", "c"], test_loss=0.5)

    assert e.confusion.tolist() == [[3, 0, 1], [2, 0, 0], [0, 0, 4]]
    table = e.per_class.set_index("class_name")
    assert table["support"].tolist() == [4, 2, 4]
    assert table["correct"].tolist() == [3, 0, 4]
    assert table["accuracy"].tolist() == pytest.approx([3 / 4, 0.0, 1.0])
    assert table["recall"].tolist() == pytest.approx([3 / 4, 0.0, 1.0])
    assert table["precision"].tolist() == pytest.approx([3 / 5, 0.0, 4 / 5])  # b never predicted: 0, not NaN
    f1_a, f1_c = 2 * 0.6 * 0.75 / (0.6 + 0.75), 2 * 0.8 * 1.0 / 1.8
    assert table["f1"].tolist() == pytest.approx([f1_a, 0.0, f1_c])
    assert e.metrics["test_accuracy"] == pytest.approx(7 / 10)
    assert e.metrics["test_macro_precision"] == pytest.approx((0.6 + 0 + 0.8) / 3)
    assert e.metrics["test_macro_recall"] == pytest.approx((0.75 + 0 + 1) / 3)
    assert e.metrics["test_macro_f1"] == pytest.approx((f1_a + f1_c) / 3)
    assert e.metrics["test_loss"] == 0.5
    assert (e.metrics["test_accuracy_a"], e.metrics["test_accuracy_b"]) == (0.75, 0.0)
    assert list(e.per_class.columns) == list(PER_CLASS_COLUMNS)


def test_per_class_math_agrees_with_an_independent_loop_count():
    rng = np.random.default_rng(7)
    labels = rng.integers(0, 10, size=3000)
    # A model right 70 % of the time, otherwise a random class (which may be right by chance).
    predictions = np.where(rng.random(3000) < 0.7, labels, rng.integers(0, 10, size=3000))
    e = summarize(labels, predictions, one_hot(predictions, 10), CLASS_NAMES, test_loss=1.0)

    for k, name in enumerate(CLASS_NAMES):
        support = sum(1 for y in labels if y == k)
        correct = sum(1 for y, p in zip(labels, predictions, strict=True) if y == k and p == k)
        predicted = sum(1 for p in predictions if p == k)
        row = e.per_class.iloc[k]
        assert (row.class_id, row.class_name, row.support, row.correct) == (k, name, support, correct)
        assert row.accuracy == pytest.approx(correct / support)
        assert row.precision == pytest.approx(correct / predicted)
        assert e.metrics[f"test_accuracy_{slug(name)}"] == pytest.approx(correct / support)
        for j in range(10):
            assert e.confusion[k, j] == sum(1 for y, p in zip(labels, predictions, strict=True) if y == k and p == j)
    right = sum(1 for y, p in zip(labels, predictions, strict=True) if y == p)
    assert e.metrics["test_accuracy"] == pytest.approx(right / len(labels))
    # Overall accuracy is the support-weighted mean of the per-class accuracies.
    weighted = (e.per_class["accuracy"] * e.per_class["support"]).sum() / e.per_class["support"].sum()
    assert e.metrics["test_accuracy"] == pytest.approx(weighted)
    assert "test_accuracy_ankle_boot" in e.metrics and "test_accuracy_t_shirt_top" in e.metrics


def test_weakest_classes_and_most_confident_mistakes():
    labels = np.array([0, 0, 1, 1, 2, 2])
    predictions = np.array([0, 0, 0, 1, 0, 0])  # accuracy: a 1.0, b 0.5, c 0.0
    probabilities = np.full((6, 3), 0.1, dtype=np.float32)
    probabilities[np.arange(6), predictions] = [0.8, 0.8, 0.6, 0.8, 0.9, 0.7]
    e = summarize(labels, predictions, probabilities, ["a", "b", "c"], test_loss=0.0)
    assert e.weakest(2)["class_name"].tolist() == ["c", "b"]
    assert e.most_confident_mistakes(10).tolist() == [4, 5, 2]  # wrong ones, most confident first
    text = format_evaluation(e, weakest=2)
    flat = " ".join(text.split())
    assert "Weakest 2 classes" in flat and "c 0.0% most often taken for a (2 of 2)" in flat


def test_confusion_matrix_rejects_out_of_range_labels():
    with pytest.raises(ValueError):
        confusion_matrix(np.array([0, 3]), np.array([0, 1]), 3)
    with pytest.raises(ValueError):
        per_class_table(np.zeros((2, 2)), ["a", "b", "c"])


def test_evaluate_matches_the_training_time_accuracy_and_restores_nothing_odd():
    torch.manual_seed(0)
    model = build_model("dnn")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(50, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=50)
    e = evaluate(model, images, labels, CLASS_NAMES, batch_size=7)
    with torch.inference_mode():
        logits = model.eval()(torch.from_numpy(images).float().div(255).unsqueeze(1))
    assert e.metrics["test_accuracy"] == pytest.approx((logits.argmax(1).numpy() == labels).mean())
    assert e.metrics["test_loss"] == pytest.approx(
        torch.nn.functional.cross_entropy(logits, torch.from_numpy(labels)).item(), rel=1e-5
    )
    assert e.probabilities.shape == (50, 10) and np.allclose(e.probabilities.sum(1), 1, atol=1e-5)


@pytest.mark.parametrize(
    ("shape", "labels", "message"),
    [((4, 32, 32), [0, 1, 2, 3], "takes 28x28 images but the data has 32x32"), ((4, 28, 28), [0, 1, 2, 12], "12")],
)
def test_a_model_that_does_not_fit_the_data_is_a_clear_error(shape, labels, message):
    with pytest.raises(PipelineError, match=message):
        evaluate(build_model("cnn"), np.zeros(shape, np.uint8), np.array(labels), CLASS_NAMES)


# --------------------------------------------------------------------------- the stage end to end


@pytest.fixture(scope="module")
def evaluated(trained_run):
    """`pipeline evaluate` run once on the tiny trained run; returns its output and the run."""
    import mlflow

    env = {"MLFLOW_TRACKING_URI": trained_run["store"], "MLFLOW_EXPERIMENT_NAME": "tests", "MLFLOW_RUN_ID": None}
    mlflow.set_tracking_uri(trained_run["store"])
    before = mlflow.get_run(trained_run["run_id"])
    result = CliRunner().invoke(
        cli, ["evaluate", "--run-id", trained_run["run_id"], "--data-dir", str(trained_run["data_dir"])], env=env
    )
    assert result.exit_code == 0, result.output
    return {**trained_run, "output": result.output, "before": before}


def test_evaluate_logs_metrics_and_artifacts_that_agree(evaluated, use_trained_run, tmp_path):
    import mlflow

    run_id = evaluated["run_id"]
    client = mlflow.MlflowClient()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    metrics = run.data.metrics
    for key in ("test_accuracy", "test_loss", "test_macro_precision", "test_macro_recall", "test_macro_f1"):
        assert key in metrics, key
    class_metrics = {name: metrics[f"test_accuracy_{slug(name)}"] for name in CLASS_NAMES}
    assert "test_accuracy_ankle_boot" in metrics and "test_accuracy_t_shirt_top" in metrics

    artifacts = {a.path for a in client.list_artifacts(run_id)}
    expected = {"per_class.csv", "per_class.json", "confusion_matrix.csv", *FIGURES}
    assert expected <= artifacts, expected - artifacts
    local = tmp_path / "artifacts"
    local.mkdir()
    for name in expected:
        client.download_artifacts(run_id, name, str(local))

    per_class = pd.read_csv(local / "per_class.csv")
    assert list(per_class.columns) == list(PER_CLASS_COLUMNS)
    assert per_class["class_name"].tolist() == list(CLASS_NAMES)
    assert per_class["support"].sum() == 200  # the synthetic test split
    assert per_class["accuracy"].tolist() == pytest.approx([class_metrics[n] for n in CLASS_NAMES])
    assert (per_class["correct"] / per_class["support"]).tolist() == pytest.approx(per_class["accuracy"].tolist())
    weighted = per_class["correct"].sum() / per_class["support"].sum()
    assert metrics["test_accuracy"] == pytest.approx(weighted)
    assert metrics["test_macro_f1"] == pytest.approx(per_class["f1"].mean())
    # The same model on the same data: evaluation reproduces the accuracy training measured.
    assert metrics["test_accuracy"] == pytest.approx(evaluated["before"].data.metrics["test_accuracy"], abs=1e-6)

    confusion = pd.read_csv(local / "confusion_matrix.csv", index_col=0)
    assert confusion.index.tolist() == list(CLASS_NAMES) == confusion.columns.tolist()
    assert confusion.sum(axis=1).tolist() == per_class["support"].tolist()
    assert np.diag(confusion.to_numpy()).tolist() == per_class["correct"].tolist()
    predicted = confusion.sum(axis=0).to_numpy()
    assert (per_class["precision"] * predicted).tolist() == pytest.approx(per_class["correct"].tolist())

    table = mlflow.load_table("per_class.json", run_ids=[run_id])
    assert table["accuracy"].tolist() == pytest.approx(per_class["accuracy"].tolist())

    for name in FIGURES:
        with Image.open(local / name) as image:
            assert image.format == "PNG" and image.width > 300 and image.height > 150, name

    # The evaluation values are the run's latest ones: logged at the last training step.
    history = client.get_metric_history(run_id, "test_accuracy")
    assert history[-1].step == max(m.step for m in history)


def test_evaluate_prints_the_table_with_the_weakest_classes(evaluated):
    out = evaluated["output"]
    for name in CLASS_NAMES:
        assert name in out
    assert "Weakest 3 classes:" in out and "Overall: accuracy" in out
    assert f"Logged into run {evaluated['run_id']}" in out and "confusion_matrix.png" in out


@pytest.mark.slow
def test_evaluate_by_model_uri_logs_into_the_source_run(evaluated, use_trained_run):
    import mlflow

    run_id = evaluated["run_id"]
    model_id = mlflow.get_run(run_id).outputs.model_outputs[0].model_id
    result = CliRunner().invoke(
        cli, ["evaluate", "--model-uri", f"models:/{model_id}", "--data-dir", str(use_trained_run["data_dir"])]
    )
    assert result.exit_code == 0, result.output
    assert f"Logged into run {run_id}" in result.output


def _fails(args, *needles):
    result = CliRunner().invoke(cli, ["evaluate", *args])
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)
    for needle in needles:
        assert needle in result.output, result.output
    return result


def test_evaluate_errors_unknown_run_missing_model_and_usage(tracking_store, synthetic_data_dir):
    import mlflow

    data = ["--data-dir", str(synthetic_data_dir)]
    _fails(["--run-id", "0123456789abcdef0123456789abcdef", *data], "Error:", "no run")
    _fails(data, "Error:", "--run-id", "--model-uri")
    _fails(["--model-uri", "models:/m-doesnotexist", *data], "Error:", "no model")
    mlflow.set_experiment("tests")
    with mlflow.start_run() as empty:
        pass
    _fails(["--run-id", empty.info.run_id, *data], "Error:", "has no artifact", "pipeline train")
    _fails(["--run-id", empty.info.run_id, "--model-uri", "runs:/x/model", *data], "not both")


def test_evaluate_refuses_data_the_model_does_not_fit(use_trained_run, tmp_path):
    import mlflow

    from pipeline.data import SPLIT_FILES, raw_dir

    run_id = use_trained_run["run_id"]
    before = mlflow.get_run(run_id)
    folder = raw_dir(tmp_path)
    folder.mkdir(parents=True)
    images, labels = SPLIT_FILES["test"]
    write_idx(folder / images, np.zeros((10, 32, 32), np.uint8))
    write_idx(folder / labels, np.arange(10, dtype=np.uint8))
    _fails(["--run-id", run_id, "--data-dir", str(tmp_path)], "Error:", "28x28", "32x32")
    after = mlflow.get_run(run_id)
    # Nothing was logged and the run was not marked FAILED: the check runs before the run is resumed.
    assert after.info.status == "FINISHED" and after.data.metrics == before.data.metrics


def test_training_curves_keep_one_point_per_step_and_figures_save_atomically(tmp_path):
    from pipeline import figures

    history = pd.DataFrame(
        [
            ("train_loss", 6, 0.9, 1),
            ("train_loss", 12, 0.5, 2),
            ("train_loss", 12, 0.5, 3),  # train logs its final train_loss twice
            ("test_accuracy", 6, 0.80, 1),
            ("test_accuracy", 12, 0.85, 2),
            ("test_accuracy", 12, 0.8500001, 9),  # evaluate re-logs it at the last step
        ],
        columns=["key", "step", "value", "timestamp"],
    )
    fig = figures.training_curves_figure(history)
    loss_ax, acc_ax = fig.axes
    assert [list(line.get_xdata()) for line in loss_ax.lines] == [[6, 12]]
    assert list(acc_ax.lines[0].get_ydata()) == [0.80, 0.85]  # the training-time value is kept
    assert loss_ax.get_xlabel() and loss_ax.get_ylabel() and acc_ax.get_ylabel() and fig.get_suptitle()
    path = figures.save_figure(fig, tmp_path / "curves.png")
    assert [p.name for p in tmp_path.iterdir()] == ["curves.png"]
    with Image.open(path) as image:
        assert image.format == "PNG"


@pytest.mark.slow
def test_evaluating_again_replaces_the_ui_table(evaluated, use_trained_run):
    import mlflow

    again = CliRunner().invoke(
        cli, ["evaluate", "--run-id", evaluated["run_id"], "--data-dir", str(evaluated["data_dir"])]
    )
    assert again.exit_code == 0, again.output
    # mlflow.log_table alone would append: 20 rows after two evaluations.
    table = mlflow.load_table("per_class.json", run_ids=[evaluated["run_id"]])
    assert table["class_name"].tolist() == list(CLASS_NAMES)


# --------------------------------------------------------------------------- how far to trust it, end to end

TRUST_METRICS = (
    "test_ece",
    "test_nll",
    "test_brier",
    "test_macro_roc_auc",
    "test_macro_average_precision",
    "test_top2_accuracy",
)


def _download(run_id: str, path: str, folder) -> str:
    import mlflow

    return mlflow.MlflowClient().download_artifacts(run_id, path, str(folder))


def test_evaluate_logs_calibration_ranking_and_what_the_cnn_learned(evaluated, use_trained_run, tmp_path):
    import mlflow

    from pipeline.evaluate import EXPLAIN_FOLDER, LAYERS_FOLDER, TEST_OUTPUTS, TRUST_FIGURES

    run_id = evaluated["run_id"]
    client = mlflow.MlflowClient()
    run = client.get_run(run_id)
    for key in TRUST_METRICS:
        assert key in run.data.metrics, key
    assert "test_ece_calibrated" not in run.data.metrics and "temperature" not in run.data.params
    # Said once, not an error: the session run was trained without a validation split.
    assert evaluated["output"].count("no temperature fitted") == 1
    assert "no validation split: no temperature fitted" in run.data.tags["mlflow.note.content"]
    # Linked to the PyTorch LoggedModel, as the per-class metrics are.
    # (The run's PyTorch model by its tag: other tests export ONNX models into the same session run.)
    model_id = run.data.tags["pytorch_model_uri"].removeprefix("models:/")
    linked = {m.key for m in mlflow.get_logged_model(model_id).metrics}
    assert set(TRUST_METRICS) <= linked

    top = {a.path for a in client.list_artifacts(run_id)}
    assert set(TRUST_FIGURES) | {TEST_OUTPUTS, LAYERS_FOLDER, EXPLAIN_FOLDER} <= top
    layers = sorted(a.path.split("/")[-1] for a in client.list_artifacts(run_id, LAYERS_FOLDER))
    assert layers == [
        "00_filters_layer1.0_32x1x3x3.png",
        "01_conv2d_layer1.0_32x28x28.png",
        "02_maxpool2d_layer1.3_32x14x14.png",
        "03_conv2d_layer2.0_64x12x12.png",
        "04_maxpool2d_layer2.3_64x6x6.png",
    ]
    explained = sorted(a.path.split("/")[-1] for a in client.list_artifacts(run_id, EXPLAIN_FOLDER))
    assert explained == ["explained_correct.png", "explained_mistakes.png"]
    with Image.open(_download(run_id, f"{EXPLAIN_FOLDER}/explained_correct.png", tmp_path)) as image:
        assert image.format == "PNG" and image.width > 300

    # The logged ranking metrics recounted from the logged probabilities, pair by pair.
    outputs = np.load(_download(run_id, TEST_OUTPUTS, tmp_path))
    probs, labels = outputs["probabilities"], outputs["labels"]
    assert probs.shape == (200, 10) and np.allclose(probs.sum(1), 1, atol=1e-5)
    aucs = []
    for k in range(10):
        pos, neg = probs[labels == k, k], probs[labels != k, k]
        aucs.append(((pos[:, None] > neg).sum() + 0.5 * (pos[:, None] == neg).sum()) / (len(pos) * len(neg)))
    true_rank = (probs > probs[np.arange(len(labels)), labels][:, None]).sum(1)
    assert run.data.metrics["test_macro_roc_auc"] == pytest.approx(np.mean(aucs), abs=1e-9)
    assert run.data.metrics["test_top2_accuracy"] == pytest.approx((true_rank < 2).mean(), abs=1e-9)


@pytest.fixture(scope="module")
def dnn_with_validation(synthetic_data_dir, tmp_path_factory, empty_store):
    """`pipeline run` of the DNN (no convolutions) with a validation split, into a store of its own:
    train, evaluate (temperature fitted on the last 100 training images), export-onnx."""
    import shutil

    folder = tmp_path_factory.mktemp("dnn_store")
    shutil.copyfile(empty_store, folder / "mlflow.db")
    store = f"sqlite:///{folder / 'mlflow.db'}"
    env = {"MLFLOW_TRACKING_URI": store, "MLFLOW_EXPERIMENT_NAME": "tests", "MLFLOW_RUN_ID": None}
    args = ["run", "--model", "dnn", "--epochs", "2", "--val-size", "100", "--allow-other-data"]
    result = CliRunner().invoke(cli, [*args, "--data-dir", str(synthetic_data_dir)], env=env)
    assert result.exit_code == 0, result.output
    run_id = result.output.split("Run id:")[1].split()[0]
    return {"run_id": run_id, "store": store, "env": env, "data_dir": synthetic_data_dir, "output": result.output}


def test_a_model_without_convolutions_gets_saliency_and_no_filter_figures(dnn_with_validation):
    import mlflow

    from pipeline.evaluate import EXPLAIN_FOLDER

    mlflow.set_tracking_uri(dnn_with_validation["store"])
    run_id, client = dnn_with_validation["run_id"], mlflow.MlflowClient()
    top = {a.path for a in client.list_artifacts(run_id)}
    assert "layers" not in top and EXPLAIN_FOLDER in top
    assert dnn_with_validation["output"].count("has no convolutions: gradient saliency maps") == 1
    # The synthetic validation images are all classified right: the NLL falls all the way to the bound.
    assert "the temperature stopped at the end of its range (0.05" in dnn_with_validation["output"]


def test_the_temperature_calibrates_the_exported_model_and_predict(dnn_with_validation, tmp_path, monkeypatch):
    import mlflow

    from pipeline import calibration, tracking
    from pipeline.checkpoint import checkpoint_temperature
    from pipeline.data import SPLIT_FILES, raw_dir
    from pipeline.onnx_contract import TEMPERATURE_KEY, read_metadata

    for key, value in dnn_with_validation["env"].items():
        monkeypatch.setenv(key, value) if value else monkeypatch.delenv(key, raising=False)
    mlflow.set_tracking_uri(dnn_with_validation["store"])
    run_id = dnn_with_validation["run_id"]
    run = mlflow.get_run(run_id)
    temperature = float(run.data.params["temperature"])
    assert run.data.params["temperature_fit_images"] == "100" and temperature != 1.0
    metrics = run.data.metrics
    assert metrics["test_ece_calibrated"] != metrics["test_ece"]
    # In the model: its LoggedModel's params, its checkpoint, and the exported ONNX file's metadata.
    # (The run's PyTorch model by its tag: other tests export ONNX models into the same session run.)
    model_id = run.data.tags["pytorch_model_uri"].removeprefix("models:/")
    assert mlflow.get_logged_model(model_id).params["temperature"] == run.data.params["temperature"]
    assert checkpoint_temperature(_download(run_id, tracking.CHECKPOINT_ARTIFACT, tmp_path)) == temperature
    onnx_folder = tracking.download_onnx_model(tracking.run_onnx_model_uri(run_id), tmp_path / "onnx")
    onnx_file = onnx_folder if onnx_folder.suffix == ".onnx" else next(onnx_folder.glob("*.onnx"))
    assert float(read_metadata(onnx_file)[TEMPERATURE_KEY]) == temperature

    # predict's own confidences on the test images are calibrated to the same degree as evaluate measured.
    table_path = tmp_path / "predictions.csv"
    images = raw_dir(dnn_with_validation["data_dir"]) / SPLIT_FILES["test"][0]
    result = CliRunner().invoke(
        cli, ["predict", "--model", str(onnx_file), "--top-k", "10", "-o", str(table_path), str(images)]
    )
    assert result.exit_code == 0, result.output
    table = pd.read_csv(table_path).sort_values("index")
    order = [table[f"top{k}_class"].map(CLASS_NAMES.index).to_numpy() for k in range(1, 11)]
    probs = np.zeros((len(table), 10))
    for k, classes in enumerate(order, start=1):
        probs[np.arange(len(table)), classes] = table[f"top{k}_prob"].to_numpy()
    outputs = np.load(_download(run_id, "test_outputs.npz", tmp_path))
    labels = outputs["labels"]
    assert calibration.ece(probs, labels) == pytest.approx(metrics["test_ece_calibrated"], abs=1e-4)
    # Image by image: predict's probabilities are softmax(logits / T) of evaluate's logits, not softmax(logits).
    assert probs == pytest.approx(calibration.probabilities(outputs["logits"], temperature), abs=1e-5)
    assert not np.allclose(probs, calibration.probabilities(outputs["logits"]), atol=1e-2)
    assert table["confidence"].to_numpy() == pytest.approx(probs.max(1), abs=1e-6)


@pytest.mark.slow
def test_a_figure_that_cannot_be_drawn_fails_the_run_before_anything_is_logged(dnn_with_validation, monkeypatch):
    import mlflow

    from pipeline import figures

    mlflow.set_tracking_uri(dnn_with_validation["store"])
    run_id = dnn_with_validation["run_id"]
    args = ["evaluate", "--run-id", run_id, "--data-dir", str(dnn_with_validation["data_dir"]), "--no-explain"]
    # First, evaluating again works and keeps the model's temperature (fitted once, never refitted).
    first = mlflow.get_run(run_id)
    result = CliRunner().invoke(cli, args, env=dnn_with_validation["env"])
    assert result.exit_code == 0, result.output
    before = mlflow.get_run(run_id)
    assert before.data.params["temperature"] == first.data.params["temperature"]
    assert before.data.metrics["test_ece_calibrated"] == pytest.approx(first.data.metrics["test_ece_calibrated"])

    def broken(*args, **kwargs):
        raise ValueError("Image size of 99999x99999 pixels is too large.\nIt must be less than 2^16")

    monkeypatch.setattr(figures, "roc_figure", broken)
    result = CliRunner().invoke(cli, args, env=dnn_with_validation["env"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.strip().splitlines() == [
        "Error: could not draw roc_curves.png: ValueError: Image size of 99999x99999 pixels is too large. "
        "It must be less than 2^16"
    ]
    after = mlflow.get_run(run_id)
    assert after.info.status == "FAILED"
    # Nothing of the failed evaluation was logged: test_ece has the two values of the two good ones.
    assert len(mlflow.MlflowClient().get_metric_history(run_id, "test_ece")) == 2
