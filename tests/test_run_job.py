"""`pipeline run`: the whole job in one process, into one run, as `mlflow run .` runs it."""

from __future__ import annotations

import mlflow
from click.testing import CliRunner

from pipeline.cli import cli


def test_one_process_job_logs_every_stage_into_one_run(synthetic_data_dir, tracking_store):
    args = ["run", "--model", "dnn", "--max-steps", "4", "--allow-other-data", "--no-system-metrics"]
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
