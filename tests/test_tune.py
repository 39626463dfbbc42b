"""`pipeline tune`: a tiny Optuna study on synthetic data, tracked as nested MLflow runs.

The study searches the chapter CNN (it learns the synthetic images in a few steps) with three
enqueued trials: two that learn and one whose learning rate is far too small, which the
pruner must stop after its first epoch. Then the study is resumed, and retrained.
"""

from __future__ import annotations

import os

import mlflow
import optuna
import pytest
from click.testing import CliRunner

from pipeline import jobs, tracking, tune
from pipeline.cli import cli
from pipeline.data import load_split
from pipeline.errors import PipelineError

GOOD = {"batch_size": 100, "label_smoothing": 0.0, "crop_pad": 0, "hflip": False, "epochs": 2, "weight_decay": 1e-6}
TRIALS = [{**GOOD, "lr": 3e-3}, {**GOOD, "lr": 2e-3}, {**GOOD, "lr": 1e-9}]


@pytest.fixture
def study_config(synthetic_data_dir, tracking_store, tmp_path, monkeypatch):
    # Prune from the third trial on, from the first report: the tiny study must show a pruned trial.
    monkeypatch.setattr(tune, "make_pruner", lambda name: optuna.pruners.MedianPruner(n_startup_trials=2))
    return tune.TuneConfig(
        model="cnn",
        n_trials=3,
        study_name="tiny",
        storage=f"sqlite:///{tmp_path / 'optuna.db'}",
        val_size=100,
        data_dir=synthetic_data_dir,
        allow_other_data=True,
    )


@pytest.fixture
def loaded_splits(monkeypatch):
    """Every split the training stage loads, in order."""
    from pipeline import train as train_module

    loaded = []
    monkeypatch.setattr(train_module, "load_split", lambda d, split: loaded.append(split) or load_split(d, split))
    return loaded


def enqueue(config: tune.TuneConfig, trials: list[dict]) -> None:
    study = optuna.load_study(study_name=config.study_name, storage=config.storage)
    for params in trials:
        study.enqueue_trial(params)


