"""`pipeline run`: the whole job in one process, into one run, as `mlflow run .` runs it."""

from __future__ import annotations

import mlflow
import pytest
from click.testing import CliRunner

from pipeline.cli import cli


@pytest.mark.slow
def test_one_process_job_logs_every_stage_into_one_run(synthetic_data_dir, tracking_store):
    args = ["run", "--model", "dnn", "--max-steps", "4", "--allow-other-data", "--no-system-metrics", "--no-explain"]
    result = CliRunner().invoke(cli, [*args, "--register", "--data-dir", str(synthetic_data_dir)])
    assert result.exit_code == 0, result.output
    # Every stage reported, in order, as the separate commands do.
    marks = ["Download skipped", "Trained dnn for 4 steps", "Overall: accuracy", "Parity, torch vs onnxruntime"]
    positions = [result.output.index(mark) for mark in [*marks, "Registered as fashion-dnn v1"]]
    assert positions == sorted(positions)

    runs = mlflow.search_runs(search_all_experiments=True)
    assert len(runs) == 1  # evaluate, export and register went into the training run
    run = mlflow.get_run(runs.run_id[0])
    assert run.info.status == "FINISHED"
    assert run.data.tags["stages"] == "train, evaluate, export-onnx, register"
    assert run.data.tags["parity"] == "passed"
    assert {"test_accuracy", "test_macro_f1", "parity_max_abs_diff"} <= set(run.data.metrics)
    # The synthetic data was used as it is, not replaced by a download.
    assert run.data.params["test_size"] == "200"


@pytest.mark.slow
def test_the_trained_model_goes_through_the_test_set_once_and_is_never_reloaded(
    synthetic_data_dir, tracking_store, monkeypatch
):
    """Evaluate and parity reuse training's last pass over the test set, and its model in memory."""
    from pipeline import evaluate, parity, tracking, train

    def not_from_the_store(run_id):
        raise AssertionError(f"pipeline run reloaded run {run_id}'s model from the store")

    monkeypatch.setattr(tracking, "load_run_model", not_from_the_store)
    passes: list[int] = []  # images per model pass, over every module that runs the model on a batch of images

    def counted(model, inputs, batch_size=200):
        passes.append(len(inputs))
        return evaluate.compute_logits(model, inputs, batch_size)

    for module in (train, parity):
        monkeypatch.setattr(module, "compute_logits", counted)
    args = ["run", "--model", "cnn", "--max-steps", "3", "--quantize", "int8", "--allow-other-data"]
    result = CliRunner().invoke(cli, [*args, "--no-system-metrics", "--data-dir", str(synthetic_data_dir)])
    assert result.exit_code == 0, result.output
    run = mlflow.get_run(mlflow.search_runs(search_all_experiments=True).run_id[0])
    test_size = int(run.data.params["test_size"])
    assert passes.count(test_size) == 1  # training's last evaluation, shared by evaluate, parity and int8
    assert run.data.tags["parity"] == "passed" and run.data.tags["int8_check"] == "passed"
    # The shared logits are the model's own: evaluation's accuracy is the one training measured.
    assert run.data.metrics["test_accuracy"] == run.data.metrics["onnx_test_accuracy"]
