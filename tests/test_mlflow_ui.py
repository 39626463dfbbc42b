"""What the MLflow UI shows, checked through MLflow's API: the experiment opens on its runs,
runs have names, descriptions and stages, metrics belong to their model, the splits are
dataset inputs, system metrics and versions are recorded."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import mlflow
import pytest
from click.testing import CliRunner

from pipeline import jobs, tracking
from pipeline.cli import cli
from pipeline.config import TrainConfig
from pipeline.data import load_split, raw_dir
from pipeline.provenance import TRACKED_PACKAGES

UI_BUNDLE = Path(mlflow.__file__).parent / "server" / "js" / "build" / "static" / "js"


def invoke(*args: str):
    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code == 0, result.output
    return result


def test_the_ui_knows_the_tags_the_pipeline_sets():
    """The experiment kind, the shared-view tag and its URL parameter are names the installed UI reads."""
    bundle = "".join(path.read_text(errors="replace") for path in UI_BUNDLE.glob("main.*.js"))
    assert f'CUSTOM_MODEL_DEVELOPMENT="{tracking.EXPERIMENT_KIND}"' in bundle
    assert f'"{tracking.EXPERIMENT_KIND_TAG}"' in "".join(p.read_text(errors="replace") for p in UI_BUNDLE.glob("*.js"))
    assert '"mlflow.sharedViewState."' in bundle and '"viewStateShareKey"' in bundle
    assert "selectedColumns" in bundle and "workflowType" in bundle


def test_experiment_opens_on_its_runs_with_a_description(tracking_store):
    client = mlflow.MlflowClient()
    experiment_id = client.create_experiment("tests")  # made by someone else: no tags yet
    result = invoke("ui-url", "--port", "5123")
    expected = f"http://127.0.0.1:5123/#/experiments/{experiment_id}/runs?viewStateShareKey={tracking.RUNS_VIEW_KEY}"
    assert expected in result.output and "http://127.0.0.1:5123/#/models" in result.output

    tags = client.get_experiment(experiment_id).tags
    assert tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    assert tags["mlflow.note.content"] == tracking.store.EXPERIMENT_DESCRIPTION
    view = json.loads(tags[tracking.RUNS_VIEW_TAG])
    assert {"metrics.`test_accuracy`", "tags.`parity`", "attributes.`Dataset`"} <= set(view["selectedColumns"])

    # A description written in the UI stays; the pipeline only fills in what is missing.
    client.set_experiment_tag(experiment_id, "mlflow.note.content", "mine")
    with tracking.run(run_name="any"):
        pass
    assert client.get_experiment(experiment_id).tags["mlflow.note.content"] == "mine"

    missing = invoke("ui-url", "--experiment", "nope")
    assert "No experiment 'nope'" in missing.output and client.get_experiment_by_name("nope") is None


def test_run_names_tell_runs_apart():
    started = time.mktime((2026, 11, 29, 18, 35, 0, 0, 0, -1))
    assert jobs.run_name(TrainConfig(model="cnn"), started) == "cnn-5ep-lr0.001-seed0-1129-1835"
    smoke = TrainConfig(model="dnn", max_steps=30, lr=3e-4, seed=7)
    assert jobs.run_name(smoke, started) == "dnn-30steps-lr0.0003-seed7-1129-1835"


def test_a_run_has_a_name_a_description_datasets_and_versions(tracking_store, synthetic_data_dir):
    data = str(synthetic_data_dir)
    trained = invoke(
        "train", "--model", "dnn", "--max-steps", "4", "--no-system-metrics", "--allow-other-data", "--data-dir", data
    )
    run_id = trained.output.split("Run id:")[1].split()[0]
    run = mlflow.get_run(run_id)
    tags, params = run.data.tags, run.data.params
    assert run.info.run_name.startswith("dnn-4steps-lr0.001-seed0-")
    assert tags["stages"] == "train" and "stage" not in tags
    assert tags["mlflow.note.content"].startswith("**DNN**, 1 epoch (4 steps of 100): test accuracy **")
    assert "ONNX parity: not checked yet" in tags["mlflow.note.content"]
    assert not [key for key in run.data.metrics if key.startswith("system/")]  # --no-system-metrics

    # Versions and the commit, although this is `pipeline train`, not `mlflow run`.
    for package in TRACKED_PACKAGES:
        assert re.fullmatch(r"\d+\.\d+.*", params[f"{package}_version"]), package
    assert params["mlflow_version"] == mlflow.__version__ and params["python_version"].startswith("3.11")
    assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", params["git_commit"])
    assert tags["mlflow.source.git.commit"] == params["git_commit"].removesuffix("-dirty")

    # The splits are dataset inputs: name, digest, source, context; the profile holds the file digests.
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert set(inputs) == {"fashion-mnist-train", "fashion-mnist-test"}
    for split, context in (("train", "training"), ("test", "testing")):
        dataset = inputs[f"fashion-mnist-{split}"]
        assert [tag.value for tag in dataset.tags if tag.key == "mlflow.data.context"] == [context]
        profile = json.loads(dataset.dataset.profile)
        assert profile["sha256"] == load_split(synthetic_data_dir, split).digests
        assert profile["num_rows"] == int(params[f"{split}_size"])
        assert json.loads(dataset.dataset.source)["uri"] == str(raw_dir(synthetic_data_dir).resolve())
        assert len(dataset.dataset.digest) == 16
    assert inputs["fashion-mnist-train"].dataset.digest != inputs["fashion-mnist-test"].dataset.digest


def test_stages_accumulate_in_order_and_rewrite_the_description(tracking_store):
    tracking.configure()
    with tracking.run(run_name="stages") as active:
        tracking.log_params({"model": "cnn", "epochs": 5, "test_size": 200})
        tracking.log_metrics({"test_accuracy": 0.5, "steps": 10}, step=10)
    run_id = active.run_id
    for stage in ("train", "evaluate", "train", "export-onnx"):
        tracking.finish_stage(run_id, stage)
    tags = mlflow.get_run(run_id).data.tags
    assert tags["stages"] == "train, evaluate, export-onnx"
    assert tags["mlflow.note.content"].splitlines()[-1] == "- stages done: train, evaluate, export-onnx"


def test_each_logged_model_has_its_own_metrics(exported_onnx_uri, use_trained_run):
    """Evaluation figures belong to the torch model, parity figures to the ONNX model it was checked as."""
    run_id = use_trained_run["run_id"]
    invoke("evaluate", "--run-id", run_id, "--no-explain", "--data-dir", str(use_trained_run["data_dir"]))
    client = mlflow.MlflowClient()
    run = client.get_run(run_id)
    assert {"train", "evaluate", "export-onnx"} <= set(run.data.tags["stages"].split(", "))
    assert "ONNX parity: **" in run.data.tags["mlflow.note.content"]

    torch_model = client.get_logged_model(tracking.model_id_of(run.data.tags[tracking.TORCH_URI_TAG]))
    torch_keys = {m.key for m in torch_model.metrics}
    assert {"test_accuracy", "test_macro_f1", "test_accuracy_shirt"} <= torch_keys
    assert not [key for key in torch_keys if key.startswith(("parity_", "onnx_"))]
    evaluated = [m for m in torch_model.metrics if m.key == "test_accuracy" and m.dataset_name]
    assert evaluated and {m.dataset_name for m in evaluated} == {"fashion-mnist-test"}

    onnx_model = client.get_logged_model(tracking.model_id_of(exported_onnx_uri))
    assert {m.key for m in onnx_model.metrics} == {
        "parity_max_abs_diff",
        "parity_mean_abs_diff",
        "parity_argmax_agreement",
        "onnx_test_accuracy",
    }
    onnx_accuracy = [m.value for m in onnx_model.metrics if m.key == "onnx_test_accuracy"]
    assert len(onnx_accuracy) >= 1  # one per parity check of this very model
    assert onnx_accuracy == [pytest.approx(run.data.metrics["test_accuracy"])] * len(onnx_accuracy)


@pytest.mark.slow
def test_system_metrics_are_sampled_while_a_run_is_open(tracking_store, monkeypatch):
    """Sampled every SYSTEM_METRICS_INTERVAL_S while the run is open; a run shorter than one interval
    (the session's tiny training, on a quiet machine) ends before the first sample, so this one waits.
    A user's own interval is kept; this test sets a short one, to wait a quarter of the time."""
    import time

    interval = tracking.SYSTEM_METRICS_INTERVAL_S / 4
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", str(interval))
    with tracking.run(run_name="sampled", system_metrics=True) as active:
        time.sleep(3 * interval + 0.5)
    client = mlflow.MlflowClient()
    metrics = client.get_run(active.run_id).data.metrics
    for key in ("system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"):
        assert key in metrics, sorted(metrics)
        assert client.get_metric_history(active.run_id, key)
    assert 0 < metrics["system/system_memory_usage_megabytes"]
    with tracking.run(run_name="not sampled", system_metrics=False) as quiet:
        time.sleep(2 * interval + 0.5)
    assert not [k for k in client.get_run(quiet.run_id).data.metrics if k.startswith("system/")]


@pytest.mark.parametrize(
    ("tags", "expected"),
    [
        ({"parity": "failed"}, "- ONNX parity: **failed** (max |logit diff| 0.3)"),
        ({"stages": "train, evaluate"}, "- stages done: train, evaluate"),
    ],
)
def test_run_description_from_what_the_stages_logged(tags, expected):
    params = {"model": "cnn", "epochs": "5", "batch_size": "100", "test_size": "10000"}
    metrics = {"test_accuracy": 0.9088, "epochs_completed": 5.0, "steps": 3000.0, "parity_max_abs_diff": 0.3}
    note = tracking.run_description(params, metrics, tags)
    assert note.startswith("**CNN**, 5 epochs (3,000 steps of 100): test accuracy **90.88%** on 10,000 test images")
    assert expected in note.splitlines()