def child_runs(parent_id: str):
    runs = mlflow.search_runs(search_all_experiments=True, filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")
    return runs.sort_values("start_time").reset_index(drop=True)


@pytest.mark.filterwarnings("ignore:Fixed parameter .* is out of range:UserWarning")  # the enqueued lr 1e-9
@pytest.mark.slow
def test_tiny_study_nested_runs_pruning_resume_and_no_test_set(study_config, loaded_splits):
    tune.open_study(study_config)  # created empty, as a first worker would, so the trials can be enqueued
    enqueue(study_config, TRIALS)
    lines = []
    job = jobs.tune_model(study_config, progress=lines.append)

    # The test set was never loaded by any trial, and no trial logged a test metric.
    assert loaded_splits == ["train"] * 3
    children = child_runs(job.parent_run_id)
    assert not [c for c in children.columns if c.startswith("metrics.test_")]

    # One nested run per trial, with its params, per-epoch validation metrics and its state.
    assert list(children["tags.mlflow.runName"]) == ["trial-0", "trial-1", "trial-2"]
    assert list(children["tags.trial_state"]) == ["complete", "complete", "pruned"]
    assert list(children["status"]) == ["FINISHED"] * 3  # pruned trials ran as asked until stopped
    # Liveness, as every run has: a dead worker's trial shows stale.
    assert (children[f"tags.{tracking.PID_TAG}"] == str(os.getpid())).all()
    assert list(children["params.lr"].astype(float)) == [3e-3, 2e-3, 1e-9]
    client = mlflow.MlflowClient()
    per_epoch = [[m.step for m in client.get_metric_history(run_id, "val_accuracy")] for run_id in children["run_id"]]
    assert per_epoch == [[5, 10], [5, 10], [5]]  # 500 training images / 100 per step; pruned after epoch 1
    assert job.result.counts == {"complete": 2, "pruned": 1}
    assert any("trial 2: pruned" in line for line in lines)

    # The parent: best params and value, Optuna's plots, the trials table.
    parent = client.get_run(job.parent_run_id)
    best = job.result
    assert best.best_number in (0, 1) and best.best_params == TRIALS[best.best_number]
    assert parent.data.metrics["best_val_accuracy"] == pytest.approx(best.best_value)
    assert parent.data.tags["best.lr"] == str(TRIALS[best.best_number]["lr"])
    artifacts = {a.path for a in client.list_artifacts(job.parent_run_id, "optuna")}
    assert {"optuna/optimization_history.png", "optuna/param_importances.png", "optuna/trials.json"} <= artifacts
    assert {"optuna/best_params.json", "optuna/search_space.json"} <= artifacts
    table = mlflow.load_table("optuna/trials.json", run_ids=[job.parent_run_id])
    assert list(table["state"]) == ["COMPLETE", "COMPLETE", "PRUNED"]

    # Resumed: the same study name and storage continue the study, into the same parent run.
    study_config.n_trials = 1
    enqueue(study_config, [{**GOOD, "lr": 1e-3}])
    again = jobs.tune_model(study_config)
    assert again.parent_run_id == job.parent_run_id
    assert len(child_runs(job.parent_run_id)) == 4 and sum(again.result.counts.values()) == 4
    history = client.get_metric_history(job.parent_run_id, "best_val_accuracy")
    assert [m.step for m in history] == [3, 4]
    assert loaded_splits == ["train"] * 4
    # A study's runs name the model but hold no trained one: they are never taken for a trained run.
    assert tracking.latest_finished_run("cnn") is None


@pytest.mark.slow
def test_retrain_best_uses_the_test_set_once(study_config, loaded_splits):
    study_config.n_trials = 1
    study_config.max_steps = 3
    job = jobs.tune_model(study_config, retrain_best=True)
    assert loaded_splits == ["train", "train", "test"]  # the trial; then the retraining and its final figure
    retrained = mlflow.get_run(job.retrained.run_id)
    assert retrained.data.tags["mlflow.parentRunId"] == job.parent_run_id
    assert retrained.data.params["val_size"] == "0" and retrained.data.params["test_eval"] == "end"
    assert len(mlflow.MlflowClient().get_metric_history(job.retrained.run_id, "test_accuracy")) == 1
    assert job.retrained.model_uri.startswith("models:/")
    parent = mlflow.get_run(job.parent_run_id).data
    assert parent.metrics["retrained_test_accuracy"] == pytest.approx(job.retrained.metrics["test_accuracy"])
    # Then exported, parity-checked and registered as the candidate, like `pipeline run --register`.
    assert job.exported.run_id == job.retrained.run_id and not job.exported.failures
    candidate = mlflow.MlflowClient().get_model_version_by_alias("fashion-cnn", "candidate")
    assert candidate.run_id == job.retrained.run_id and job.registration.onnx.version == str(candidate.version)


def test_resume_with_other_settings_is_refused(study_config):
    tune.open_study(study_config)
    study_config.val_size = 200
    with pytest.raises(PipelineError, match=r"started with val_size 100 \(asked: 200\)"):
        tune.open_study(study_config)


def test_study_needs_validation_and_a_stop():
    with pytest.raises(PipelineError, match="validation split"):
        tune.TuneConfig(val_size=0)
    with pytest.raises(PipelineError, match="trials, a timeout"):
        tune.TuneConfig(n_trials=None)


@pytest.mark.parametrize(("text", "seconds"), [("90", 90), ("90s", 90), ("30m", 1800), ("1.5h", 5400)])
def test_timeout_takes_units(text, seconds):
    from pipeline.cli_args import DURATION

    assert DURATION.convert(text, None, None) == seconds


@pytest.mark.parametrize("bad", ["abc", "0", "-5m", "m"])
def test_bad_timeout_is_refused_before_anything_runs(bad):
    result = CliRunner().invoke(cli, ["tune", "--timeout", bad])
    assert result.exit_code == 2 and "Traceback" not in result.output


def test_every_model_has_a_search_space_of_train_settings():
    from dataclasses import fields

    from pipeline.config import MODEL_NAMES, TrainConfig

    settings = {f.name for f in fields(TrainConfig)}
    assert set(tune.SEARCH_SPACES) == set(MODEL_NAMES)
    for space in tune.SEARCH_SPACES.values():
        assert set(space) <= settings
        assert {"lr", "weight_decay", "batch_size", "label_smoothing", "crop_pad", "epochs"} <= set(space)


def test_a_worker_that_loses_the_race_for_the_parent_run_deletes_its_own(tracking_store, monkeypatch):
    """Another worker's run lands between this worker's search (none yet) and its own create."""
    import time

    from mlflow.entities import ViewType

    real_create = mlflow.MlflowClient.create_run
    other = []

    def another_worker_first(self, experiment_id, **kwargs):
        if not other:
            other.append(real_create(self, experiment_id, **kwargs).info.run_id)
            time.sleep(0.01)  # a later start time for ours
        return real_create(self, experiment_id, **kwargs)

    monkeypatch.setattr(mlflow.MlflowClient, "create_run", another_worker_first)
    assert tracking.claim_study_run("it's raced", "tune raced") == other[0]
    experiment_id = mlflow.get_experiment_by_name("tests").experiment_id
    deleted = mlflow.MlflowClient().search_runs([experiment_id], run_view_type=ViewType.DELETED_ONLY)
    assert len(deleted) == 1 and deleted[0].info.run_id != other[0]  # ours, not theirs
    assert tracking.claim_study_run("it's raced", "tune raced") == other[0]  # and a later worker finds theirs


def test_a_validation_split_as_large_as_the_data_leaves_no_run_and_no_study(study_config, tmp_path):
    study_config.val_size = 60000
    with pytest.raises(PipelineError, match="leaves no training images"):
        jobs.tune_model(study_config)
    assert mlflow.search_runs(search_all_experiments=True).empty
    assert optuna.get_all_study_names(study_config.storage) == []
