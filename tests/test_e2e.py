"""End to end on the real data: `mlflow run .` as a user runs it, checked in the store."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from pipeline import tracking

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.real_data
@pytest.mark.slow
def test_mlflow_run_main_entry_point(real_data_dir, tracking_store):
    # No --experiment-name, nothing exported but the store: the run lands in the store's default
    # experiment, which the pipeline names after the project (its files stay beside the temp store).
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PIPELINE_DATA_DIR": str(real_data_dir),
    }
    for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        env.pop(name, None)

    def mlflow_run(*extra: str) -> subprocess.CompletedProcess:
        args = ["--env-manager", "local", "-P", "model=cnn", "-P", "max_steps=30"]
        completed = subprocess.run(
            [sys.executable, "-m", "mlflow", "run", str(REPO), *args, "-P", "lr=1e-3", *extra],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
        return completed

    mlflow_run("-P", "register=true")

    runs = mlflow.search_runs(experiment_names=["fashion-mnist"])
    assert len(runs) == 1
    run = mlflow.get_run(runs.run_id[0])
    assert run.info.status == "FINISHED" and run.info.experiment_id == "0"  # MLflow's default experiment, renamed
    # The store's own artifact root (made with the store, beside it), never ./mlruns of the repo.
    assert not mlflow.get_experiment("0").artifact_location.startswith(REPO.as_uri())
    assert not run.info.artifact_uri.startswith((REPO.as_uri(), str(REPO)))
    params, metrics = run.data.params, run.data.metrics
    assert params["model"] == "cnn" and params["max_steps"] == "30" and params["total_steps"] == "30"
    assert params["lr"] == "1e-3"  # as `mlflow run` logged it; train left it alone rather than fail
    assert params["sha256_train-images-idx3-ubyte"] == (
        "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"
    )
    assert metrics["steps"] == 30 and 0.5 < metrics["test_accuracy"] <= 1.0  # 30 steps already beat chance
    assert run.data.tags["mlflow.project.entryPoint"] == "main"

    # evaluate and export-onnx ran inside the same run, and parity passed.
    assert "test_accuracy_ankle_boot" in metrics and "test_macro_f1" in metrics
    assert metrics["parity_argmax_agreement"] == 1.0 and metrics["parity_max_abs_diff"] <= 1e-4
    assert metrics["onnx_test_accuracy"] == metrics["test_accuracy"]
    assert run.data.tags["parity"] == "passed"
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert {"per_class.csv", "confusion_matrix.png", "parity.json"} <= artifacts

    logged = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list")
    assert any(m.source_run_id == run.info.run_id and m.name == tracking.TORCH_MODEL_NAME for m in logged)
    model, names = tracking.load_run_model(run.info.run_id)
    assert type(model).__name__ == "FashionCNN" and len(names) == 10

    # What the UI shows: a named run with its stages, the real splits as datasets, system
    # metrics, and the registered candidate (-P register=true).
    assert run.info.run_name.startswith("cnn-30steps-lr0.001-seed0-")
    assert run.data.tags["stages"] == "train, evaluate, export-onnx, register"
    assert "ONNX parity: **passed**" in run.data.tags["mlflow.note.content"]
    assert {d.dataset.name for d in run.inputs.dataset_inputs} == {"fashion-mnist-train", "fashion-mnist-test"}
    assert "system/cpu_utilization_percentage" in metrics
    assert mlflow.get_experiment("0").tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    candidate = mlflow.MlflowClient().get_model_version_by_alias("fashion-cnn", "candidate")
    assert candidate.run_id == run.info.run_id and candidate.tags["parity"] == "passed"

    # The same job again with reuse=true: every stage is skipped and points to the first run.
    again = mlflow_run("-P", "reuse=true")
    for stage in ("train", "evaluate", "export-onnx"):
        assert f"Reused {stage}: run {run.info.run_id}" in again.stdout, again.stdout[-3000:]
    others = f"attributes.run_id != '{run.info.run_id}'"
    second = mlflow.search_runs(experiment_names=["fashion-mnist"], filter_string=others)
    tags = mlflow.get_run(second.run_id[0]).data.tags
    assert [tags[f"reused.{stage}"] for stage in ("train", "evaluate", "export")] == [run.info.run_id] * 3
