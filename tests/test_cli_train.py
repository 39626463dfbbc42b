"""The CLI and the MLflow boundary: instant help, a tracked training run, clean failures."""

from __future__ import annotations

import json
import subprocess
import sys

import mlflow
import pytest
from click.testing import CliRunner

from pipeline import tracking
from pipeline.cli import cli
from pipeline.config import CLASS_NAMES


def test_help_is_instant_and_imports_nothing_heavy():
    code = (
        "import sys; from pipeline.cli import cli\n"
        "heavy = [m for m in ('torch', 'mlflow', 'onnxruntime', 'pandas', 'matplotlib') if m in sys.modules]\n"
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_command_has_help():
    runner = CliRunner()
    top = runner.invoke(cli, ["--help"])
    assert top.exit_code == 0
    for name in cli.commands:
        result = runner.invoke(cli, [name, "--help"])
        assert result.exit_code == 0 and "Usage:" in result.output, name


def test_train_help_shows_chapter_defaults():
    out = " ".join(CliRunner().invoke(cli, ["train", "--help"]).output.split())
    for default in ("[default: 5]", "[default: 100]", "[default: 0.001]", "[default: 0]", "[default: auto]"):
        assert default in out


def test_train_logs_everything_to_mlflow(synthetic_data_dir, tracking_store):
    result = CliRunner().invoke(
        cli,
        [
            "train",
            "--model",
            "dnn",
            "--epochs",
            "2",
            "--batch-size",
            "50",
            "--log-every",
            "5",
            "--data-dir",
            str(synthetic_data_dir),
        ],
    )
    assert result.exit_code == 0, result.output
    run_id = result.output.split("Run id:")[1].split()[0]
    assert "test accuracy" in result.output

    run = mlflow.get_run(run_id)
    assert run.info.status == "FINISHED"
    params, metrics = run.data.params, run.data.metrics
    assert params["model"] == "dnn" and params["epochs"] == "2" and params["batch_size"] == "50"
    assert params["lr"] == "0.001" and params["seed"] == "0" and params["device"] == "cpu"
    assert "torch_version" in params and len(params["sha256_t10k-labels-idx1-ubyte"]) == 64
    assert json.loads(params["class_names"]) == list(CLASS_NAMES)
    for key in ("train_loss", "test_loss", "test_accuracy", "wall_time_s", "train_images_per_s", "train_loss_step"):
        assert key in metrics, key
    client = mlflow.MlflowClient()
    assert [m.step for m in client.get_metric_history(run_id, "test_accuracy")] == [12, 24]
    assert [m.step for m in client.get_metric_history(run_id, "train_loss_step")] == [5, 10, 15, 20]
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"checkpoint", "class_names.json", "history.json"} <= artifacts

    # The mlflow.pytorch model: a LoggedModel with a signature, loadable, batch-size agnostic.
    model_uri = result.output.split("Model:")[1].split()[0]
    info = mlflow.models.get_model_info(model_uri)
    assert info.signature is not None and info.saved_input_example_info is not None
    import numpy as np

    logits = mlflow.pyfunc.load_model(model_uri).predict(np.zeros((5, 1, 28, 28), dtype=np.float32))
    assert np.asarray(logits).shape == (5, 10)

    # The checkpoint rebuilds the same network.
    model, names = tracking.load_run_model(run_id)
    assert names == list(CLASS_NAMES) and type(model).__name__ == "FashionDNN"


def test_unknown_model_lists_known_ones(synthetic_data_dir, tracking_store):
    result = CliRunner().invoke(cli, ["train", "--model", "vgg", "--data-dir", str(synthetic_data_dir)])
    assert result.exit_code == 2  # Click's usage error: refused before torch or mlflow is loaded
    assert "'vgg' is not one of 'dnn', 'cnn'" in result.output and "Traceback" not in result.output
    assert mlflow.search_runs(search_all_experiments=True).empty  # no run was created


def test_cli_model_choices_are_the_registry():
    from pipeline.config import MODEL_NAMES
    from pipeline.models import MODELS, register

    assert set(MODEL_NAMES) == set(MODELS)
    with pytest.raises(ValueError, match="MODEL_NAMES"):
        register("not_listed")


def test_missing_data_says_run_download(tmp_path, tracking_store):
    result = CliRunner().invoke(cli, ["train", "--data-dir", str(tmp_path / "empty")])
    assert result.exit_code != 0 and "pipeline download" in result.output
    assert "Traceback" not in result.output
    runs = mlflow.search_runs(search_all_experiments=True)
    assert list(runs["status"]) == ["FAILED"]  # marked, never left RUNNING


@pytest.mark.parametrize(("error", "status"), [(RuntimeError("boom"), "FAILED"), (KeyboardInterrupt(), "KILLED")])
def test_interrupted_run_is_never_left_running(tracking_store, error, status):
    with pytest.raises(type(error)):
        with tracking.run(run_name="doomed") as active:
            raise error
    assert mlflow.get_run(active.info.run_id).info.status == status


def test_unknown_run_id_is_a_clear_error(tracking_store):
    from pipeline.errors import PipelineError

    tracking.configure()
    with pytest.raises(PipelineError, match="no run 'deadbeef'"):
        tracking.load_run_model("deadbeef")
